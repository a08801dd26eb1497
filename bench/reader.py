"""bench/reader: end-to-end reader throughput per core against a decode-and-features ceiling.

    python -m bench.reader [--utterances 5000] [--repeats 3]

One process, one core, side by side on the same packed corpus (local disk, page-cached):
- reader: ShardDataset iterated in-process (read row groups, verify CRC32, decode,
  features, pad and collate batches), with its prefetch thread and without its decoding
  thread (`decode_ahead`, which adds a second core where one is spare);
- ceiling: a bare loop over audio bytes already in memory: decode + features only;
- augmented: the reader with conf/ds2_base.yaml's augmentation (speed, volume, SpecAugment)
  and noise from a packed 60-utterance corpus, in every utterance (noise_probability 1).
Both readers read epoch 1 (speed is drawn from epoch 1 on); rates count the clean audio seconds.
Goals: reader >= 90% of the ceiling, and >= 1000x real time per core (issue 30: augmented
>= 85% of the reader).
"""

from __future__ import annotations

import os
import time

from bench.common import ROOT, WORK, bench_args, corpus, median, spark_pack, write_result
from dataclasses import replace

from hdfs_io.format.dataset import open_dataset
from hdfs_io.reader.shard_reader import ReaderConfig, ShardDataset
from hdfs_io.speech.augmentation import AugmentConfig
from hdfs_io.speech.features import FeatureConfig, features_from_bytes
from trainer.config import load_config


def run_reader(uri: str, augment: AugmentConfig = AugmentConfig()) -> tuple[float, float]:
    # per core: no decoding thread beside the reading one (hdfs_io.reader.decode_ahead uses a spare core)
    ds = ShardDataset(uri, 0, 1, ReaderConfig(augment=augment, decode_ahead=False))
    ds.set_epoch(1)  # speed is drawn from epoch 1 on
    started = time.perf_counter()
    audio = sum(sum(b["durations"]) for b in ds)
    return audio, time.perf_counter() - started


def run_ceiling(records: list[bytes], audio: float) -> tuple[float, float]:
    cfg = FeatureConfig()
    started = time.perf_counter()
    for data in records:
        features_from_bytes(data, cfg)
    return audio, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    root = corpus(args.utterances)
    uri = str(WORK / f"packed-{args.utterances}")
    if not os.path.exists(f"{uri}/dataset.json"):
        spark_pack("local[2]", str(root), uri)
    noise = str(WORK / "packed-noise-60")
    if not os.path.exists(f"{noise}/dataset.json"):
        spark_pack("local[2]", str(corpus(60, seed=8)), noise)
    augment = replace(load_config(ROOT / "conf" / "ds2_base.yaml").augment, noise=noise, noise_probability=1.0)
    ds = open_dataset(uri)
    records = [audio for shard in range(len(ds.manifest["shards"])) for _, audio in ds.shard_records(shard)]
    total_audio = ds.manifest["hours"] * 3600
    os.environ["OMP_NUM_THREADS"] = "1"
    runs = {"reader": [], "ceiling": [], "augmented": []}
    for _ in range(args.repeats):
        runs["reader"].append(run_reader(uri)[1])
        runs["ceiling"].append(run_ceiling(records, total_audio)[1])
        runs["augmented"].append(run_reader(uri, augment)[1])
    rows = {name: {"median_s": median(t), "runs_s": t, "audio_seconds_per_s": total_audio / median(t)}
            for name, t in runs.items()}
    result = {"utterances": ds.manifest["utterances"], "audio_hours": ds.manifest["hours"], "rows": rows,
              "reader_vs_ceiling": rows["ceiling"]["median_s"] / rows["reader"]["median_s"],
              "augmented_vs_reader": rows["reader"]["median_s"] / rows["augmented"]["median_s"],
              "augmentation": augment.describe(),
              "goal": "reader >= 90% of ceiling and >= 1000x real time per core; augmented >= 85% of reader"}
    path = write_result("reader", result)
    for name, r in rows.items():
        print(f"{name:8s} {r['median_s']:7.2f} s  {r['audio_seconds_per_s']:7.0f} audio-s/s (x real time)")
    print(f"reader / ceiling = {100 * result['reader_vs_ceiling']:.1f}%, augmented / reader = "
          f"{100 * result['augmented_vs_reader']:.1f}% -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
