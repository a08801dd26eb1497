"""Prints the exact plan the reader follows: the batches (lists of keys) every rank reads in an epoch.

    python -m hdfs_io.plan DATASET_URI --world-size W --epoch E [--batch-seconds S] [--seed N]

prints {"ranks": [[[key, ...], ...], ...], "repeated": n, ...}. How a plan is made: hdfs_io.reader.planner.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from hdfs_io import prog
from hdfs_io.format import dataset_format as F
from hdfs_io.reader.planner import PlanConfig, plan_epoch


def index_columns(index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (durations, shards, rows) arrays from an index table."""
    return (index.column(F.DURATION_S).to_numpy(), index.column(F.SHARD).to_numpy(),
            index.column(F.ROW).to_numpy())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("hdfs_io.plan"), description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="dataset folder URI")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--batch-seconds", type=float, default=PlanConfig.batch_seconds)
    p.add_argument("--batch-size", type=int, default=0, help="fixed utterances per batch instead")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from hdfs_io.format.dataset import open_dataset
    from hdfs_io.fs.filesystem import FilesystemUnavailable, probe_uri

    if args.world_size < 1 or args.epoch < 0:
        p.error("--world-size must be >= 1 and --epoch >= 0")
    try:
        probe_uri(args.dataset)
        ds = open_dataset(args.dataset)
        chunk_column = F.ROW_GROUP if ds.manifest["format"] == "parquet" else F.OFFSET
        index = ds.index([F.KEY, F.DURATION_S, F.SHARD, F.ROW, chunk_column])
    except (F.DatasetError, FilesystemUnavailable, PermissionError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    keys = np.asarray(index.column(F.KEY).to_pylist(), dtype=object)
    cfg = PlanConfig(batch_seconds=args.batch_seconds, batch_size=args.batch_size, seed=args.seed)
    column = index.column(chunk_column).to_numpy()
    chunks = F.chunk_ids(ds.manifest["format"], column, column)  # as the reader has them (hdfs_io.reader.rank_index)
    plan = plan_epoch(*index_columns(index), args.world_size, args.epoch, cfg, chunks)
    print(json.dumps({
        "ranks": [[keys[b].tolist() for b in rank.batches] for rank in plan.ranks],
        "repeated": plan.repeated_utterances,
        "repeated_batches": plan.repeated_batches,
        "repeated_positions": [[i for i, f in enumerate(rank.repeated) if f] for rank in plan.ranks],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
