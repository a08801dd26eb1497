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
3. Ranks. Every rank gets k = ceil(batches / W) batches, dealt in cycles of W
   segments of `segment_batches` consecutive batches; each rank takes one segment
   of every cycle. Segments keep reads sequential, and dealing every cycle spreads
   every part of the duration range over all ranks (in epoch 0 every rank's batches
   are non-decreasing in duration). Inside a cycle the heaviest segment (audio
   seconds) goes to the rank that has read least so far, so ranks stay balanced.
4. Padding. The W*k - batches <= W-1 slots left over are filled with repeats (a
   rank's own previous batch), counted in `repeated`.
Everything depends only on (index, world size, epoch, seed, config).
5. Elastic resume. A run stopped mid-epoch on W ranks, each having read the first
   p_r of its batches, can finish the epoch on W' ranks: the global positions no
   old rank read are dealt to the W' ranks as in step 3 (`plan_rank_resumed`), so
   every batch is read once over the old and new ranks, and the new ranks get
   equal counts (padded with counted repeats).

The global batch sequence is three flat arrays (BatchSequence), cut by vectorized
numpy in blocks; a rank turns only its own k batches into arrays (plan_rank).
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


@dataclass
class BatchSequence:
    """An epoch's global batches, held as flat arrays instead of a list of arrays.

    Batch at global position p is `order[starts[sequence[p]]:starts[sequence[p] + 1]]`.
    At 30M utterances this is about 200 MB, where a list of 6M numpy arrays was
    several GB; a rank materializes only its own batches from it.
    """
    order: np.ndarray | None  # utterance ids in cut order (int32 below 2**31 utterances); None: index order
    starts: np.ndarray  # batch b is order[starts[b]:starts[b + 1]]; len = batches + 1
    sequence: np.ndarray  # global position -> batch
    batch_seconds: np.ndarray  # audio seconds of each batch b (not position), float32

    def __len__(self) -> int:
        return len(self.sequence)

    def batch(self, position: int) -> np.ndarray:
        """Returns the utterance ids of the batch at a global position (a copy: the sequence can be freed)."""
        b = int(self.sequence[position])
        if self.order is None:
            return np.arange(self.starts[b], self.starts[b + 1], dtype=np.int64)
        return self.order[self.starts[b]:self.starts[b + 1]].astype(np.int64)

    def seconds(self) -> np.ndarray:
        """Returns the audio seconds of every batch, by global position."""
        return self.batch_seconds[self.sequence]


PLANNER_VERSION = 2  # a saved position means other batches under another version: resumes check it
MIN_CYCLES = 64  # a balanced deal has at least this many cycles, so segments shrink in short epochs
BLOCK_UTTERANCES = 1 << 20  # utterances cut per vectorized step: bounds the planner's temporary arrays


def id_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def batch_ends(d: np.ndarray, first: int, stop: int, window: int, cfg: PlanConfig) -> np.ndarray:
    """Returns, for queries first..stop-1, where a batch starting there ends (exclusive).

    `d` holds durations in cut order, non-decreasing inside each window of `window`
    queries; `first` and `stop` are window boundaries (or len(d)), and no batch
    crosses a window. A batch's padded cost is its count times its
    last duration; it holds the most utterances that fit `batch_seconds` (at least
    one). Vectorized: with c[j] the most utterances a batch ending at j may hold, a
    batch starting at i may end at j iff j - c[j] + 1 <= i, and j - c[j] increases
    inside a window.
    """
    n = len(d)
    queries = np.arange(first, stop, dtype=np.int64)
    if cfg.batch_size > 0:
        return np.minimum(queries + cfg.batch_size, np.minimum(window_starts(first, stop, window) + window, n))
    dj = d[first:stop].astype(np.float64)
    c = np.floor(cfg.batch_seconds / dj)
    c += (c + 1) * dj <= cfg.batch_seconds  # exact: m * d <= budget, as the greedy cut checks it
    c -= c * dj > cfg.batch_seconds
    window_start = window_starts(first, stop, window)
    c = np.minimum(c.astype(np.int64), queries - window_start + 1)  # never reaching back past the window
    spread = 2 * (n + 1) // window + 1  # window starts are multiples of window: far enough apart, scaled
    reach = queries - c + 1 + window_start * spread  # sorted: increasing inside a window, windows far apart
    last = first + np.searchsorted(reach, queries + window_start * spread, side="right") - 1
    return np.maximum(last + 1, queries + 1)


def window_starts(first: int, stop: int, window: int) -> np.ndarray:
    """Returns the start of the window of every position first..stop-1 (first is a window start)."""
    windows = -(-(stop - first) // window)
    return np.repeat(np.arange(first, first + windows * window, window, dtype=np.int64), window)[:stop - first]


def cut(d: np.ndarray, window: int, cfg: PlanConfig) -> np.ndarray:
    """Returns the batch starts of the greedy cut of `d` inside each window (see `batch_ends`), then len(d).

    The chains of batch starts of all windows in a block advance together, one
    vectorized step a batch, so the Python loop runs as many times as the longest
    window has batches, not once a batch.
    """
    n = len(d)
    found = []
    block = max(window, BLOCK_UTTERANCES // window * window)  # whole windows
    for first in range(0, n, block):
        stop = min(n, first + block)
        ends = batch_ends(d, first, stop, window, cfg).astype(id_dtype(n + 1))
        chain = np.arange(first, stop, window, dtype=id_dtype(n + 1))  # every window starts a batch
        while len(chain):
            found.append(chain)
            chain = ends[chain - first]
            chain = chain[(chain % window != 0) & (chain < stop)]  # a chain ends at its window's end
    starts = np.concatenate(found + [np.array([n], id_dtype(n + 1))])
    starts.sort()
    return starts


def plan_durations(durations: np.ndarray) -> np.ndarray:
    """Returns durations as float32, each rounded up, never down: what the planner works with.

    Half the memory of float64 at 30M utterances, and the bits of a non-negative
    float32 sort as its values do; rounding up keeps every batch within its budget.
    """
    if durations.dtype == np.float32:
        return durations
    rounded = durations.astype(np.float32)
    return np.where(rounded < durations, np.nextafter(rounded, np.float32(np.inf)), rounded)


def blocks_of_pairs(n: int) -> list[tuple[int, int]]:
    """Returns (a, b) slices that together compare every neighbouring pair x[i], x[i + 1] as x[a:b - 1], x[a + 1:b]."""
    return [(a, min(n, a + BLOCK_UTTERANCES + 1)) for a in range(0, max(n - 1, 0), BLOCK_UTTERANCES)]


def shard_blocks(shards: np.ndarray, rows: np.ndarray, rng: np.random.Generator, block: int):
    """Yields utterance ids in blocks of `block`: shards in a random order, rows in order inside each shard."""
    n = len(shards)
    in_order = all(np.all((shards[a + 1:b] > shards[a:b - 1])
                          | ((shards[a + 1:b] == shards[a:b - 1]) & (rows[a + 1:b] > rows[a:b - 1])))
                   for a, b in blocks_of_pairs(n))
    by_shard = None if in_order else np.lexsort((rows, shards)).astype(id_dtype(n))  # an index is in order
    sorted_shards = shards if in_order else shards[by_shard]
    bounds = np.r_[0, np.flatnonzero(sorted_shards[1:] != sorted_shards[:-1]) + 1, n] if n else np.zeros(1, int)
    pending, held = [], 0
    for i in rng.permutation(len(bounds) - 1):
        a, b = int(bounds[i]), int(bounds[i + 1])
        pending.append(np.arange(a, b, dtype=id_dtype(n)) if in_order else by_shard[a:b])
        held += b - a
        while held >= block:
            ids = np.concatenate(pending)
            yield ids[:block]
            pending, held = [ids[block:]], held - block
    if held:
        yield np.concatenate(pending)


def epoch_batches(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray,
                  epoch: int, cfg: PlanConfig) -> BatchSequence:
    """Returns the epoch's global batch sequence.

    Epoch 0 (SortaGrad): all utterances by duration (ties keep index order; a
    duration-layout index is already in (duration, key) order), cut in windows of
    `window_utterances` too. Later epochs: shards
    in a seeded random order, rows in shard order, cut into windows of
    `window_utterances`; inside a window utterances are sorted by duration with random
    tie-breaks, cut, and the window's batches shuffled.
    """
    durations = plan_durations(durations)
    n = len(durations)
    w = max(1, min(cfg.window_utterances, n))  # a window past the dataset is the dataset
    if epoch == 0:
        ordered = all(np.all(durations[a + 1:b] >= durations[a:b - 1]) for a, b in blocks_of_pairs(n))
        order = None if ordered else np.argsort(durations, kind="stable").astype(id_dtype(n))
        d = durations if order is None else durations[order]
        starts = cut(d, w, cfg)  # windows let the cut run vectorized; each costs at most one short batch
        seconds = np.add.reduceat(d, starts[:-1]) if n else np.empty(0, np.float32)
        return BatchSequence(order, starts, np.arange(len(starts) - 1, dtype=id_dtype(n)), seconds)
    rng = np.random.default_rng([cfg.seed, epoch])
    block = max(w, BLOCK_UTTERANCES // w * w)  # whole windows
    order = np.empty(n, id_dtype(n))
    position_bits = max(1, (w - 1).bit_length())
    tie_bits = max(0, 32 - position_bits)
    starts_parts, sequences, seconds_parts, batches_so_far, a = [], [], [], 0, 0
    for ids in shard_blocks(shards, rows, rng, block):
        # One sort per window of a uint64 key: the float32 duration's bits (ordered as the values are),
        # random bits that break ties, and the position in the window, read back after the sort.
        windows = -(-len(ids) // w)
        keys = np.full(windows * w, np.iinfo(np.uint64).max, np.uint64)  # padding sorts last
        keys[:len(ids)] = durations[ids].view(np.uint32)
        keys <<= np.uint64(32)
        keys[:len(ids)] |= rng.integers(0, 1 << tie_bits, len(ids), dtype=np.uint64) << np.uint64(position_bits)
        keys[:len(ids)] |= np.tile(np.arange(w, dtype=np.uint64), windows)[:len(ids)]
        keys = np.sort(keys.reshape(windows, w), axis=1).ravel()[:len(ids)]
        keys &= np.uint64((1 << position_bits) - 1)
        ordered = ids[window_starts(0, len(ids), w) + keys.astype(np.int64)]
        del keys
        order[a:a + len(ordered)] = ordered
        d = durations[ordered]
        starts = cut(d, w, cfg)
        batch_window = starts[:-1] // w
        starts_parts.append(starts[:-1].astype(id_dtype(n)) + a)
        # each window's batches in a random order: the window plus a random fraction, sorted
        sequences.append((np.argsort(batch_window + rng.random(len(batch_window))) + batches_so_far)
                         .astype(id_dtype(n)))
        seconds_parts.append(np.add.reduceat(d, starts[:-1]))
        batches_so_far += len(starts) - 1
        a += len(ordered)
    if n == 0:
        return BatchSequence(order, np.zeros(1, np.int64), np.empty(0, np.int64), np.empty(0))
    starts_parts.append(np.array([n], id_dtype(n)))
    return BatchSequence(order, np.concatenate(starts_parts), np.concatenate(sequences), np.concatenate(seconds_parts))


def deal_cycles(num_batches: int, world_size: int, segment: int,
                seconds: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """Returns where each rank's segment starts in each dealing cycle, shaped (cycles, ranks), and their lengths.

    Positions are dealt in cycles of `world_size` segments of `segment` consecutive
    positions (then cycles of one position each for the rest); each rank takes one segment of
    every cycle, so all get k = ceil(batches / world) positions. With `seconds` (each
    batch's audio seconds), a cycle's segments go heaviest first to the rank that has
    read least so far, which keeps every rank within about one segment's spread of the
    others, and segments shrink so that there are at least MIN_CYCLES cycles; without,
    rank r takes segment r. Positions >= num_batches are padding
    slots; there are fewer than `world_size`.
    """
    k = -(-num_batches // world_size) if num_batches else 0
    if seconds is not None:  # enough cycles to balance in: short epochs get shorter segments
        segment = max(1, min(segment, k // MIN_CYCLES))
    full_cycles, rest = divmod(k, segment)
    lengths = [segment] * full_cycles + [1] * rest  # the tail one batch a cycle: the finest balance
    firsts = np.empty((len(lengths), world_size), np.int64)
    if seconds is not None:
        cumulative = np.zeros(len(seconds) + 1)
        np.cumsum(seconds, dtype=np.float64, out=cumulative[1:])
    total = np.zeros(world_size)
    base = 0
    for c, length in enumerate(lengths):
        segment_starts = base + length * np.arange(world_size, dtype=np.int64)
        if seconds is None or world_size == 1:
            firsts[c] = segment_starts
        else:
            weight = (cumulative[np.minimum(segment_starts + length, num_batches)]
                      - cumulative[np.minimum(segment_starts, num_batches)])
            takers = np.empty(world_size, np.int64)
            takers[np.argsort(-weight, kind="stable")] = np.argsort(total, kind="stable")
            firsts[c, takers] = segment_starts
            total[takers] += weight
        base += length * world_size
    return firsts, lengths


def positions_of(firsts: np.ndarray, lengths: list[int], rank: int) -> list[int]:
    """Returns the global positions rank `rank` takes, in order, from `deal_cycles`' result."""
    return [p for first, length in zip(firsts[:, rank].tolist(), lengths) for p in range(first, first + length)]


def deal(num_batches: int, world_size: int, segment: int, seconds: np.ndarray | None = None) -> list[list[int]]:
    """Returns, per rank, the global batch positions it takes (see `deal_cycles`)."""
    firsts, lengths = deal_cycles(num_batches, world_size, segment, seconds)
    return [positions_of(firsts, lengths, r) for r in range(world_size)]


def rank_plan(sequence: BatchSequence, positions: list[int]) -> tuple[RankPlan, int]:
    """Returns a rank's batches at the given global positions, and how many utterances it repeats.

    A padding slot (position past the last batch) repeats the rank's previous batch,
    else (a rank with no batch of its own) one of the first batches.
    """
    mine, flags, repeated = [], [], 0
    for p in positions:
        if p < len(sequence):
            mine.append(sequence.batch(p))
            flags.append(False)
        else:
            mine.append(mine[-1] if mine else sequence.batch(min(p - len(sequence), len(sequence) - 1)))
            flags.append(True)
            repeated += len(mine[-1])
    return RankPlan(mine, flags), repeated


def plan_rank(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray, world_size: int, rank: int,
              epoch: int, cfg: PlanConfig) -> RankPlan:
    """Returns one rank's batches for one epoch, materializing no other rank's."""
    return plan_rank_resumed(durations, shards, rows, epoch, cfg, [], world_size, rank)


def plan_epoch(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray,
               world_size: int, epoch: int, cfg: PlanConfig) -> EpochPlan:
    """Returns every rank's batches for one epoch; utterances are index positions."""
    if world_size < 1:
        raise ValueError("world size must be at least 1")
    sequence = epoch_batches(durations, shards, rows, epoch, cfg)
    ranks, repeated_batches, repeated_utterances = [], 0, 0
    for positions in deal(len(sequence), world_size, max(1, cfg.segment_batches), sequence.seconds()):
        plan, repeated = rank_plan(sequence, positions)
        ranks.append(plan)
        repeated_batches += sum(plan.repeated)
        repeated_utterances += repeated
    return EpochPlan(ranks, repeated_batches, repeated_utterances)


def read_mask(num_batches: int, world_size: int, consumed: list[int], cfg: PlanConfig,
              seconds: np.ndarray) -> np.ndarray:
    """Returns a mask over `num_batches` dealt to `world_size` ranks: True where a rank had read the batch.

    `consumed[r]` is how many of its batches rank r had read (its reader position).
    Padding slots (past the batches) are not in the mask: they were repeats.
    """
    if len(consumed) != world_size:
        raise ValueError(f"{len(consumed)} positions saved for {world_size} ranks")
    firsts, lengths = deal_cycles(num_batches, world_size, max(1, cfg.segment_batches), seconds)
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    mask = np.zeros(num_batches, bool)
    for r, count in enumerate(consumed):
        whole = int(np.searchsorted(bounds, count, side="right")) - 1  # cycles read entirely
        for c in range(whole):
            mask[firsts[c, r]:firsts[c, r] + lengths[c]] = True
        if whole < len(lengths):
            mask[firsts[whole, r]:firsts[whole, r] + count - bounds[whole]] = True
    return mask


def left_after(seconds: np.ndarray, cfg: PlanConfig, history: list[tuple[int, list[int]]]) -> np.ndarray:
    """Returns the global positions of an epoch's batches that no earlier run read, in order.

    `history` holds one (world size, each rank's position) per earlier run of the epoch; the
    first run dealt every batch, each later one what the runs before it had left.
    """
    left = np.arange(len(seconds))
    for world_size, consumed in history:
        left = left[~read_mask(len(left), world_size, consumed, cfg, seconds[left])]
    return left


def plan_rank_resumed(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray, epoch: int, cfg: PlanConfig,
                      history: list[tuple[int, list[int]]], world_size: int, rank: int) -> RankPlan:
    """Returns one rank's batches for the rest of an epoch that earlier runs (`history`) had partly read.

    The batches no earlier run read are dealt to `world_size` ranks like a whole epoch's,
    heaviest segment first to the rank that has read least, padded with counted repeats.
    With an empty history this is `plan_rank`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    sequence = epoch_batches(durations, shards, rows, epoch, cfg)
    seconds = sequence.seconds()
    if not history:  # the whole epoch: no copies of the per-batch arrays (30M utterances: 6M batches)
        firsts, lengths = deal_cycles(len(sequence), world_size, max(1, cfg.segment_batches), seconds)
        return rank_plan(sequence, positions_of(firsts, lengths, rank))[0]
    left = left_after(seconds, cfg, history)
    firsts, lengths = deal_cycles(len(left), world_size, max(1, cfg.segment_batches), seconds[left])
    mine = positions_of(firsts, lengths, rank)
    # a slot past the remaining batches stays past the sequence, so rank_plan makes it a repeat
    return rank_plan(sequence, [int(left[p]) if p < len(left) else len(sequence) + p - len(left) for p in mine])[0]


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
