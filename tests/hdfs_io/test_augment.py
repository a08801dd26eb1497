"""hdfs_io.speech.augmentation on synthetic signals: draws that depend on (seed, epoch, id) only, and what each
perturbation does."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from hdfs_io.reader.planner import PlanConfig, plan_epoch
from hdfs_io.reader.shard_reader import planned_durations
from hdfs_io.speech.features import FeatureConfig, num_frames
from hdfs_io.speech.speed import features_at, perturbed_length
from hdfs_io.speech.augmentation import (AugmentConfig, NoiseBank, add_noise, mask_features, noise_for, perturbed_audio,
                                         spec_masks, speed_factors, uniforms, zero_masks)

AUG = AugmentConfig(speeds=(0.9, 1.0, 1.1), gain_db=6.0, frequency_masks=2, frequency_mask_bins=10, time_masks=2,
                    time_mask_fraction=0.1)


def tone(hz: float, seconds: float, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def perturbation(args) -> tuple[bytes, bytes]:
    """What a process computes for (seed, epoch, id): top level, so that a spawned process can run it."""
    seed, epoch, uid = args
    audio, speed = perturbed_audio(AUG, seed, epoch, uid, tone(300, 0.7, 22050), 22050, 16000)
    return audio.tobytes() + np.float64(speed).tobytes(), spec_masks(AUG, seed, epoch, uid, 70, 80).tobytes()


def test_the_same_seed_epoch_and_id_perturb_the_same_in_a_spawned_process():
    draws = [(0, 1, 5), (0, 1, 6), (3, 2, 5)]

    here = [perturbation(d) for d in draws]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pool.map(perturbation, draws)

    assert here == there
    assert len({audio for audio, _ in here}) == 3, "another id or seed drew the same perturbation"


def test_each_epoch_draws_again_and_every_factor_is_drawn_about_equally():
    ids = np.arange(30_000)

    one, two = (speed_factors(AUG, 0, epoch, ids) for epoch in (1, 2))

    assert 0.6 < np.mean(one != two) < 0.73  # two independent draws of three factors differ 2/3 of the time
    assert sorted(Counter_of(one)) == [0.9, 1.0, 1.1] and min(Counter_of(one).values()) > 9_500
    assert not np.array_equal(spec_masks(AUG, 0, 1, 7, 500, 80), spec_masks(AUG, 0, 2, 7, 500, 80))
    u = uniforms(0, 1, ids, 0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_one_utterances_draws_are_those_drawn_for_many():
    ids = np.array([0, 1, 7, 2**40, 2**63 - 1], np.uint64)
    for seed, epoch in [(0, 0), (3, 1), (2**31, 17)]:
        many = uniforms(seed, epoch, ids[:, None], np.arange(9))

        for i, uid in enumerate(ids.tolist()):
            assert np.array_equal(uniforms(seed, epoch, uid, np.arange(9)), many[i])
            assert np.array_equal(uniforms(seed, epoch, uid, 4), many[i, 4:5])
            assert np.array_equal(uniforms(seed, epoch, ids[i], np.arange(9)), many[i])  # a numpy scalar id


def Counter_of(values: np.ndarray) -> dict:
    found, counts = np.unique(values, return_counts=True)
    return dict(zip(found.round(3).tolist(), counts.tolist()))


@pytest.mark.parametrize("speed", [0.9, 1.1])
def test_speed_perturbation_scales_length_and_pitch_like_sox_speed(speed):
    aug, cfg = AugmentConfig(speeds=(speed,)), FeatureConfig(kind="log_spectrogram")

    out, played = perturbed_audio(aug, 0, 1, 0, tone(440, 1.0, 16000), 16000, 16000)
    feats = features_at(out, cfg, played)  # as the reader and the trainer's device compute them

    assert played == speed and len(out) == 16000
    assert len(feats) == num_frames(int(16000 / speed), cfg)
    peak_hz = np.argmax(feats[len(feats) // 2]) * 16000 / cfg.n_fft
    assert abs(peak_hz - 440 * speed) <= 16000 / cfg.n_fft / 2


def test_the_planner_counts_every_perturbed_length_within_its_budget():
    rng = np.random.default_rng(0)
    n = 600
    rate_of = np.array([8000, 16000, 22050, 44100])[np.arange(n) % 4]
    lengths = (rng.uniform(1.0, 3.0, n) * rate_of).astype(np.int64)
    durations = lengths / rate_of
    cfg = PlanConfig(batch_seconds=20.0, window_utterances=64)

    planned = planned_durations(AUG, 0, 1, durations)
    plan = plan_epoch(planned, np.zeros(n, np.int32), np.arange(n, dtype=np.int32), 2, 1, cfg)
    produced = np.array([played_seconds(*perturbed_audio(AUG, 0, 1, u, np.zeros(m, np.float32), r, 16000))
                         for u, (m, r) in enumerate(zip(lengths, rate_of))])

    assert (produced <= planned).all(), "the reader made an utterance longer than planned"
    for rank in plan.ranks:
        for batch in rank.batches:
            assert len(batch) * produced[batch].max() <= cfg.batch_seconds


def played_seconds(signal: np.ndarray, speed: float) -> float:
    return perturbed_length(len(signal), speed) / 16000


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_noise_is_added_at_the_drawn_snr(gain):
    signal, noise = tone(300, 1.0, 16000), np.random.default_rng(1).standard_normal(16000).astype(np.float32)

    mixed = add_noise(signal, noise, 12.0, gain)

    added = mixed - gain * signal
    assert 10 * np.log10(np.mean((gain * signal).astype(np.float64) ** 2) / np.mean(added.astype(np.float64) ** 2)) \
        == pytest.approx(12.0, abs=0.01)


def test_a_noise_clip_shorter_than_the_utterance_is_repeated_and_a_longer_one_cut():
    bank = NoiseBank(np.arange(10, dtype=np.float32), np.array([0, 4, 10]))

    short = noise_for(bank, 9, 0.1, 0.5)  # clip 0: 0 1 2 3, from 2
    long = noise_for(bank, 3, 0.9, 0.99)  # clip 1: 4..9, the last 3

    assert short.tolist() == [2, 3, 0, 1, 2, 3, 0, 1, 2] and long.tolist() == [7, 8, 9]


def test_a_noise_clip_that_resampling_left_empty_adds_silence():
    bank = NoiseBank(np.arange(4, dtype=np.float32), np.array([0, 0, 4]))  # clip 0 is empty

    assert noise_for(bank, 5, 0.1, 0.5).tolist() == [0.0] * 5


def test_spec_masks_lie_inside_the_features_and_zero_exactly_their_bands():
    masks = np.stack([spec_masks(AUG, 0, 1, u, 100, 80) for u in range(50)])
    feats = torch.ones(50, 120, 80)  # 20 padding frames past the utterances

    masked = mask_features(feats, torch.from_numpy(masks))
    one_by_one = [zero_masks(np.ones((100, 80), np.float32), m) for m in masks]  # as the reader masks its features

    assert masks.shape == (50, 4, 3)
    freq, time = masks[:, :2], masks[:, 2:]
    assert (freq[..., 0] == 0).all() and (freq[..., 2] <= 10).all() and (freq[..., 1] + freq[..., 2] <= 80).all()
    assert (time[..., 0] == 1).all() and (time[..., 2] <= 10).all() and (time[..., 1] + time[..., 2] <= 100).all()
    for b in range(50):
        expect = torch.ones(120, 80)
        for axis, first, width in masks[b].tolist():
            if axis == 0:
                expect[:, first:first + width] = 0
            else:
                expect[first:first + width] = 0
        assert torch.equal(masked[b], expect) and np.array_equal(one_by_one[b], expect[:100].numpy())


def test_a_bad_augment_config_is_refused_and_a_good_one_described():
    with pytest.raises(ValueError, match="speeds"):
        AugmentConfig(speeds=(0.1,))
    with pytest.raises(ValueError, match="noise_snr_db"):
        AugmentConfig(noise_snr_db=(30.0, 10.0))

    assert AugmentConfig().describe() == "off" and not AugmentConfig().changes_audio
    assert AUG.describe() == ("speed 0.9/1/1.1, volume +-6 dB, 2 frequency mask(s) <= 10 bins, "
                              "2 time mask(s) <= 10% of frames")


def test_speed_is_drawn_from_epoch_one_on_so_that_sortagrad_keeps_the_packed_order():
    durations = np.linspace(1.0, 9.0, 1000).astype(np.float32)

    assert (speed_factors(AUG, 0, 0, np.arange(1000)) == 1.0).all()
    assert planned_durations(AUG, 0, 0, durations) is durations  # a duration-layout index stays in order
    assert not np.array_equal(planned_durations(AUG, 0, 1, durations), durations)


@pytest.mark.parametrize("bad", [{"gain_db": float("inf")}, {"noise_snr_db": (float("nan"), 3.0)},
                                 {"speeds": (float("nan"),)}])
def test_settings_that_are_not_finite_are_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        AugmentConfig(**bad)
