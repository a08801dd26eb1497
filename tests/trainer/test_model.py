"""trainer.model and trainer.config: features on device match the packer's, shapes, strict config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hdfs_io.speech.features import FeatureConfig, log_features
from hdfs_io.speech.speed import features_at
from trainer.config import ConfigError, load_config
from trainer.model import DeepSpeech2, LogMel, ModelConfig

ROOT_CONF = "conf/ds2_tiny.yaml"


def test_torch_features_match_the_numpy_features_used_for_statistics():
    cfg = FeatureConfig()
    rng = np.random.default_rng(0)
    signal = (0.1 * rng.standard_normal(16000)).astype(np.float32)

    ours, frames = LogMel(cfg)(torch.from_numpy(signal)[None], torch.tensor([16000]))

    reference = log_features(signal, cfg)
    assert ours.shape[1] == reference.shape[0] == frames.item()
    np.testing.assert_allclose(ours[0].numpy(), reference, atol=2e-3, rtol=1e-3)


def test_spec_masks_change_the_features_in_training_only():
    model = DeepSpeech2(ModelConfig(conv_channels=4, rnn_layers=2, rnn_hidden=16), FeatureConfig(), list(" AB"))
    wave, lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    masks = torch.tensor([[[0, 10, 20], [1, 5, 30]], [[0, 0, 0], [1, 0, 0]]])  # the second masks nothing
    seen = []
    model.conv.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].clone()))

    model.train()
    model(wave, lengths, masks)
    model(wave, lengths)
    model.eval()
    model(wave, lengths, masks)

    masked, clean, evaluated = seen
    assert (masked[0, :, 10:30] == 0).all() and (masked[0, 5:35] == 0).all()
    assert torch.equal(masked[1], clean[1]) and torch.equal(evaluated, clean)


def test_model_outputs_ctc_log_probs_with_lengths_within_the_output():
    model = DeepSpeech2(ModelConfig(conv_channels=4, rnn_layers=2, rnn_hidden=16), FeatureConfig(), list(" AB"))
    wave = torch.randn(3, 24000)
    lengths = torch.tensor([24000, 16000, 8000])

    log_probs, out_lengths = model(wave, lengths)

    assert log_probs.shape[1:] == (3, 4)
    assert out_lengths.tolist() == sorted(out_lengths.tolist(), reverse=True)
    assert out_lengths.max().item() == log_probs.shape[0]
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]), atol=1e-4)


def test_config_rejects_unknown_keys_and_applies_overrides():
    cfg = load_config(ROOT_CONF, ["--train.lr=3e-4", "--model.rnn_layers=4"])
    assert (cfg.train.lr, cfg.model.rnn_layers) == (3e-4, 4)

    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ROOT_CONF, ["--train.learning_rate=1"])
    with pytest.raises(ConfigError, match="not a int"):
        load_config(ROOT_CONF, ["--model.rnn_layers=many"])


def test_lr_schedule_warms_up_then_decays_to_zero():
    from trainer.model import cosine_with_warmup

    values = [cosine_with_warmup(p / 100, 0.1) for p in range(101)]

    assert values[:10] == sorted(values[:10]) and values[10] == pytest.approx(1.0)
    assert values[10:] == sorted(values[10:], reverse=True) and values[-1] == pytest.approx(0.0)


def test_torch_features_of_waveforms_at_their_speeds_match_the_readers():
    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 12000, 9000, 300)]
    speeds = [1.1, 1.0, 0.9, 0.9]
    for cfg in (FeatureConfig(), FeatureConfig(kind="log_spectrogram", window_ms=20.0, hop_ms=10.0, n_fft=320),
                FeatureConfig(hop_ms=9.3)):  # the last: a hop of 149 samples, a step of 134.1 at 0.9: gathered
        padded = torch.zeros(len(waves), max(map(len, waves)))
        for i, w in enumerate(waves):
            padded[i, :len(w)] = torch.from_numpy(w)

        lengths = torch.tensor([len(w) for w in waves])
        ours, frames = LogMel(cfg)(padded, lengths, torch.tensor(speeds, dtype=torch.float64))

        for i, (w, speed) in enumerate(zip(waves, speeds)):
            reference = features_at(w, cfg, speed)
            assert frames[i].item() == len(reference)
            np.testing.assert_allclose(ours[i, :len(reference)].numpy(), reference, atol=2e-3, rtol=1e-3)
        assert torch.isfinite(ours).all() and ours.shape[1] == frames.max()


@pytest.mark.parametrize("cfg", [FeatureConfig(), FeatureConfig(n_fft=416), FeatureConfig(kind="log_spectrogram", n_fft=416)])
def test_rows_at_speed_one_in_a_perturbed_batch_are_the_recorded_features_in_float32_under_autocast(cfg):
    rng = np.random.default_rng(2)
    wave = torch.from_numpy((0.5 * rng.standard_normal((3, 12000))).astype(np.float32))
    lengths, speeds = torch.tensor([12000, 12000, 8000]), torch.tensor([1.0, 1.1, 1.0], dtype=torch.float64)
    logmel = LogMel(cfg)

    recorded, _ = logmel(wave, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, frames = logmel(wave, lengths, speeds)

    assert mixed.dtype == torch.float32
    for i in (0, 2):
        n = int(frames[i])
        np.testing.assert_allclose(mixed[i, :n].numpy(), recorded[i, :n].numpy(), atol=2e-3, rtol=1e-3)
