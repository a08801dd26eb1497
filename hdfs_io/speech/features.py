"""Acoustic features in numpy (log spectrogram or log-mel) and their per-bin mean/std statistics.

The trainer computes the same features with torch.stft on its device; the
config here, stored in dataset.json next to the statistics, is what both agree on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from hdfs_io.speech.audio import decode, resample, to_mono

LOG_FLOOR = 1e-6


@dataclass(frozen=True)
class FeatureConfig:
    kind: str = "log_mel"  # or "log_spectrogram"
    sample_rate: int = 16000
    window_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    n_mels: int = 80

    def __post_init__(self):
        if self.kind not in ("log_mel", "log_spectrogram"):
            raise ValueError(f"unknown feature kind {self.kind!r}: use log_mel or log_spectrogram")
        if self.window_samples > self.n_fft:
            raise ValueError(f"window of {self.window_samples} samples exceeds n_fft={self.n_fft}")

    @property
    def window_samples(self) -> int:
        return int(round(self.sample_rate * self.window_ms / 1000))

    @property
    def hop_samples(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def num_bins(self) -> int:
        return self.n_mels if self.kind == "log_mel" else self.n_fft // 2 + 1

    def digest(self) -> str:
        """Returns a short stable hash of the config (names feature caches)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Returns triangular HTK-mel filters, shaped (n_mels, n_fft // 2 + 1)."""
    return mel_weights(np.linspace(0, sample_rate / 2, n_fft // 2 + 1), sample_rate, n_mels)


def mel_weights(hz: np.ndarray, sample_rate: int, n_mels: int) -> np.ndarray:
    """Returns triangular HTK-mel filters up to sample_rate / 2, weighing frequencies `hz`: (n_mels, len(hz))."""
    def hz_to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def mel_to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (hz[None, :] - lower) / (centre - lower)
    falling = (upper - hz[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


@lru_cache(maxsize=8)
def padded_window(win: int, n_fft: int) -> np.ndarray:
    """Returns the periodic Hann window of `win` samples zero-padded to `n_fft` in the middle, as torch.stft pads it."""
    left = (n_fft - win) // 2
    window = np.zeros(n_fft, np.float32)
    window[left:left + win] = np.hanning(win + 1)[:-1]
    window.flags.writeable = False  # shared between calls
    return window


def num_frames(samples: int, cfg: FeatureConfig) -> int:
    """Returns how many feature frames a signal of `samples` samples has (a short one is padded to one frame)."""
    return 1 + (max(samples, cfg.n_fft) - cfg.n_fft) // cfg.hop_samples


def log_features(signal: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Returns features of a mono signal at `cfg.sample_rate`, shaped (frames, cfg.num_bins).

    Framed as torch.stft(center=False) frames them, so the trainer's on-device
    features equal these: frames of n_fft samples every hop, the periodic Hann
    window of `window_samples` zero-padded to n_fft in the middle.
    """
    win, hop, n_fft = cfg.window_samples, cfg.hop_samples, cfg.n_fft
    frames = num_frames(len(signal), cfg)
    if len(signal) < n_fft:
        signal = np.pad(signal, (0, n_fft - len(signal)))
    framed = np.lib.stride_tricks.sliding_window_view(signal, n_fft)[::hop][:frames]  # a view: no copy, no index
    spectrum = np.fft.rfft(framed * padded_window(win, n_fft), n=n_fft)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    if cfg.kind == "log_mel":
        power = power @ mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels).T
    return np.log(power + LOG_FLOOR).astype(np.float32)


def features_from_bytes(data: bytes, cfg: FeatureConfig, max_seconds: float | None = None) -> np.ndarray:
    """Returns the features of encoded audio, down-mixed and resampled to the config's rate
    (of its first `max_seconds` only, if given)."""
    samples, rate = decode(data, max_seconds=max_seconds)
    return log_features(resample(to_mono(samples), rate, cfg.sample_rate), cfg)


@dataclass
class FeatureMoments:
    """Running per-bin sums of features, mergeable across Spark tasks."""

    frames: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def empty(cls, num_bins: int) -> "FeatureMoments":
        return cls(0, np.zeros(num_bins), np.zeros(num_bins))

    def add(self, feats: np.ndarray) -> None:
        self.frames += len(feats)
        self.total += feats.sum(axis=0, dtype=np.float64)
        self.total_sq += np.square(feats, dtype=np.float64).sum(axis=0)

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        return FeatureMoments(self.frames + other.frames, self.total + other.total,
                              self.total_sq + other.total_sq)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if self.frames == 0:
            return np.zeros_like(self.total), np.ones_like(self.total)
        mean = self.total / self.frames
        var = np.maximum(self.total_sq / self.frames - mean ** 2, 0.0)
        return mean, np.sqrt(var)
