"""Epoch plans: which batches of which utterances each rank reads, from index metadata alone.

    python -m hdfs_io.plan DATASET_URI --world-size W --epoch E [--batch-seconds S] [--seed N]

prints {"ranks": [[[key, ...], ...], ...], "repeated": n, ...}: the exact plan the reader follows.

How a plan is made, for epoch e:
1. Order. Epoch 0 (SortaGrad): all utterances by (duration, key). Later epochs:
   shards in a seeded random order, rows in shard order, cut into windows of
   `window_utterances` (the bounded shuffle buffer); inside a window, utterances
   are sorted by duration with random tie-breaks so batches hold similar lengths.
2. Batches. Consecutive utterances are cut greedily so a batch's padded audio
   (count x longest) stays within `batch_seconds` (or `batch_size` utterances).
   In later epochs the batch order inside each window is shuffled.
3. Ranks. Every rank gets k = ceil(batches / W) batches, dealt block-cyclically in
   segments of `segment_batches` consecutive batches: rank r takes segments r,
   r+W, r+2W, ... Segments keep reads sequential; dealing them round-robin spreads
   every part of the duration range over all ranks, so work balances by duration,
   and in epoch 0 every rank's batches are non-decreasing in duration.
4. Padding. The W*k - batches <= W-1 slots left over are filled with repeats (a
   rank's own previous batch), counted in `repeated`.
Everything depends only on (index, world size, epoch, seed, config).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

from hdfs_io import dataset_format as F


@dataclass(frozen=True)
class PlanConfig:
    batch_seconds: float = 60.0  # padded audio seconds per batch (count x longest)
    batch_size: int = 0  # if > 0, a fixed number of utterances per batch instead
    window_utterances: int = 4096  # shuffle buffer: utterances mixed together in later epochs
    segment_batches: int = 32  # consecutive batches a rank reads in one sequential run
    seed: int = 0


@dataclass
class RankPlan:
    batches: list[np.ndarray]  # each an array of utterance ids (rows of the index)
    repeated: list[bool]  # whether the batch at that position is a repeat


@dataclass
class EpochPlan:
    ranks: list[RankPlan]
    repeated_batches: int
    repeated_utterances: int


def cut_batches(durations: np.ndarray, order: np.ndarray, cfg: PlanConfig) -> list[np.ndarray]:
    """Returns consecutive slices of `order` as batches (greedy, padded-seconds or fixed count).

    `durations[order]` should be non-decreasing inside each run given here: then a
    batch's padded cost is its count times its last duration, found by bisection.
    """
    n = len(order)
    if cfg.batch_size > 0:
        return [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    d = durations[order]
    batches = []
    i = 0
    while i < n:
        # largest m with m * d[i + m - 1] <= budget (at least 1); the cost is increasing in m
        lo, hi = 1, n - i
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid * d[i + mid - 1] <= cfg.batch_seconds:
                lo = mid
            else:
                hi = mid - 1
        batches.append(order[i:i + lo])
        i += lo
    return batches


def epoch_batches(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray,
                  epoch: int, cfg: PlanConfig) -> list[np.ndarray]:
    """Returns the epoch's global batch sequence (arrays of utterance ids: index positions).

    Ties in duration keep index order; a duration-layout index is already in (duration, key) order.
    """
    if epoch == 0:
        return cut_batches(durations, np.argsort(durations, kind="stable"), cfg)
    rng = np.random.default_rng([cfg.seed, epoch])
    shard_ids = np.unique(shards)
    shard_rank = np.empty(shard_ids.max() + 1 if len(shard_ids) else 0, dtype=np.int64)
    shard_rank[shard_ids] = rng.permutation(len(shard_ids))
    stream = np.lexsort((rows, shard_rank[shards]))
    batches: list[np.ndarray] = []
    for start in range(0, len(stream), cfg.window_utterances):
        window = stream[start:start + cfg.window_utterances]
        jitter = rng.random(len(window))
        window = window[np.lexsort((jitter, durations[window]))]
        cut = cut_batches(durations, window, cfg)
        batches.extend(cut[i] for i in rng.permutation(len(cut)))
    return batches


def deal(num_batches: int, world_size: int, segment: int) -> list[list[int]]:
    """Returns, per rank, the global batch positions it takes (block-cyclic, equal counts).

    Positions >= num_batches are padding slots; there are fewer than `world_size`.
    """
    k = -(-num_batches // world_size) if num_batches else 0
    full_cycles, rest = divmod(k, segment)
    out = []
    for r in range(world_size):
        positions = []
        for c in range(full_cycles):
            base = c * world_size * segment + r * segment
            positions.extend(range(base, base + segment))
        base = full_cycles * world_size * segment + r * rest
        positions.extend(range(base, base + rest))
        out.append(positions)
    return out


def plan_epoch(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray,
               world_size: int, epoch: int, cfg: PlanConfig) -> EpochPlan:
    """Returns every rank's batches for one epoch; utterances are index positions."""
    if world_size < 1:
        raise ValueError("world size must be at least 1")
    batches = epoch_batches(durations, shards, rows, epoch, cfg)
    ranks = []
    repeated_batches = repeated_utts = 0
    for r, positions in enumerate(deal(len(batches), world_size, max(1, cfg.segment_batches))):
        mine, flags = [], []
        for p in positions:
            if p < len(batches):
                mine.append(batches[p])
                flags.append(False)
            else:  # a padding slot: repeat this rank's previous batch, else the longest few
                mine.append(mine[-1] if mine else batches[min(p - len(batches), len(batches) - 1)])
                flags.append(True)
                repeated_batches += 1
                repeated_utts += len(mine[-1])
        ranks.append(RankPlan(mine, flags))
    return EpochPlan(ranks, repeated_batches, repeated_utts)


def index_columns(index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (durations, shards, rows) arrays from an index table."""
    return (index.column(F.DURATION_S).to_numpy(), index.column(F.SHARD).to_numpy(),
            index.column(F.ROW).to_numpy())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hdfs_io.plan", description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="dataset folder URI")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--batch-seconds", type=float, default=PlanConfig.batch_seconds)
    p.add_argument("--batch-size", type=int, default=0, help="fixed utterances per batch instead")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from hdfs_io.dataset import open_dataset
    from hdfs_io.filesystem import FilesystemUnavailable, probe_uri

    if args.world_size < 1 or args.epoch < 0:
        p.error("--world-size must be >= 1 and --epoch >= 0")
    try:
        probe_uri(args.dataset)
        index = open_dataset(args.dataset).index([F.KEY, F.DURATION_S, F.SHARD, F.ROW])
    except (F.DatasetError, FilesystemUnavailable, PermissionError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    keys = np.asarray(index.column(F.KEY).to_pylist(), dtype=object)
    cfg = PlanConfig(batch_seconds=args.batch_seconds, batch_size=args.batch_size, seed=args.seed)
    plan = plan_epoch(*index_columns(index), args.world_size, args.epoch, cfg)
    print(json.dumps({
        "ranks": [[keys[b].tolist() for b in rank.batches] for rank in plan.ranks],
        "repeated": plan.repeated_utterances,
        "repeated_batches": plan.repeated_batches,
        "repeated_positions": [[i for i, f in enumerate(rank.repeated) if f] for rank in plan.ranks],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
