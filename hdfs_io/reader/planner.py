"""Epoch plans: which batches of which utterances each rank reads, from index metadata alone.

`python -m hdfs_io.plan` prints the plan of a dataset's epoch.

How a plan is made, for epoch e:
1. Order. Epoch 0 (SortaGrad): all utterances by (duration, key), cut in windows of
   `window_utterances`. Later epochs (`shuffled_batches`): shards in a seeded random
   order, each shard's chunks (Parquet row groups, SequenceFile byte ranges: what a
   worker reads at once) in order, grouped into windows of whole chunks of about
   `window_utterances` utterances, smaller where their batches would be light or heavy
   (long utterances fill a batch badly); inside a window, utterances are sorted by
   duration with random tie-breaks so batches hold similar lengths.
2. Batches. Consecutive utterances are cut greedily so a batch's padded audio
   (count x longest) stays within `batch_seconds` (or `batch_size` utterances); no
   batch crosses a window. In later epochs windows come in a random order that keeps
   the running total of their excess audio near zero (`balanced_order`), and inside a
   window batches come grouped by the chunk of their first utterance, in chunk order.
3. Ranks. Every rank gets k = ceil(batches / W) batches.
   - Epoch 0 (`deal_cycles`): in cycles of W segments of `segment_batches` consecutive
     batches; each rank takes one segment of every cycle, so every rank's batches are
     non-decreasing in duration and spread over the whole duration range.
   - Later epochs (`deal_runs`): a rank's positions interleave `lanes` lanes (position p
     is lane p mod lanes), and each lane is one run of consecutive batches of the
     sequence. A DataLoader worker reads every w-th position; when w divides `lanes` it
     reads whole lanes, so whole windows and chunks, each chunk once, apart from the
     chunks at the two ends of a run. A rank's lanes change every epoch.
   Runs of one cycle go heaviest first (audio seconds) to the rank that has read least
   so far, then runs are swapped between the heaviest and lightest rank while that
   narrows their gap, so ranks stay balanced.
4. Padding. The W*k - batches <= W-1 slots left over are filled with repeats (a
   rank's own previous batch), counted in `repeated`; no rank gets more than one.
Everything depends only on (index, world size the epoch began on, epoch, seed, config).
5. Elastic resume. A run stopped mid-epoch on W ranks, each having read the first
   p_r of its batches, can finish the epoch on W' ranks: the global positions no
   old rank read are dealt to the W' ranks as in step 3 (`plan_rank_resumed`), so
   every batch is read once over the old and new ranks, and the new ranks get
   equal counts (padded with counted repeats).

The global batch sequence is three flat arrays (BatchSequence), cut by vectorized
numpy in blocks; a rank turns only its own k batches into arrays (plan_rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlanConfig:
    batch_seconds: float = 60.0  # padded audio seconds per batch (count x longest)
    batch_size: int = 0  # if > 0, a fixed number of utterances per batch instead
    window_utterances: int = 4096  # shuffle buffer: utterances mixed together in later epochs
    segment_batches: int = 32  # epoch 0: consecutive batches a rank reads in one sequential run
    seed: int = 0
    lanes: int = 4  # later epochs: chunk-disjoint runs a rank interleaves; a worker reads whole lanes if it divides this


@dataclass
class RankPlan:
    batches: list[np.ndarray]  # each an array of utterance ids (rows of the index)
    repeated: list[bool]  # whether the batch at that position is a repeat
    lanes: np.ndarray | None = None  # each position's lane (int8); a worker dividing `num_lanes` reads whole lanes
    num_lanes: int = 1


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


PLANNER_VERSION = 3  # a saved position means other batches under another version: resumes check it
MIN_CYCLES = 64  # a balanced deal has at least this many cycles, so segments shrink in short epochs
BALANCE_FRACTION = 0.01  # later epochs: a window's estimated excess audio stays below this share of a lane's
EPOCH0_WINDOW_BATCHES = 8  # epoch 0 cuts batches inside runs of whole chunks of at least this many batches
MAX_RUN_BATCHES = 32  # epoch 0: a worker reads at most this many positions in a row (the loader's reorder buffer)
EPOCH0_CYCLES = 32  # epoch 0 deals segments of 1/32 of a rank's batches: a chunk shared where one ends
MIN_WINDOW_BATCHES = 2  # ... unless that would make windows of fewer than about this many batches
BLOCK_UTTERANCES = 1 << 20  # utterances cut per vectorized step: bounds the planner's temporary arrays


def id_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def batch_ends(d: np.ndarray, first: int, stop: int, window_start: np.ndarray, window_end: np.ndarray,
               cfg: PlanConfig) -> np.ndarray:
    """Returns, for queries first..stop-1, where a batch starting there ends (exclusive).

    `d` holds durations in cut order, non-decreasing inside each window; `window_start`
    and `window_end` give each query's window (its first and past-last position), and
    no batch crosses a window. A batch's padded cost is its count times its last
    duration; it holds the most utterances that fit `batch_seconds` (at least one).
    Vectorized: with c[j] the most utterances a batch ending at j may hold, never
    reaching back past j's window, a batch starting at i may end at j iff
    reach[j] = j - c[j] + 1 <= i. reach increases inside a window and lies inside it,
    so it never decreases, and the batch starting at i ends after the last j with
    reach[j] <= i: counted in linear time, not searched for.
    """
    queries = np.arange(first, stop, dtype=np.int64)
    if cfg.batch_size > 0:
        return np.minimum(queries + cfg.batch_size, window_end)
    dj = d[first:stop].astype(np.float64)
    c = np.floor(cfg.batch_seconds / dj)
    c += (c + 1) * dj <= cfg.batch_seconds  # exact: m * d <= budget, as the greedy cut checks it
    c -= c * dj > cfg.batch_seconds
    c = np.clip(c.astype(np.int64), 1, queries - window_start + 1)  # one past the budget alone; not past the window
    reach = queries - c + 1
    last = first + np.cumsum(np.bincount(reach - first, minlength=stop - first)) - 1  # the last j: reach[j] <= i
    return np.maximum(last + 1, queries + 1)


def cut_windows(d: np.ndarray, starts: np.ndarray, cfg: PlanConfig) -> np.ndarray:
    """Returns the batch starts of the greedy cut of `d` inside each window (see `batch_ends`), then len(d).

    `starts` holds the windows' first positions, increasing from 0. The chains of batch
    starts of all windows in a block advance together, one vectorized step a batch, so
    the Python loop runs as many times as the longest window has batches, not once a batch.
    """
    n = len(d)
    bounds = np.r_[np.asarray(starts, np.int64), n] if n else np.zeros(1, np.int64)
    found = []
    a = 0
    while a < len(bounds) - 1:  # blocks of whole windows, about BLOCK_UTTERANCES each
        b = max(a + 1, int(np.searchsorted(bounds, bounds[a] + BLOCK_UTTERANCES, side="right")) - 1)
        b = min(b, len(bounds) - 1)
        first, stop = int(bounds[a]), int(bounds[b])
        window = np.repeat(np.arange(a, b), np.diff(bounds[a:b + 1]))
        ends = batch_ends(d, first, stop, bounds[window], bounds[window + 1], cfg).astype(id_dtype(n + 1))
        opens = np.zeros(stop - first + 1, bool)
        opens[bounds[a:b + 1] - first] = True
        chain = bounds[a:b].astype(id_dtype(n + 1))  # every window starts a batch
        is_start = np.zeros(stop - first, bool)
        while len(chain):
            is_start[chain - first] = True
            chain = ends[chain - first]
            chain = chain[~opens[chain - first]]  # a chain ends at its window's end
        found.append((np.flatnonzero(is_start) + first).astype(id_dtype(n + 1)))  # in order, not sorted after
        a = b
    return np.concatenate(found + [np.array([n], id_dtype(n + 1))])


def cut(d: np.ndarray, window: int, cfg: PlanConfig) -> np.ndarray:
    """Returns the batch starts of the greedy cut of `d` in windows of `window` positions, then len(d)."""
    return cut_windows(d, np.arange(0, len(d), window, dtype=np.int64), cfg)


def plan_durations(durations: np.ndarray) -> np.ndarray:
    """Returns durations as float32, each rounded up, never down: what the planner works with.

    Half the memory of float64 at 30M utterances, and the bits of a non-negative
    float32 sort as its values do; rounding up keeps every batch within its budget.
    """
    if durations.dtype == np.float32:
        return durations
    if (durations < 0).any():
        raise ValueError("durations must not be negative")
    rounded = durations.astype(np.float32)
    # the next float32 up from a non-negative one is the next integer up of its bits: a tenth of np.nextafter's time
    rounded.view(np.int32)[...] += rounded < durations
    return rounded


def blocks_of_pairs(n: int) -> list[tuple[int, int]]:
    """Returns (a, b) slices that together compare every neighbouring pair x[i], x[i + 1] as x[a:b - 1], x[a + 1:b]."""
    return [(a, min(n, a + BLOCK_UTTERANCES + 1)) for a in range(0, max(n - 1, 0), BLOCK_UTTERANCES)]


def units(shards: np.ndarray, rows: np.ndarray | None, chunks: np.ndarray | None):
    """Returns the index in (shard, row) order as units: the chunks (read units), or single utterances without `chunks`.

    `rows` None stands for rows in index order (np.arange(n), without its 8 bytes an utterance).
    Returns (ids in (shard, row) order, or None where the index is in that order already;
    each unit's first position in that order, then the count; each unit's shard).
    """
    n = len(shards)
    if rows is None:
        in_order = all(np.all(shards[a + 1:b] >= shards[a:b - 1]) for a, b in blocks_of_pairs(n))
        by_shard = None if in_order else np.argsort(shards, kind="stable").astype(id_dtype(n))
    else:
        in_order = all(np.all((shards[a + 1:b] > shards[a:b - 1])
                              | ((shards[a + 1:b] == shards[a:b - 1]) & (rows[a + 1:b] > rows[a:b - 1])))
                       for a, b in blocks_of_pairs(n))
        by_shard = None if in_order else np.lexsort((rows, shards)).astype(id_dtype(n))  # an index is in order
    s = shards if by_shard is None else shards[by_shard]
    if chunks is None or n == 0:
        starts = np.arange(n + 1, dtype=np.int64)
    else:
        c = chunks if by_shard is None else chunks[by_shard]
        starts = np.r_[0, np.flatnonzero((s[1:] != s[:-1]) | (c[1:] != c[:-1])) + 1, n].astype(np.int64)
    return by_shard, starts, s[starts[:-1]]


def before(counts: np.ndarray) -> np.ndarray:
    """Returns the running total of `counts` before each element (an exclusive cumsum)."""
    total = np.cumsum(counts)
    return total - counts


def ranges(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Returns the concatenation of range(firsts[i], firsts[i] + counts[i]), vectorized."""
    return np.repeat(np.asarray(firsts, np.int64) - before(counts), counts) + np.arange(int(counts.sum()))


def estimated_excess(d: np.ndarray, cfg: PlanConfig) -> tuple[np.ndarray, float]:
    """Returns each utterance's share of its batch's excess audio, estimated before any cut, and the mean batch audio.

    A batch of m utterances of about d seconds holds m * d seconds; against the mean
    batch's mu, each of its utterances adds d - mu / m. Short utterances fill their
    batches, a 35 s one alone in a 60 s batch leaves it light.
    """
    m = np.full(len(d), float(cfg.batch_size), np.float32) if cfg.batch_size > 0 else \
        np.maximum(1, np.floor(np.float32(cfg.batch_seconds) / d))
    mu = float(d.sum(dtype=np.float64) / (1 / m).sum(dtype=np.float64)) if len(d) else 0.0
    return d - np.float32(mu) / m, mu


def balanced_order(excess: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns the windows in a random order whose running excess stays within the largest |excess| of one window.

    Heavy (positive) and light windows each come in a random order; the next one
    is taken from the heavy ones while the running total is <= 0, else from the
    light ones. Any run of consecutive windows then holds about its share of audio.
    """
    heavy = np.flatnonzero(excess > 0)
    light = np.flatnonzero(excess <= 0)
    heavy, light = heavy[rng.permutation(len(heavy))].tolist(), light[rng.permutation(len(light))].tolist()
    weights = excess.tolist()
    order, total, i, j = [], 0.0, 0, 0
    while i < len(heavy) or j < len(light):
        if j == len(light) or (i < len(heavy) and total <= 0):
            window, i = heavy[i], i + 1
        else:
            window, j = light[j], j + 1
        order.append(window)
        total += weights[window]
    return np.asarray(order, np.int64)


def sorted_batches(durations: np.ndarray, cfg: PlanConfig, shards: np.ndarray | None = None,
                   chunks: np.ndarray | None = None) -> BatchSequence:
    """Returns epoch 0's batches (SortaGrad): all utterances by duration, cut inside windows.

    Ties keep index order; a duration-layout index is already in (duration, key) order,
    and then, given its chunks, windows are runs of whole chunks of at least
    EPOCH0_WINDOW_BATCHES batches of audio, so that no batch needs two of them and a
    worker reads a window's chunks alone. Otherwise windows are `window_utterances` long.
    Windows let the cut run vectorized; each costs at most one short batch.
    """
    n = len(durations)
    w = max(1, min(cfg.window_utterances, n))  # a window past the dataset is the dataset
    ordered = all(np.all(durations[a + 1:b] >= durations[a:b - 1]) for a, b in blocks_of_pairs(n))
    order = None if ordered else np.argsort(durations, kind="stable").astype(id_dtype(n))
    d = durations if order is None else durations[order]
    if ordered and chunks is not None and n:
        _, unit_starts, _ = units(shards, None, chunks)  # the index order is (shard, row) order too
        least = EPOCH0_WINDOW_BATCHES * (cfg.batch_size * float(d.max()) if cfg.batch_size > 0 else cfg.batch_seconds)
        audio = np.add.reduceat(d.astype(np.float64), unit_starts[:-1])
        bucket = before(audio) // least
        starts = cut_windows(d, unit_starts[:-1][np.r_[True, bucket[1:] != bucket[:-1]]], cfg)
    else:
        starts = cut(d, w, cfg)
    seconds = np.add.reduceat(d, starts[:-1]) if n else np.empty(0, np.float32)
    return BatchSequence(order, starts, np.arange(len(starts) - 1, dtype=id_dtype(n)), seconds)


def shuffled_batches(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray, chunks: np.ndarray | None,
                     epoch: int, cfg: PlanConfig, world_size: int) -> BatchSequence:
    """Returns a later epoch's batches: whole chunks in shuffled windows, windows in a balanced random order.

    1. Shards in a seeded random order, each shard's chunks in order, grouped into
       windows of about `window_utterances` utterances of whole chunks. A window is cut
       smaller where its estimated excess audio (estimated_excess) passes
       BALANCE_FRACTION of a lane's audio, so that no window unbalances ranks.
    2. Inside a window, utterances by duration (random tie-breaks), cut into batches.
    3. Windows in `balanced_order` of their batches' excess audio; inside a window,
       batches grouped by the chunk of their first utterance, in chunk order, and in a
       random order inside the group. A run of batches then reads whole chunks, each once.
    """
    n = len(durations)
    rng = np.random.default_rng([cfg.seed, epoch])
    by_shard, unit_starts, unit_shard = units(shards, rows, chunks)
    sizes = np.diff(unit_starts)
    shard_bounds = np.r_[0, np.flatnonzero(unit_shard[1:] != unit_shard[:-1]) + 1, len(sizes)] if n else np.zeros(1, int)
    shuffled = rng.permutation(len(shard_bounds) - 1)
    unit_order = ranges(shard_bounds[shuffled], np.diff(shard_bounds)[shuffled])  # units, shards shuffled
    d_in_order = durations if by_shard is None else durations[by_shard]
    excess, mu = estimated_excess(d_in_order, cfg)
    unit_excess = np.abs(np.add.reduceat(excess, unit_starts[:-1])) if n else np.empty(0, np.float32)
    del excess, d_in_order
    cap = max(BALANCE_FRACTION * float(durations.sum(dtype=np.float64)) / (world_size * max(1, cfg.lanes)),
              MIN_WINDOW_BATCHES * mu, 1e-9)
    w = max(1, min(cfg.window_utterances, n))
    sz = sizes[unit_order]
    by_count = before(sz) // w
    by_excess = np.floor(before(unit_excess[unit_order].astype(np.float64)) / cap)
    opens = np.r_[True, (by_count[1:] != by_count[:-1]) | (by_excess[1:] != by_excess[:-1])] if n else np.zeros(0, bool)
    window_of_unit = np.cumsum(opens) - 1
    window_units = np.r_[np.flatnonzero(opens), len(sz)]  # each window's first unit (in unit_order), then the count
    window_firsts = np.r_[before(sz)[opens], n]  # each window's first position in the epoch's order, then n
    order = np.empty(n, id_dtype(n))
    starts_parts, unit_parts, seconds_parts = [], [], []
    a = 0
    while a < len(window_firsts) - 1:  # blocks of whole windows, about BLOCK_UTTERANCES each
        b = max(a + 1, int(np.searchsorted(window_firsts, window_firsts[a] + BLOCK_UTTERANCES, side="right")) - 1)
        b = min(b, len(window_firsts) - 1)
        ua, ub, pa, pb = int(window_units[a]), int(window_units[b]), int(window_firsts[a]), int(window_firsts[b])
        positions = ranges(unit_starts[unit_order[ua:ub]], sz[ua:ub])
        ids = positions if by_shard is None else by_shard[positions]
        unit_of = np.repeat(np.arange(ua, ub), sz[ua:ub])
        # One sort of a uint64 key: window, then the float32 duration's bits (ordered as the values are), then
        # random bits that break ties
        window_bits = max(1, (b - a).bit_length())
        keys = np.repeat(np.arange(b - a, dtype=np.uint64), np.diff(window_firsts[a:b + 1])) << np.uint64(64 - window_bits)
        keys |= durations[ids].view(np.uint32).astype(np.uint64) << np.uint64(32 - window_bits)
        keys |= rng.integers(0, 1 << (32 - window_bits), pb - pa, dtype=np.uint64)
        by_key = np.argsort(keys)
        del keys
        ids, unit_of = ids[by_key], unit_of[by_key]
        order[pa:pb] = ids
        d = durations[ids]
        starts = cut_windows(d, window_firsts[a:b] - pa, cfg)[:-1]
        starts_parts.append(starts.astype(id_dtype(n)) + pa)
        unit_parts.append(unit_of[starts])
        seconds_parts.append(np.add.reduceat(d, starts))
        a = b
    if n == 0:
        return BatchSequence(order, np.zeros(1, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    first_unit = np.concatenate(unit_parts)
    seconds = np.concatenate(seconds_parts)
    batch_window = window_of_unit[first_unit]
    window_excess = np.bincount(batch_window, seconds - seconds.mean(dtype=np.float64), len(window_firsts) - 1)
    windows = balanced_order(window_excess, rng)
    unit_counts = np.diff(window_units)
    new_first = np.empty(len(windows), np.int64)
    new_first[windows] = before(unit_counts[windows])  # each window's first unit in the new order
    slot = new_first[batch_window] + first_unit - window_units[batch_window]  # the batch's unit, in the new order
    keys = slot.astype(np.uint64) << np.uint64(32) | rng.integers(0, 1 << 32, len(slot), dtype=np.uint64)
    sequence = np.argsort(keys).astype(id_dtype(n))
    starts_parts.append(np.array([n], id_dtype(n)))
    return BatchSequence(order, np.concatenate(starts_parts), sequence, seconds)


def epoch_batches(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray, epoch: int, cfg: PlanConfig,
                  chunks: np.ndarray | None = None, world_size: int = 1) -> BatchSequence:
    """Returns the epoch's global batch sequence: `sorted_batches` in epoch 0, else `shuffled_batches`.

    `chunks` (each utterance's read unit in its shard) keeps later epochs' windows to
    whole chunks; `world_size` is the one the epoch began on, which sizes windows.
    """
    durations = plan_durations(durations)
    if epoch == 0:
        return sorted_batches(durations, cfg, shards, chunks)
    return shuffled_batches(durations, shards, rows, chunks, epoch, cfg, world_size)


def deal_greedy(num_batches: int, world_size: int, lengths: list[int],
                seconds: np.ndarray | None) -> np.ndarray:
    """Returns where each rank's run starts in each cycle, shaped (cycles, ranks).

    Cycle c is `world_size` consecutive runs of lengths[c] positions, after the cycles
    before it. With `seconds` (each batch's audio seconds) a cycle's runs go heaviest
    first to the rank that has read least so far, then `swap_to_balance` narrows what
    is left; without, rank r takes run r.
    """
    if seconds is not None:
        cumulative = np.zeros(len(seconds) + 1)
        np.cumsum(seconds, dtype=np.float64, out=cumulative[1:])
    bases = before(np.asarray(lengths, np.int64)) * world_size
    run_starts = bases[:, None] + np.asarray(lengths, np.int64)[:, None] * np.arange(world_size, dtype=np.int64)
    if seconds is None or world_size == 1:
        return run_starts
    ends = np.minimum(run_starts + np.asarray(lengths, np.int64)[:, None], num_batches)
    weights = cumulative[ends] - cumulative[np.minimum(run_starts, num_batches)]
    runs = np.empty((len(lengths), world_size), np.int64)  # the run each rank takes in each cycle
    total = np.zeros(world_size)
    for c in range(len(lengths)):
        runs[c, np.argsort(total, kind="stable")] = np.argsort(-weights[c], kind="stable")
        total += weights[c, runs[c]]
    swap_to_balance(runs, weights, total)
    return np.take_along_axis(run_starts, runs, axis=1)


def swap_to_balance(runs: np.ndarray, weights: np.ndarray, total: np.ndarray) -> None:
    """Swaps, in place, one cycle's runs between the heaviest and the lightest rank while that narrows their gap.

    The greedy deal keeps ranks within about one cycle's widest spread of runs; with
    few cycles (a rank's lanes in later epochs) that can pass 1% of a rank's audio, and
    a swap of the runs whose difference is nearest half the gap closes most of it.
    """
    cycles = np.arange(len(runs))
    for _ in range(4 * runs.shape[1] if len(runs) else 0):
        heavy, light = int(np.argmax(total)), int(np.argmin(total))
        gap = total[heavy] - total[light]
        moved = weights[cycles, runs[:, heavy]] - weights[cycles, runs[:, light]]
        c = int(np.argmin(np.abs(gap - 2 * moved)))
        if not abs(gap - 2 * moved[c]) < gap * (1 - 1e-9):
            return
        runs[c, heavy], runs[c, light] = runs[c, light], runs[c, heavy]
        total[heavy] -= moved[c]
        total[light] += moved[c]


def deal_cycles(num_batches: int, world_size: int, segment: int, seconds: np.ndarray | None = None,
                min_cycles: int = MIN_CYCLES) -> tuple[np.ndarray, list[int]]:
    """Returns where each rank's segment starts in each dealing cycle, shaped (cycles, ranks), and their lengths.

    Positions are dealt in cycles of `world_size` segments of `segment` consecutive
    positions (then cycles of one position each for the rest); each rank takes one segment of
    every cycle, so all get k = ceil(batches / world) positions. With `seconds` (each
    batch's audio seconds), a cycle's segments go heaviest first to the rank that has
    read least so far, which keeps every rank within about one segment's spread of the
    others, and segments shrink so that there are at least `min_cycles` cycles; without,
    rank r takes segment r. Positions >= num_batches are padding slots; there are fewer
    than `world_size`, at most one a rank.
    """
    k = -(-num_batches // world_size) if num_batches else 0
    if seconds is not None:  # enough cycles to balance in: short epochs get shorter segments
        segment = max(1, min(segment, k // min_cycles))
    full_cycles, rest = divmod(k, segment)
    # the rest in one cycle (a cycle of single batches would cost each rank a chunk read a batch), but its
    # last batch a cycle of its own, so that the padding slots at the end go to different ranks
    lengths = [segment] * full_cycles + [n for n in (rest - 1, 1) if rest and n]
    return deal_greedy(num_batches, world_size, lengths, seconds), lengths


def deal_runs(num_batches: int, world_size: int, lanes: int,
              seconds: np.ndarray | None = None) -> tuple[np.ndarray, list[int], list[int]]:
    """Returns where each rank's run of each cycle starts, shaped (cycles, ranks), the runs' lengths and their lanes.

    A rank's k = ceil(batches / world) positions interleave `lanes` lanes: position p
    is lane p mod lanes, so lane l has ceil((k - l) / lanes) of them. Lane l of every
    rank is one run of consecutive batches of the global sequence: the sequence is cut
    into one cycle per lane of `world_size` runs, dealt as `deal_greedy` does. The last
    lane's last batch is a cycle of its own, so the padding slots at the end of the
    sequence (fewer than `world_size`) go to different ranks. A DataLoader worker that
    reads every w-th position, w dividing `lanes`, reads whole lanes: whole windows, so
    whole chunks, except at the ends of each run.
    """
    k = -(-num_batches // world_size) if num_batches else 0
    lengths = [max(0, -(-(k - lane) // lanes)) for lane in range(lanes)]
    of_lane = [lane for lane in range(lanes) if lengths[lane]]
    lengths = [lengths[lane] for lane in of_lane]
    if lengths:
        lengths[-1] -= 1
        lengths.append(1)
        of_lane.append(of_lane[-1])
    return deal_greedy(num_batches, world_size, lengths, seconds), lengths, of_lane


def epoch_deal(epoch: int, num_batches: int, world_size: int, cfg: PlanConfig,
               seconds: np.ndarray) -> tuple[np.ndarray, list[int], list[int] | None]:
    """Returns the epoch's deal: (firsts, lengths) of its cycles and, where a rank's lanes interleave, each cycle's lane.

    Epoch 0 (`deal_cycles`): a rank reads its cycles one after another, so its batches
    stay in duration order. Later epochs (`deal_runs`): a rank's positions interleave
    `cfg.lanes` lanes.
    """
    if epoch == 0:  # long segments: a worker's chunks are shared only where a segment starts or ends
        k = -(-num_batches // world_size) if num_batches else 0
        segment = max(1, cfg.segment_batches, -(-k // EPOCH0_CYCLES))
        return (*deal_cycles(num_batches, world_size, segment, seconds, EPOCH0_CYCLES), None)
    return deal_runs(num_batches, world_size, max(1, cfg.lanes), seconds)


def lane_runs(firsts: np.ndarray, lengths: list[int], of_lane: list[int], rank: int) -> list[list[tuple[int, int]]]:
    """Returns, per lane, the (first, length) runs of the global sequence a rank reads in it, in order."""
    runs: list[list[tuple[int, int]]] = [[] for _ in range(max(of_lane, default=-1) + 1)]
    for c, (length, lane) in enumerate(zip(lengths, of_lane)):
        runs[lane].append((int(firsts[c, rank]), length))
    return runs


def positions_of(firsts: np.ndarray, lengths: list[int], rank: int, of_lane: list[int] | None = None) -> list[int]:
    """Returns the global positions rank `rank` takes, in order, from `deal_cycles`' or `deal_runs`' result."""
    if of_lane is None:
        return [p for first, length in zip(firsts[:, rank].tolist(), lengths) for p in range(first, first + length)]
    lanes = [[p for first, length in runs for p in range(first, first + length)]
             for runs in lane_runs(firsts, lengths, of_lane, rank)]
    return [lanes[p % len(lanes)][p // len(lanes)] for p in range(sum(lengths))]


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


def with_lanes(plan: RankPlan, epoch: int, cfg: PlanConfig, shards: np.ndarray, chunks: np.ndarray | None) -> RankPlan:
    """Returns `plan` with each position's lane, for workers to read whole chunks (see work.worker_positions).

    Later epochs: position p is lane p mod `cfg.lanes`, as `deal_runs` dealt it. Epoch 0:
    the rank's positions fall into runs of batches that share chunks (a window's, see
    `sorted_batches`), of at most MAX_RUN_BATCHES; each run
    goes to the lane with the fewest positions so far, so that a worker reads whole
    chunks and, in any prefix of positions, lanes differ by at most one run (what the
    loader holds to put batches back in order). Without chunks there are no lanes.
    """
    lanes = max(1, cfg.lanes)
    if epoch > 0:
        return RankPlan(plan.batches, plan.repeated, (np.arange(len(plan.batches)) % lanes).astype(np.int8), lanes)
    if chunks is None or not plan.batches:
        return plan
    def code(ids: np.ndarray) -> np.ndarray:
        return shards[ids].astype(np.int64) << 32 | chunks[ids]

    first = code(np.array([b[0] for b in plan.batches], np.int64))
    last = code(np.array([b[-1] for b in plan.batches], np.int64))
    return RankPlan(plan.batches, plan.repeated, run_lanes(first, last, lanes), lanes)


def run_lanes(first: np.ndarray, last: np.ndarray, lanes: int, most: int = MAX_RUN_BATCHES) -> np.ndarray:
    """Returns the lane of each position, given the chunk (shard << 32 | chunk) of each batch's first and last utterance.

    A run is positions whose batches share chunks one after another, of at most
    `most`; each run goes to the lane with the fewest positions so far.
    """
    opens = np.r_[True, first[1:] != last[:-1]]
    run_first = np.flatnonzero(opens)[np.cumsum(opens) - 1]
    opens |= (np.arange(len(opens)) - run_first) % most == 0  # short enough to keep workers busy together
    starts = np.r_[np.flatnonzero(opens), len(opens)]
    of_position = np.empty(len(first), np.int8)
    counts = [0] * lanes
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        lane = counts.index(min(counts))
        of_position[a:b] = lane
        counts[lane] += b - a
    return of_position


def plan_rank(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray, world_size: int, rank: int,
              epoch: int, cfg: PlanConfig, chunks: np.ndarray | None = None) -> RankPlan:
    """Returns one rank's batches for one epoch, materializing no other rank's."""
    return plan_rank_resumed(durations, shards, rows, epoch, cfg, [], world_size, rank, chunks)


def plan_epoch(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray,
               world_size: int, epoch: int, cfg: PlanConfig, chunks: np.ndarray | None = None) -> EpochPlan:
    """Returns every rank's batches for one epoch; utterances are index positions."""
    if world_size < 1:
        raise ValueError("world size must be at least 1")
    sequence = epoch_batches(durations, shards, rows, epoch, cfg, chunks, world_size)
    firsts, lengths, of_lane = epoch_deal(epoch, len(sequence), world_size, cfg, sequence.seconds())
    ranks, repeated_batches, repeated_utterances = [], 0, 0
    for r in range(world_size):
        plan, repeated = rank_plan(sequence, positions_of(firsts, lengths, r, of_lane))
        plan = with_lanes(plan, epoch, cfg, shards, chunks)
        ranks.append(plan)
        repeated_batches += sum(plan.repeated)
        repeated_utterances += repeated
    return EpochPlan(ranks, repeated_batches, repeated_utterances)


def read_mask(epoch: int, num_batches: int, world_size: int, consumed: list[int], cfg: PlanConfig,
              seconds: np.ndarray) -> np.ndarray:
    """Returns a mask over `num_batches` dealt to `world_size` ranks: True where a rank had read the batch.

    `consumed[r]` is how many of its batches rank r had read (its reader position).
    Padding slots (past the batches) are not in the mask: they were repeats.
    """
    if len(consumed) != world_size:
        raise ValueError(f"{len(consumed)} positions saved for {world_size} ranks")
    firsts, lengths, of_lane = epoch_deal(epoch, num_batches, world_size, cfg, seconds)
    mask = np.zeros(num_batches, bool)
    if of_lane is not None:  # rank r's first `count` positions: ceil((count - l) / lanes) of lane l's runs
        lanes = max(of_lane, default=0) + 1
        for r, count in enumerate(consumed):
            for lane, runs in enumerate(lane_runs(firsts, lengths, of_lane, r)):
                read = max(0, -(-(count - lane) // lanes))
                for first, length in runs:
                    mask[first:first + min(read, length)] = True
                    read -= min(read, length)
        return mask
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    for r, count in enumerate(consumed):
        whole = int(np.searchsorted(bounds, count, side="right")) - 1  # cycles read entirely
        for c in range(whole):
            mask[firsts[c, r]:firsts[c, r] + lengths[c]] = True
        if whole < len(lengths):
            mask[firsts[whole, r]:firsts[whole, r] + count - bounds[whole]] = True
    return mask


def left_after(epoch: int, seconds: np.ndarray, cfg: PlanConfig, history: list[tuple[int, list[int]]]) -> np.ndarray:
    """Returns the global positions of an epoch's batches that no earlier run read, in order.

    `history` holds one (world size, each rank's position) per earlier run of the epoch; the
    first run dealt every batch, each later one what the runs before it had left.
    """
    left = np.arange(len(seconds))
    for world_size, consumed in history:
        left = left[~read_mask(epoch, len(left), world_size, consumed, cfg, seconds[left])]
    return left


def plan_rank_resumed(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray, epoch: int, cfg: PlanConfig,
                      history: list[tuple[int, list[int]]], world_size: int, rank: int,
                      chunks: np.ndarray | None = None) -> RankPlan:
    """Returns one rank's batches for the rest of an epoch that earlier runs (`history`) had partly read.

    The batches no earlier run read are dealt to `world_size` ranks like a whole epoch's,
    heaviest segment first to the rank that has read least, padded with counted repeats.
    With an empty history this is `plan_rank`. The epoch's batches are those of the world
    size it began on.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    began_on = history[0][0] if history else world_size
    sequence = epoch_batches(durations, shards, rows, epoch, cfg, chunks, began_on)
    seconds = sequence.seconds()
    if not history:  # the whole epoch: no copies of the per-batch arrays (30M utterances: 6M batches)
        firsts, lengths, of_lane = epoch_deal(epoch, len(sequence), world_size, cfg, seconds)
        return with_lanes(rank_plan(sequence, positions_of(firsts, lengths, rank, of_lane))[0], epoch, cfg, shards,
                          chunks)
    left = left_after(epoch, seconds, cfg, history)
    firsts, lengths, of_lane = epoch_deal(epoch, len(left), world_size, cfg, seconds[left])
    mine = positions_of(firsts, lengths, rank, of_lane)
    # a slot past the remaining batches stays past the sequence, so rank_plan makes it a repeat
    plan = rank_plan(sequence, [int(left[p]) if p < len(left) else len(sequence) + p - len(left) for p in mine])[0]
    return with_lanes(plan, epoch, cfg, shards, chunks)
