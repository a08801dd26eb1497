"""hdfs_io.speech.speed: features of a signal played faster or slower, computed from the signal as it is, against
the features of the same signal resampled by soxr."""

from __future__ import annotations

import numpy as np
import pytest

from hdfs_io.speech.audio import resample
from hdfs_io.speech.features import FeatureConfig, log_features, num_frames
from hdfs_io.speech.speed import Stretch, features_at, perturbed_length, stretch

RATE = 16000


def voiced(seconds: float, seed: int = 0) -> np.ndarray:
    """A speech-like signal: harmonics of a gliding 100-250 Hz pitch under moving formants, with breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 175 + 75 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    formants = [500 + 300 * np.sin(2 * np.pi * 1.3 * t), 1500 + 600 * np.sin(2 * np.pi * 0.9 * t), 2800.0]
    out = np.zeros_like(t)
    for h in range(1, 40):
        hz = h * pitch
        gain = sum(np.exp(-((hz - f) / 150) ** 2) for f in formants) + 0.02
        out += np.where(hz < RATE / 2, gain * np.sin(h * phase), 0.0)
    out += 0.01 * rng.standard_normal(len(t))
    return (0.1 * out / np.abs(out).max()).astype(np.float32)


def resampled_features(signal: np.ndarray, cfg: FeatureConfig, speed: float) -> np.ndarray:
    """The features of the signal played `speed` times as fast, made by soxr as Kaldi's speed perturbation makes it."""
    played = resample(signal, RATE * speed, RATE)[:perturbed_length(len(signal), speed)]
    return log_features(played, cfg)


DS2_BASE = FeatureConfig(kind="log_spectrogram", window_ms=20.0, hop_ms=10.0, n_fft=320)  # conf/ds2_base.yaml


@pytest.mark.parametrize("cfg, speed, exact", [
    (DS2_BASE, 0.9, True), (DS2_BASE, 1.1, True), (DS2_BASE, 0.93, False),
    (FeatureConfig(), 0.9, False), (FeatureConfig(), 1.1, False), (FeatureConfig(), 1.25, True),
    (FeatureConfig(), 0.93, False), (FeatureConfig(kind="log_spectrogram"), 1.1, False)])
def test_features_at_a_speed_are_those_of_the_signal_resampled_by_soxr(cfg, speed, exact):
    signal = voiced(2.3, seed=int(speed * 100))

    ours, reference = features_at(signal, cfg, speed), resampled_features(signal, cfg, speed)

    assert ours.shape == reference.shape == (num_frames(perturbed_length(len(signal), speed), cfg), cfg.num_bins)
    below = int(cfg.num_bins * 0.9)  # soxr rolls off above 91% of the Nyquist frequency; these do not
    heard = reference[:, :below] > reference.max() - np.log(1e6)  # within 60 dB of the loudest
    apart = np.abs(ours[:, :below] - reference[:, :below])[heard]
    # exact: n_fft, the window and the hop times the speed are whole samples; otherwise the transform's bins
    # lie up to 4% off the perturbed signal's and the frames up to half a sample off: most apart between harmonics
    median, p95 = (0.005, 0.02) if exact else (0.06, 0.8)
    assert np.median(apart) < median and np.percentile(apart, 95) < p95, (np.median(apart), np.percentile(apart, 95))


def test_a_tone_played_faster_lands_where_the_faster_tone_is_with_its_power():
    cfg = FeatureConfig()
    t = np.arange(RATE) / RATE

    faster = features_at((0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), cfg, 1.1)
    direct = log_features((0.3 * np.sin(2 * np.pi * 1100 * t)).astype(np.float32), cfg)

    middle = faster[len(faster) // 2]
    assert np.argmax(middle) == np.argmax(direct[len(direct) // 2])
    assert middle.max() == pytest.approx(direct[len(direct) // 2].max(), abs=0.05)


def test_speed_one_is_the_features_themselves_and_short_signals_give_one_frame():
    cfg, signal = FeatureConfig(), voiced(0.5)

    assert np.array_equal(features_at(signal, cfg, 1.0), log_features(signal, cfg))
    assert features_at(signal[:300], cfg, 0.9).shape == (1, cfg.num_bins)
    for cfg in (FeatureConfig(), FeatureConfig(n_fft=416), FeatureConfig(kind="log_spectrogram", n_fft=416)):
        assert stretch(cfg, 1.0) == Stretch(offset=(cfg.n_fft - cfg.window_samples) // 2, step=cfg.hop_samples,
                                            window=cfg.window_samples, n_dft=cfg.n_fft)  # 416 = 2^5 x 13


def test_transforms_are_exact_where_the_sizes_allow_and_fast_elsewhere():
    assert [stretch(FeatureConfig(), s).n_dft for s in (0.9, 1.1, 1.25, 1.0)] == [480, 576, 640, 512]
    assert [stretch(DS2_BASE, s).n_dft for s in (0.9, 1.1)] == [288, 352]  # exact: 320 x 0.9 and x 1.1
    assert stretch(DS2_BASE, 0.93).n_dft == 600  # 297.6 x 2, rounded up to 2^3 x 3 x 5^2
