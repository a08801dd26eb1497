"""Augmentation: each utterance's perturbation, a pure function of (seed, epoch, utterance id).

Speed (Kaldi's 0.9 / 1.0 / 1.1, applied where the features are computed: hdfs_io.speech.speed), volume,
additive noise from a dataset packed by spark_jobs/pack.py at an SNR drawn from a range, and SpecAugment's
frequency and time masks.
Every draw comes from a hash of (seed, epoch, utterance id, what is drawn), never from a process's
random state, so an utterance gets the same perturbation in the rank, in a forked or spawned
worker, on any world size or number of workers, and after a resume or an elastic resume. Speed
changes a duration, so the planner plans epoch e with the durations at their drawn speeds
(hdfs_io.reader.shard_reader.planned_durations): batches keep to `batch_seconds` with the lengths
the reader will produce. Speed is drawn from epoch 1 on: epoch
0 is SortaGrad's shortest-first pass over the durations as packed, which a duration-layout index
already holds in order (at 30M utterances a re-sort would cost a rank 600 MB and seconds at start).

`python -m hdfs_io.augment` writes one utterance as training reads it, to listen to and look at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from hdfs_io.speech.audio import BadAudio, decode, resample, to_mono

# What is drawn, each from its own stream of the hash.
SPEED, GAIN, NOISE_ON, NOISE_CLIP, NOISE_OFFSET, NOISE_SNR, MASKS = range(7)
NOISE_MAX_SECONDS = 1800.0  # every worker decodes the noise and holds it: 30 min is 115 MB of 16 kHz float32
FREQUENCY, TIME = 0, 1  # a mask's axis


@dataclass(frozen=True)
class AugmentConfig:
    speeds: tuple[float, ...] = ()  # speed factors, each drawn with equal chance (Kaldi: 0.9, 1.0, 1.1); () is off
    gain_db: float = 0.0  # volume: a gain drawn uniformly in +-gain_db
    noise: str = ""  # URI of a packed dataset of noise (or of other speech: babble); "" is none
    noise_probability: float = 1.0  # the share of utterances noise is added to
    noise_snr_db: tuple[float, float] = (10.0, 30.0)  # the signal-to-noise ratio, drawn uniformly in this range
    frequency_masks: int = 0  # SpecAugment: masks of frequency bins per utterance ...
    frequency_mask_bins: int = 27  # ... each at most this many bins wide (SpecAugment's F)
    time_masks: int = 0  # masks of frames per utterance ...
    time_mask_fraction: float = 0.05  # ... each at most this fraction of the utterance's frames (SpecAugment's p)

    def __post_init__(self):
        numbers = [*self.speeds, self.gain_db, self.noise_probability, *self.noise_snr_db, self.time_mask_fraction]
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError("augment settings must be finite numbers")
        if any(not 0.5 <= s <= 2.0 for s in self.speeds):
            raise ValueError(f"speeds must lie in [0.5, 2], not {list(self.speeds)}")
        low, high = self.noise_snr_db if len(self.noise_snr_db) == 2 else (1, 0)
        if low > high:
            raise ValueError(f"noise_snr_db must be [low, high], not {list(self.noise_snr_db)}")
        if (self.gain_db < 0 or not 0 <= self.noise_probability <= 1 or self.frequency_masks < 0
                or self.time_masks < 0 or self.frequency_mask_bins < 0 or not 0 <= self.time_mask_fraction <= 1):
            raise ValueError("gain_db, the mask counts and widths must be >= 0, and noise_probability and "
                             "time_mask_fraction within [0, 1]")

    @property
    def changes_audio(self) -> bool:
        """Whether the waveform is perturbed (a feature cache of the clean audio does not serve it)."""
        return bool(self.speeds or self.gain_db or self.noise)

    @property
    def masks(self) -> int:
        return self.frequency_masks + self.time_masks

    def describe(self) -> str:
        """Returns what is on, in one phrase, for the trainer's first line and the demo's report."""
        parts = []
        if self.speeds:
            parts.append(f"speed {'/'.join(f'{s:g}' for s in self.speeds)}")
        if self.gain_db:
            parts.append(f"volume +-{self.gain_db:g} dB")
        if self.noise:
            low, high = self.noise_snr_db
            parts.append(f"noise from {self.noise} on {100 * self.noise_probability:g}% at {low:g}-{high:g} dB SNR")
        if self.frequency_masks:
            parts.append(f"{self.frequency_masks} frequency mask(s) <= {self.frequency_mask_bins} bins")
        if self.time_masks:
            parts.append(f"{self.time_masks} time mask(s) <= {100 * self.time_mask_fraction:g}% of frames")
        return ", ".join(parts) or "off"


MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix(z):
    """splitmix64's finalizer, on a Python int or a uint64 array (which wraps, as it must)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, ids, draw) -> np.ndarray:
    """Returns one uniform number in [0, 1) per utterance id and draw (broadcast): a pure function of
    (seed, epoch, id, draw). One utterance's draws come in one call as `uniforms(seed, epoch, uid, range(n))`."""
    if isinstance(ids, (int, np.integer)) and np.ndim(draw) <= 1:  # one utterance: in Python ints, 3x faster
        uid = (int(ids) + 1) * GOLDEN
        return np.array([(_mix((uid + key) & MASK64) >> 11) * 2.0 ** -53
                         for key in draw_keys(seed, epoch, tuple(np.atleast_1d(draw).tolist()))])
    base = _mix((_mix((seed * GOLDEN + 1) & MASK64) + epoch) & MASK64)
    keys = _mix(np.uint64(base) + np.atleast_1d(np.asarray(draw)).astype(np.uint64) * np.uint64(GOLDEN))
    ids = np.atleast_1d(np.asarray(ids)).astype(np.uint64)
    z = _mix((ids + np.uint64(1)) * np.uint64(GOLDEN) + keys)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@lru_cache(maxsize=64)
def draw_keys(seed: int, epoch: int, draws: tuple[int, ...]) -> tuple[int, ...]:
    """Returns the hash keys of draws `draws` in (seed, epoch), as `uniforms` makes them."""
    base = _mix((_mix((seed * GOLDEN + 1) & MASK64) + epoch) & MASK64)
    return tuple(_mix((base + d * GOLDEN) & MASK64) for d in draws)


def speed_drawn(cfg: AugmentConfig, epoch: int) -> bool:
    """Whether utterances get a drawn speed in `epoch`: from epoch 1 on, when speeds are configured."""
    return bool(cfg.speeds) and epoch > 0


def speed_factors(cfg: AugmentConfig, seed: int, epoch: int, ids) -> np.ndarray:
    """Returns each utterance's speed factor in this epoch (1.0 when speed perturbation is off, and in epoch 0)."""
    ids = np.atleast_1d(np.asarray(ids))
    if not speed_drawn(cfg, epoch):
        return np.ones(len(ids))
    return speed_of(cfg, uniforms(seed, epoch, ids, SPEED))


def speed_of(cfg: AugmentConfig, u: np.ndarray) -> np.ndarray:
    """Returns the speed factors that uniform draws `u` pick among `cfg.speeds`."""
    speeds = np.asarray(cfg.speeds, np.float64)
    return speeds[(u * len(speeds)).astype(np.int64)]


@dataclass(frozen=True)
class NoiseBank:
    """A noise dataset decoded once per process: its clips, mono at one sample rate, end to end."""
    samples: np.ndarray  # float32
    starts: np.ndarray  # clip i is samples[starts[i]:starts[i + 1]]

    @property
    def clips(self) -> int:
        return len(self.starts) - 1


@lru_cache(maxsize=2)
def noise_bank(uri: str, sample_rate: int) -> NoiseBank:
    """Returns the noise dataset at `uri`, decoded and resampled to `sample_rate`, read once per process.

    Raises:
        hdfs_io.format.dataset_format.CorruptRecord: a noise record does not decode (pack probed it: its bytes
            changed since).
        hdfs_io.format.dataset_format.StorageUnavailable: the filesystem did not serve it (not retried: it is read
            once).
        hdfs_io.format.dataset_format.DatasetError: see `noise_dataset`.
    """
    from hdfs_io.format.dataset_format import CorruptRecord, StorageUnavailable

    ds = noise_dataset(uri)
    clips = []
    try:
        for shard in range(len(ds.manifest["shards"])):
            for key, data in ds.shard_records(shard):
                try:
                    samples, rate = decode(data)
                except BadAudio as e:
                    raise CorruptRecord(f"noise dataset {uri}: {key}: {e}") from None
                clips.append(resample(to_mono(samples), rate, sample_rate))
    except OSError as e:
        raise StorageUnavailable(f"noise dataset {uri}: {e}") from None
    starts = np.r_[0, np.cumsum([len(c) for c in clips])]
    return NoiseBank(np.concatenate(clips).astype(np.float32), starts)


def noise_dataset(uri: str):
    """Returns the noise dataset opened, once dataset.json says it holds some audio and not too much.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: it is not a complete dataset, holds no audio, or holds more
            than NOISE_MAX_SECONDS.
    """
    from hdfs_io.format import dataset_format as F
    from hdfs_io.format.dataset import open_dataset

    ds = open_dataset(uri)
    seconds = ds.manifest["hours"] * 3600
    if not ds.manifest["utterances"] or seconds <= 0:
        raise F.DatasetError(f"noise dataset {uri} holds no audio")
    if seconds > NOISE_MAX_SECONDS:
        raise F.DatasetError(f"noise dataset {uri} holds {seconds / 60:.0f} min of audio; every reader worker "
                             f"decodes and holds all of it, so at most {NOISE_MAX_SECONDS / 60:.0f} min")
    return ds


def add_noise(signal: np.ndarray, noise: np.ndarray, snr_db: float, gain: float = 1.0) -> np.ndarray:
    """Returns `signal` plus `noise` (as long) scaled so that their power ratio is `snr_db`, times `gain`."""
    # powers by dot products: no squared copies (a quarter of the time; float32 sums are far within 0.01 dB)
    signal_power, noise_power = float(np.dot(signal, signal)) / len(signal), float(np.dot(noise, noise)) / len(noise)
    if signal_power == 0 or noise_power == 0:
        return signal * np.float32(gain)
    mixed = noise * np.float32(np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10))))
    mixed += signal
    if gain != 1.0:  # after the mix: the ratio is the same, and one array is made, not two
        mixed *= np.float32(gain)
    return mixed


def noise_for(bank: NoiseBank, length: int, clip_u: float, offset_u: float) -> np.ndarray:
    """Returns `length` samples of one clip of the bank, from a drawn offset, repeated if the clip is shorter;
    silence for a clip that resampling left empty."""
    i = min(int(clip_u * bank.clips), bank.clips - 1)
    clip = bank.samples[bank.starts[i]:bank.starts[i + 1]]
    if len(clip) == 0:
        return np.zeros(length, np.float32)
    if len(clip) >= length:
        at = int(offset_u * (len(clip) - length + 1))
        return clip[at:at + length]
    at = int(offset_u * len(clip))  # from there, round the clip: one copy
    return np.tile(clip, -(-(at + length) // len(clip)))[at:at + length]


def perturbed_audio(cfg: AugmentConfig, seed: int, epoch: int, uid: int, signal: np.ndarray, rate: int,
                    target_rate: int) -> tuple[np.ndarray, float]:
    """Returns a mono signal at `target_rate` as the reader trains on it in `epoch`, and the speed it is played
    at: resampled from `rate`, at its drawn volume, with its drawn noise; a pure function of (seed, epoch, uid).

    The speed is applied where the features are computed (hdfs_io.speech.speed), so noise mixed here is
    played at the same speed as the speech.
    """
    u = uniforms(seed, epoch, uid, np.arange(MASKS))  # every draw but the masks', in one call
    speed = float(speed_of(cfg, u[SPEED:SPEED + 1])[0]) if speed_drawn(cfg, epoch) else 1.0
    # soxr may round up; the planner counted duration / speed of the samples as recorded
    out = resample(signal, rate, target_rate)[:int(len(signal) * target_rate / rate)]
    gain = 10 ** ((2 * u[GAIN] - 1) * cfg.gain_db / 20) if cfg.gain_db else 1.0
    if cfg.noise and u[NOISE_ON] < cfg.noise_probability and len(out):
        bank = noise_bank(cfg.noise, target_rate)
        low, high = cfg.noise_snr_db
        out = add_noise(out, noise_for(bank, len(out), u[NOISE_CLIP], u[NOISE_OFFSET]),
                        low + u[NOISE_SNR] * (high - low), gain)
    elif gain != 1.0:
        out = out * np.float32(gain)
    return out.astype(np.float32, copy=False), speed


def spec_masks(cfg: AugmentConfig, seed: int, epoch: int, uid: int, frames: int, bins: int) -> np.ndarray:
    """Returns an utterance's SpecAugment masks as rows (axis, first, width): FREQUENCY masks first, then TIME.

    Widths are drawn in [0, most], positions so that each mask lies inside the features.
    """
    masks = np.zeros((cfg.masks, 3), np.int64)
    if not cfg.masks:
        return masks
    u = uniforms(seed, epoch, uid, MASKS + np.arange(2 * cfg.masks))  # a width and a place per mask
    for m in range(cfg.masks):
        axis = FREQUENCY if m < cfg.frequency_masks else TIME
        size = bins if axis == FREQUENCY else frames
        most = cfg.frequency_mask_bins if axis == FREQUENCY else int(cfg.time_mask_fraction * frames)
        most = min(most, size)
        width_u, first_u = float(u[2 * m]), float(u[2 * m + 1])
        width = min(int(width_u * (most + 1)), most)
        masks[m] = (axis, int(first_u * (size - width + 1)), width)
    return masks


def zero_masks(feats: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Sets one utterance's masks (`spec_masks`' rows) to 0 in its normalized features (frames, bins), in place,
    as `mask_features` sets them in a batch; returns the features."""
    for axis, first, width in masks.tolist():
        if axis == TIME:
            feats[first:first + width] = 0.0
        else:
            feats[:, first:first + width] = 0.0
    return feats


def mask_features(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Returns features (B, T, F) with each utterance's masks (B, M, 3 as from `spec_masks`) set to 0.

    Features are normalized, so 0 is each bin's mean, as SpecAugment masks them.
    """
    if masks.numel() == 0:
        return feats
    axis, first, width = (masks[..., i].to(feats.device)[:, :, None] for i in range(3))  # (B, M, 1)
    frames = torch.arange(feats.shape[1], device=feats.device)[None, None, :]
    bins = torch.arange(feats.shape[2], device=feats.device)[None, None, :]
    in_time = ((axis == TIME) & (frames >= first) & (frames < first + width)).any(1)  # (B, T)
    in_freq = ((axis == FREQUENCY) & (bins >= first) & (bins < first + width)).any(1)  # (B, F)
    return feats.masked_fill(in_time[:, :, None] | in_freq[:, None, :], 0.0)
