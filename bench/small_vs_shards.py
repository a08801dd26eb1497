"""bench/small_vs_shards: the same corpus read and decoded from HDFS as small files and as shards.

    make cluster-up && . .devcluster/env.sh && python -m bench.small_vs_shards [--utterances 5000]

Both sides use 2 processes and do the same work per utterance (read, decode to
float32, resample to 16 kHz mono): small files, one HDFS open per utterance,
split over a pool of 2 spawned processes; shards, the ShardDataset with 2
DataLoader workers producing waveform batches. Goal: shards >= 50x faster.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

from pyarrow import fs as pafs

from bench.common import bench_args, corpus, median, spark_pack, write_result
from hdfs_io.audio import decode, resample, to_mono
from hdfs_io.filesystem import open_filesystem
from hdfs_io.plan import PlanConfig
from hdfs_io.shard_reader import ReaderConfig, ShardDataset, ShardLoader
from hdfs_io.upload import upload

PROCESSES = 2


def read_small(uris: list[str]) -> int:
    for uri in uris:
        fs, path = open_filesystem(uri)
        with fs.open_input_file(path) as f:
            samples, rate = decode(f.read())
        resample(to_mono(samples), rate, 16000)
    return len(uris)


def run_small(uris: list[str]) -> float:
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        assert sum(pool.map(read_small, [uris[i::PROCESSES] for i in range(PROCESSES)])) == len(uris)
    return time.perf_counter() - started


def run_shards(uri: str, expected: int) -> float:
    ds = ShardDataset(uri, 0, 1, ReaderConfig(plan=PlanConfig(), output="waveform"))
    started = time.perf_counter()
    count = sum(len(b["keys"]) for b in ShardLoader(ds, num_workers=PROCESSES))
    assert count == expected, count
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    if not os.environ.get("HDFS_URI"):
        sys.exit("bench.small_vs_shards: make cluster-up && . .devcluster/env.sh first")
    hdfs = os.environ["HDFS_URI"]
    root = corpus(args.utterances)
    raw = f"{hdfs}/bench/raw"
    assert not upload(str(root), raw, workers=8, progress=False).failed
    packed = f"{hdfs}/bench/packed-reader"
    manifest = spark_pack("local[2]", raw, packed, env=dict(os.environ))
    fs, path = open_filesystem(raw)
    uris = sorted(f"{hdfs}{i.path}" for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.path.endswith(".flac"))
    runs = {"small_files": [], "shards": []}
    for _ in range(args.repeats):
        runs["small_files"].append(run_small(uris))
        runs["shards"].append(run_shards(packed, manifest["utterances"]))
    n = manifest["utterances"]
    rows = {name: {"median_s": median(t), "runs_s": t, "utterances_per_s": n / median(t)} for name, t in runs.items()}
    result = {"utterances": n, "processes": PROCESSES, "rows": rows,
              "speedup": rows["small_files"]["median_s"] / rows["shards"]["median_s"],
              "goal": "shards >= 50x small files"}
    path_out = write_result("small_vs_shards", result)
    for name, r in rows.items():
        print(f"{name:12s} {r['median_s']:7.2f} s  {r['utterances_per_s']:7.0f} utt/s")
    print(f"shards / small files = {result['speedup']:.1f}x -> {path_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
