"""Speed perturbation where the features are computed: the frames of the signal played `speed` times as fast,
taken from the signal as it is, with no resampling.

Played `speed` times as fast, a signal's sample n is the original's sample n * speed. So a feature frame of
the perturbed signal (a window of `window_samples` every `hop_samples`) is a window of window_samples * speed
of the original every hop_samples * speed, and its frequency f is the original's f / speed. The frames are cut
that long, transformed with about n_fft * speed points, and their power is projected onto the features' bins
at the scaled frequencies, scaled so that each bin holds the power it holds in the perturbed signal.

Against the features of the same audio resampled by soxr, as Kaldi's speed perturbation makes it:
- exact (to 0.001 of a log unit) where n_fft * speed is a whole transform size, as for conf/ds2_base.yaml's
  spectrogram at 0.9 and 1.1 (288 and 352 points);
- elsewhere the transform takes the next size the FFT is fast at, so its bins lie up to 4% off the perturbed
  signal's: for the default log-mel at 0.9 and 1.1, a median 0.02 and a 95th percentile 0.23 of a log unit apart
  on 60 utterances of speech (tests/hdfs_io/test_speed.py bounds both on a synthetic voice);
- soxr rolls off above 91% of the Nyquist frequency and this does not, which moves the top 10% of the bins.
Drawn among 0.9 / 1.0 / 1.1, it adds about 60 us to an utterance of 3 s read into features, where soxr's
resample took 0.26 ms for 2 s (bench/README, reader).

The reader computes features this way (`features_at`) and the trainer on its device (trainer.model.LogMel),
from the same frame starts and projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hdfs_io.speech.features import LOG_FLOOR, FeatureConfig, log_features, mel_weights, num_frames

# numpy's FFT is fastest at sizes of these factors (per frame, 480 points took 0.98x the time of 512, 462 1.4x and
# 563, a prime, 3.5x); a size of these is taken where it makes the bins exact
FAST_FACTORS, EXACT_FACTORS = (2, 3, 5), (2, 3, 5, 7, 11)


def perturbed_length(samples: int, speed: float) -> int:
    """Returns how many samples a signal of `samples` samples has when played `speed` times as fast."""
    return int(samples / speed)


@dataclass(frozen=True)
class Stretch:
    """Where the frames of a signal played `speed` times as fast lie in the signal as it is."""
    offset: float  # of frame 0's window (the window sits in the middle of the n_fft frame)
    step: float  # from one frame's window to the next
    window: int  # samples in a frame's window
    n_dft: int  # points of its transform


@lru_cache(maxsize=32)
def stretch(cfg: FeatureConfig, speed: float) -> Stretch:
    """Returns the frames' geometry for `speed`; at 1.0 exactly the features' own."""
    window, points = int(round(cfg.window_samples * speed)), cfg.n_fft * speed
    if speed == 1.0 or (points.is_integer() and smooth(int(points), EXACT_FACTORS)):
        n_dft = int(points)  # the bins fall exactly on the perturbed signal's
    else:  # the next size the FFT is fastest at, twice as many for a spectrogram, whose bins are read between them
        n_dft = next_smooth(points * (2 if cfg.kind == "log_spectrogram" else 1))
    return Stretch((cfg.n_fft - cfg.window_samples) // 2 * speed, cfg.hop_samples * speed, window,
                   n_dft if n_dft >= window else next_smooth(window))


def next_smooth(n: float) -> int:
    """Returns the least integer >= n whose prime factors are all in FAST_FACTORS."""
    m = max(1, math.ceil(n))
    while not smooth(m, FAST_FACTORS):
        m += 1
    return m


def smooth(m: int, factors: tuple[int, ...]) -> bool:
    for p in factors:
        while m % p == 0:
            m //= p
    return m == 1


def frame_starts(st: Stretch, frames: int) -> np.ndarray:
    """Returns the first sample of each frame's window, rounded to the nearest sample."""
    return np.floor(st.offset + np.arange(frames) * st.step + 0.5).astype(np.int64)


@lru_cache(maxsize=32)
def hann(window: int) -> np.ndarray:
    """Returns the periodic Hann window of `window` samples, as the features use."""
    out = np.hanning(window + 1)[:-1].astype(np.float32)
    out.flags.writeable = False  # shared between calls
    return out


@lru_cache(maxsize=32)
def padded_hann(window: int, n_dft: int) -> np.ndarray:
    """Returns `hann(window)` followed by zeros, `n_dft` long."""
    out = np.zeros(n_dft, np.float32)
    out[:window] = hann(window)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=32)
def speed_projection(cfg: FeatureConfig, speed: float) -> np.ndarray:
    """Returns the (bins, n_dft // 2 + 1) map from a stretched frame's power to the perturbed signal's features.

    Power at the original's frequency f is power at f * speed once played faster, divided by speed ** 2 (the
    perturbed frame's window is 1 / speed as long); a mel band sums its bins at the scaled frequencies,
    which lie n_fft / (n_dft * speed) times as densely as the features' own bins.
    """
    st = stretch(cfg, speed)
    bins = np.arange(st.n_dft // 2 + 1)
    if cfg.kind == "log_mel":
        hz = speed * bins * cfg.sample_rate / st.n_dft
        out = mel_weights(hz, cfg.sample_rate, cfg.n_mels) * np.float32(cfg.n_fft / (st.n_dft * speed))
    else:  # each of the features' bins, interpolated between the two stretched bins around its frequency
        at = np.arange(cfg.n_fft // 2 + 1) * st.n_dft / (cfg.n_fft * speed)
        out = np.maximum(0.0, 1.0 - np.abs(at[:, None] - bins[None, :])) / speed ** 2
        out = out.astype(np.float32)
    out.flags.writeable = False
    return out


def features_at(signal: np.ndarray, cfg: FeatureConfig, speed: float) -> np.ndarray:
    """Returns the features (frames, bins) of a mono signal at `cfg.sample_rate` played `speed` times as fast:
    num_frames(perturbed_length(len(signal), speed)) frames."""
    if speed == 1.0:
        return log_features(signal, cfg)
    st = stretch(cfg, speed)
    starts = frame_starts(st, num_frames(perturbed_length(len(signal), speed), cfg))
    end = int(starts[-1]) + st.n_dft  # frames as long as the transform, the window zero-padded: the FFT pads nothing
    if len(signal) < end:
        signal = np.pad(signal, (0, end - len(signal)))
    if float(st.step).is_integer():  # a view: no copy, no index
        framed = np.lib.stride_tricks.sliding_window_view(signal[starts[0]:], st.n_dft)[::int(st.step)][:len(starts)]
    else:
        framed = signal[starts[:, None] + np.arange(st.n_dft)]
    spectrum = np.fft.rfft(framed * padded_hann(st.window, st.n_dft))
    power = (spectrum.real ** 2 + spectrum.imag ** 2) @ speed_projection(cfg, speed).T
    return np.log(power + LOG_FLOOR).astype(np.float32)
