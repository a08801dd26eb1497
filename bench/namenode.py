"""bench/namenode: HDFS objects (files + blocks, from fsck) for a raw upload vs. the packed dataset.

    python -m bench.namenode [--utterances 5000]

Uploads the corpus to the local HDFS, packs it there at a production shard
size (256 MB), counts objects with `hdfs fsck`, and extrapolates to a corpus of
1M and 3M utterances of the same mean size. Goal: >= 1000x fewer objects.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from bench.common import bench_args, ROOT, corpus, spark_pack, tree_bytes, write_result
from hdfs_io.upload import upload

SHARD_MB = 256
BLOCK_MB = 128  # dfs.blocksize in conf/hadoop/hdfs-site.xml, Hadoop's default


def fsck_objects(path: str, env: dict) -> dict:
    """Returns {"files", "blocks", "dirs", "objects"} for an HDFS path, from `hdfs fsck`."""
    out = subprocess.run([str(ROOT / "scripts" / "hadoop"), "fsck", path], env=env, capture_output=True,
                         text=True, check=True).stdout

    def count(label: str) -> int:
        return int(re.search(rf"{label}:\s+(\d+)", out).group(1))

    files, blocks, dirs = count("Total files"), count(r"Total blocks \(validated\)"), count("Total dirs")
    return {"files": files, "blocks": blocks, "dirs": dirs, "objects": files + blocks}


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    if not os.environ.get("HDFS_URI"):
        sys.exit("bench.namenode: start the cluster and load its environment first: "
                 "make cluster-up && . .devcluster/env.sh")
    env = dict(os.environ)
    root = corpus(args.utterances)
    files, nbytes = tree_bytes(root)
    hdfs = env["HDFS_URI"]
    summary = upload(str(root), f"{hdfs}/bench/raw", workers=8, progress=False)
    assert not summary.failed, summary.failed
    manifest = spark_pack(env.get("SPARK_MASTER", "local[2]"), f"{hdfs}/bench/raw", f"{hdfs}/bench/packed",
                          "--shard-size-mb", str(SHARD_MB), env=env)
    raw, packed = fsck_objects("/bench/raw", env), fsck_objects("/bench/packed", env)

    mean_bytes = nbytes / files

    def extrapolate(n: int) -> dict:
        raw_objects = n * (1 + max(1, math.ceil(mean_bytes / (BLOCK_MB * 2**20))))
        shards = math.ceil(n * mean_bytes / (SHARD_MB * 2**20))
        index_mb = n * packed_index_bytes_per_utt / 2**20
        metadata = 3 + 2 + max(1, math.ceil(index_mb / BLOCK_MB))  # 3 files; 1 block each, more for the index
        packed_objects = shards * (1 + math.ceil(SHARD_MB / BLOCK_MB)) + metadata
        return {"utterances": n, "raw_objects": raw_objects, "packed_objects": packed_objects,
                "ratio": raw_objects / packed_objects}

    index_bytes = subprocess.run([str(ROOT / "scripts" / "hadoop"), "dfs", "-stat", "%b", "/bench/packed/index.parquet"],
                                 env=env, capture_output=True, text=True, check=True).stdout.strip()
    packed_index_bytes_per_utt = int(index_bytes) / manifest["utterances"]
    result = {
        "utterances": files, "mean_file_bytes": mean_bytes, "shard_size_mb": SHARD_MB, "block_size_mb": BLOCK_MB,
        "measured": {"raw": raw, "packed": packed, "ratio": raw["objects"] / packed["objects"]},
        "extrapolated": [extrapolate(1_000_000), extrapolate(3_000_000)],
        "goal": ">= 1000x fewer objects at a production shard size",
    }
    path = write_result("namenode", result)
    print(f"measured at {files} utterances: raw {raw['objects']} objects, packed {packed['objects']} "
          f"-> {result['measured']['ratio']:.0f}x")
    for e in result["extrapolated"]:
        print(f"extrapolated to {e['utterances']:,} utterances of {mean_bytes / 1024:.0f} KB: "
              f"raw {e['raw_objects']:,}, packed {e['packed_objects']:,} -> {e['ratio']:.0f}x")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
