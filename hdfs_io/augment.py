"""Writes one utterance as training reads it in an epoch, augmented: a WAV to listen to and a PNG to look at.

    python -m hdfs_io.augment DATASET --key KEY --epoch E [--conf conf/ds2_tiny.yaml] --out DIR

writes one utterance as training reads it in epoch E: DIR/KEY.e<E>.wav to listen to, and
DIR/KEY.e<E>.png, its normalized features with SpecAugment's masks, to look at.
Every draw is a function of (seed, epoch, utterance id): hdfs_io.speech.augmentation.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from hdfs_io import prog
from hdfs_io.speech.audio import resample, to_mono
from hdfs_io.speech.augmentation import mask_features, perturbed_audio, spec_masks
from hdfs_io.speech.speed import features_at, perturbed_length


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("hdfs_io.augment"), description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="packed dataset URI")
    p.add_argument("--key", required=True, help="the utterance's key")
    p.add_argument("--epoch", type=int, default=1, help="speed is drawn from epoch 1 on (default 1)")
    p.add_argument("--conf", help="training config whose augment:, features: and train.seed apply (default: "
                                  "conf/ds2_tiny.yaml); overrides such as --augment.gain_db=3 follow it")
    p.add_argument("--out", required=True, help="local folder for KEY.eE.wav and KEY.eE.png")
    args, overrides = p.parse_known_args(argv)
    if args.epoch < 0:
        p.error("--epoch must be >= 0")
    from pathlib import Path

    from hdfs_io.format import dataset_format as F
    from hdfs_io.format.dataset_format import CorruptRecord, StorageUnavailable
    from hdfs_io.fs.filesystem import FilesystemUnavailable
    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.conf or Path(__file__).resolve().parents[1] / "conf" / "ds2_tiny.yaml", overrides)
        print(f"augment: {write_perturbed(args.dataset, args.key, args.epoch, cfg, Path(args.out))}")
    except (ConfigError, F.DatasetError, FilesystemUnavailable, PermissionError, CorruptRecord,
            StorageUnavailable) as e:
        print(f"augment: error: {e}", file=sys.stderr)
        return 2
    return 0


def write_perturbed(uri: str, key: str, epoch: int, cfg, out) -> str:
    """Writes utterance `key` as training config `cfg` reads it in `epoch`: OUT/KEY.eE.wav and .png; says what.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: the dataset has no such key, or is not a dataset; and the
            errors of ShardDataset and of reading the noise.
    """
    import soundfile

    from hdfs_io.format import dataset_format as F
    from hdfs_io.fs.filesystem import probe_uri
    from hdfs_io.reader.planner import PlanConfig
    from hdfs_io.reader.reader_config import ReaderConfig
    from hdfs_io.reader.shard_reader import ShardDataset

    probe_uri(uri)
    aug, rate, seed = cfg.augment, cfg.features.sample_rate, cfg.train.seed
    reader = ShardDataset(uri, 0, 1, ReaderConfig(plan=PlanConfig(seed=seed), feature=cfg.features, augment=aug))
    try:
        got = reader.get(key)
    except KeyError:
        raise F.DatasetError(f"{uri} has no utterance {key!r}") from None
    signal, speed = perturbed_audio(aug, seed, epoch, got["id"], to_mono(got["samples"]), got["sample_rate"], rate)
    mean, std, _ = reader.normalization()
    feats = (features_at(signal, cfg.features, speed) - mean) / std
    masks = spec_masks(aug, seed, epoch, got["id"], len(feats), feats.shape[1])
    feats = mask_features(torch.from_numpy(feats[None]), torch.from_numpy(masks[None]))[0].numpy()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{key.replace('/', '_')}.e{epoch}"
    # training plays the speed in its features (hdfs_io.speech.speed); to listen, soxr plays it
    signal = resample(signal, rate * speed, rate)[:perturbed_length(len(signal), speed)]
    soundfile.write(f"{stem}.wav", np.clip(signal, -1, 1), rate, subtype="PCM_16")
    write_image(f"{stem}.png", feats, f"{key}, epoch {epoch}: speed {speed:g}, {len(masks)} mask(s)")
    return (f"{key} in epoch {epoch} (augmentation: {aug.describe()}): speed {speed:g}, {len(signal) / rate:.2f} s, "
            f"{len(masks)} mask(s); wrote {stem}.wav and {stem}.png")


def write_image(path: str, feats: np.ndarray, title: str) -> None:
    """Writes normalized features (frames, bins) as a PNG: time across, low bins at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, len(feats) / 60), 3.5))
    shown = ax.imshow(feats.T, origin="lower", aspect="auto", interpolation="nearest", cmap="magma")
    ax.set(xlabel="frame", ylabel="bin", title=title)
    fig.colorbar(shown, ax=ax, label="normalized log power")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
