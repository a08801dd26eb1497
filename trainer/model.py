"""Deep Speech 2 (arXiv:1512.02595): on-device log-mel features, 2D conv front end, batch-normed BiGRUs, CTC head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hdfs_io.speech.augmentation import mask_features
from hdfs_io.speech.features import LOG_FLOOR, FeatureConfig, mel_filterbank
from hdfs_io.speech.speed import frame_starts, hann, speed_projection, stretch


@dataclass(frozen=True)
class ModelConfig:
    conv_channels: int = 32
    conv_layers: int = 2  # 2 or 3
    rnn_layers: int = 3
    rnn_hidden: int = 256
    rnn_type: str = "gru"  # or "lstm"
    time_stride: int = 3  # of the first conv layer


class LogMel(nn.Module):
    """Waveforms (B, S) -> normalized features (B, T, F) with torch.stft, matching hdfs_io.speech.features."""

    def __init__(self, cfg: FeatureConfig, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.window_samples, periodic=True))
        if cfg.kind == "log_mel":
            self.register_buffer("mel", torch.from_numpy(mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)))
        bins = cfg.num_bins
        # None only for a model whose buffers a checkpoint fills in (trainer.train.restore)
        self.register_buffer("mean", torch.tensor([0.0] * bins if mean is None else list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor([1.0] * bins if std is None else list(std),
                                                 dtype=torch.float32).clamp_min(1e-5))

    def frames(self, samples: torch.Tensor, speeds: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the frame count for signal lengths played at `speeds`, as hdfs_io.speech.speed counts them."""
        n_fft, hop = self.cfg.n_fft, self.cfg.hop_samples
        if speeds is not None:  # perturbed_length: int(samples / speed), in float64 as in Python
            samples = torch.floor(samples.to(torch.float64) / speeds.to(samples.device, torch.float64)).long()
        return 1 + (samples.clamp_min(n_fft) - n_fft) // hop

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor,
                speeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns normalized features (B, T, F) and frame counts (B,) of waveforms played at `speeds` (B,)
        (none: all at 1). In float32 under any autocast: a frame's power overflows float16."""
        with torch.autocast(wave.device.type, enabled=False):
            if speeds is not None:
                return self.played(wave.float(), lengths, speeds)
            return self.recorded(wave.float(), lengths)

    def recorded(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of waveforms played as recorded, through torch.stft."""
        cfg = self.cfg
        if wave.shape[1] < cfg.n_fft:
            wave = nn.functional.pad(wave, (0, cfg.n_fft - wave.shape[1]))
        spec = torch.stft(wave, n_fft=cfg.n_fft, hop_length=cfg.hop_samples, win_length=cfg.window_samples,
                          window=self.window, center=False, return_complex=True)
        power = spec.abs().pow(2).transpose(1, 2)  # (B, T, n_fft/2+1)
        if cfg.kind == "log_mel":
            power = power @ self.mel.T
        feats = (torch.log(power + LOG_FLOOR) - self.mean) / self.std
        return feats, self.frames(lengths)

    def played(self, wave: torch.Tensor, lengths: torch.Tensor,
               speeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of each waveform played at its speed, from stretched frames (hdfs_io.speech.speed):
        the waveforms of one speed at a time."""
        frames = self.frames(lengths, speeds)
        longest = int(frames.max()) if len(frames) else 0
        feats = wave.new_zeros(len(wave), longest, self.cfg.num_bins)  # every row is filled below
        for speed in torch.unique(speeds).tolist():
            rows = torch.nonzero(speeds.to(wave.device) == speed).squeeze(1)
            power = stretched_power(wave[rows], self.cfg, speed, longest)
            feats[rows] = (torch.log(power + LOG_FLOOR) - self.mean) / self.std
        return feats, frames


def stretched_power(wave: torch.Tensor, cfg: FeatureConfig, speed: float, frames: int) -> torch.Tensor:
    """Returns (B, frames, bins): the power features of waveforms (B, S) played `speed` times as fast, as
    hdfs_io.speech.speed.features_at computes them before its log."""
    st = stretch(cfg, speed)
    starts = frame_starts(st, frames)
    end = int(starts[-1]) + st.window
    if wave.shape[1] < end:
        wave = nn.functional.pad(wave, (0, end - wave.shape[1]))
    if float(st.step).is_integer():
        framed = wave[:, int(starts[0]):].unfold(1, st.window, int(st.step))[:, :frames]
    else:
        framed = wave[:, torch.from_numpy(starts[:, None] + np.arange(st.window)).to(wave.device)]
    window = torch.tensor(hann(st.window), device=wave.device)
    spectrum = torch.fft.rfft(framed * window, n=st.n_dft)
    projection = torch.tensor(speed_projection(cfg, speed), device=wave.device)
    return (spectrum.real ** 2 + spectrum.imag ** 2) @ projection.T


class ConvFrontEnd(nn.Module):
    """2-3 Conv2d layers over (freq, time), each with BatchNorm and Hardtanh(0, 20), striding in time."""

    def __init__(self, cfg: ModelConfig, num_bins: int):
        super().__init__()
        kernel, padding = 11, 5
        strides = [(2, cfg.time_stride)] + [(2, 1)] * (cfg.conv_layers - 1)
        layers, channels, freq = [], 1, num_bins
        for stride in strides:
            layers += [nn.Conv2d(channels, cfg.conv_channels, kernel, stride, padding, bias=False),
                       nn.BatchNorm2d(cfg.conv_channels), nn.Hardtanh(0, 20, inplace=True)]
            channels = cfg.conv_channels
            freq = (freq + 2 * padding - kernel) // stride[0] + 1
        self.time_specs = [(kernel, stride[1], padding) for stride in strides]
        self.layers = nn.Sequential(*layers)
        self.out_features = channels * freq

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for kernel, stride, padding in self.time_specs:
            lengths = (lengths + 2 * padding - kernel) // stride + 1
        return lengths

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.layers(feats.transpose(1, 2).unsqueeze(1))  # (B, C, F', T')
        b, c, f, t = x.shape
        return x.permute(0, 3, 1, 2).reshape(b, t, c * f), self.out_lengths(lengths)


class BatchNormRNN(nn.Module):
    """Sequence-wise batch norm over (batch x time), then a bidirectional GRU/LSTM; directions summed.

    Padded batches, not packed sequences: padding frames are zeroed before and after,
    which on a CPU runs about 2x faster than pack_padded_sequence (see shared/calibration.md).
    """

    def __init__(self, inputs: int, hidden: int, rnn_type: str):
        super().__init__()
        self.norm = nn.BatchNorm1d(inputs)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[rnn_type]
        self.rnn = rnn(inputs, hidden, batch_first=True, bidirectional=True)
        self.hidden = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        x = self.norm(x.reshape(b * t, f)).reshape(b, t, f) * mask
        x, _ = self.rnn(x)
        return (x[..., :self.hidden] + x[..., self.hidden:]) * mask


class DeepSpeech2(nn.Module):
    def __init__(self, cfg: ModelConfig, feature: FeatureConfig, vocabulary: list[str],
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.vocabulary = list(vocabulary)  # CTC blank is index 0, symbol i is index i + 1
        self.features = LogMel(feature, mean, std)
        self.conv = ConvFrontEnd(cfg, feature.num_bins)
        sizes = [self.conv.out_features] + [cfg.rnn_hidden] * cfg.rnn_layers
        self.rnns = nn.ModuleList(BatchNormRNN(i, cfg.rnn_hidden, cfg.rnn_type) for i in sizes[:-1])
        self.head = nn.Sequential(nn.BatchNorm1d(cfg.rnn_hidden), nn.Linear(cfg.rnn_hidden, len(vocabulary) + 1))

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor, spec_masks: torch.Tensor | None = None,
                speeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns log-probabilities (T, B, symbols) for CTC and the output lengths (B,).

        `spec_masks` (B, M, 3), from the reader's batch, are SpecAugment's masks of each
        utterance (hdfs_io.speech.augmentation.spec_masks), applied to the features in training mode only.
        `speeds` (B,), from the reader's batch too, are the speeds each waveform is played at (none: 1).
        """
        feats, frames = self.features(wave, lengths, speeds)
        if spec_masks is not None and self.training:
            feats = mask_features(feats, spec_masks)
        x, out_lengths = self.conv(feats, frames)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < out_lengths[:, None]).unsqueeze(-1).to(x.dtype)
        for rnn in self.rnns:
            x = rnn(x, mask)
        b, t, h = x.shape
        logits = self.head(x.reshape(b * t, h)).reshape(b, t, -1)
        return logits.log_softmax(-1).transpose(0, 1), out_lengths.clamp(max=t)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cosine_with_warmup(progress: float, warmup_fraction: float) -> float:
    """Returns the LR multiplier at `progress` (0 to 1) of training: linear warm-up, then cosine decay to zero."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction)))
