"""bench/locality: what each worker and rank reads per epoch against what it trains on, at scale, from the plan.

    python -m bench.locality [--sizes 3000000:64,30000000:512] [--workers 4] [--epochs 0,1,2]

A synthetic duration-layout index (bench.plan's durations) in 256 MB shards of 16 MB
chunks of 20 KB/s audio (FLAC of 16 kHz speech), as pack lays one out. For every
epoch the global batch sequence and the deal are made once (hdfs_io.reader.planner), and every
worker of every rank is given its positions (every k-th, as ShardLoader does):
- amplification: bytes of the chunks a worker reads / bytes of the utterances it
  trains on, for every worker (each chunk it needs read once) and, replaying
  ChunkFetcher's policy with its `max_held_chunks` (re-reads included), for rank 0's
  workers; per rank, the same summed over its workers;
- shard opens by all workers together (a worker opens a shard once for its chunks),
  against the number of shards and against small files (one open an utterance);
- shuffle quality: how many distinct shards one global step draws from across all
  ranks, and the share of rank 0's utterances it also read the epoch before;
- imbalance (max - min) / mean of ranks' audio, and padding waste (padded / real audio - 1).
Goals (issue 28): amplification <= 1.15 per worker and per rank; opens <= 3 x shards.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import write_result
from bench.plan import synthetic_index
from hdfs_io.format import dataset_format as F
from hdfs_io.reader.planner import PlanConfig, epoch_batches, epoch_deal, positions_of, ranges, run_lanes
from hdfs_io.reader.reader_config import ReaderConfig
from hdfs_io.reader.work import worker_positions


def replay(uses: np.ndarray, cap: int) -> tuple[np.ndarray, int]:
    """Returns (the chunks read, re-reads included, as indexes into np.unique(uses); re-reads) of ChunkFetcher
    serving `uses` (a chunk code per item, in order)."""
    codes, first, inverse = np.unique(uses, return_index=True, return_inverse=True)
    order = np.argsort(first)
    by_chunk = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    ends = np.cumsum(counts)
    items_of = [by_chunk[end - n:end] for n, end in zip(counts, ends)]
    remaining = counts.copy()
    ready: set[int] = set()
    dropped: set[int] = set()
    pulled = rereads = 0
    reads: list[int] = []
    for t, c in enumerate(inverse.tolist()):
        if c in dropped:
            dropped.discard(c)
            ready.add(c)
            reads.append(c)
            rereads += 1
        while c not in ready:
            ready.add(int(order[pulled]))
            reads.append(int(order[pulled]))
            pulled += 1
        while len(ready) > max(1, cap):
            victim = max((x for x in ready if x != c),
                         key=lambda x: int(items_of[x][np.searchsorted(items_of[x], t)]))
            ready.discard(victim)
            dropped.add(victim)
        remaining[c] -= 1
        if remaining[c] == 0:
            ready.discard(c)
    return np.asarray(reads, np.int64), rereads


def synthetic(utterances: int, kb_per_second: float, shard_mb: float):
    """Returns (durations, shards, rows, chunks) of a duration-layout index in shards of 16 MB chunks."""
    durations, _, _ = synthetic_index(utterances, shard_rows=1)
    kb = np.cumsum(durations.astype(np.float64) * kb_per_second)
    shards = (kb // (shard_mb * 1024)).astype(np.int32)
    firsts = np.r_[0, np.flatnonzero(np.diff(shards)) + 1]
    rows = (np.arange(utterances) - firsts[shards - shards[0]]).astype(np.int32)
    chunks = (kb // (F.SEQ_CHUNK_BYTES / 1024)).astype(np.int64)
    chunks -= np.minimum.reduceat(chunks, firsts)[shards - shards[0]]
    return durations, shards, rows, chunks.astype(np.int32)


def worker_ids(sequence, positions: np.ndarray) -> np.ndarray:
    """Returns the utterances of the batches at `positions` of the global sequence, in order (padding left out)."""
    positions = positions[positions < len(sequence)]
    b = sequence.sequence[positions].astype(np.int64)
    firsts, counts = sequence.starts[b].astype(np.int64), np.diff(sequence.starts)[b].astype(np.int64)
    where = ranges(firsts, counts)
    return where if sequence.order is None else sequence.order[where].astype(np.int64)


def rank_lanes(sequence, positions: np.ndarray, code: np.ndarray, epoch: int, lanes: int) -> np.ndarray:
    """Returns each of a rank's positions' lane, as hdfs_io.reader.planner.with_lanes gives them (padding: the
    batch repeated)."""
    if epoch > 0:
        return (np.arange(len(positions)) % lanes).astype(np.int8)
    real = np.minimum(positions, len(sequence) - 1)  # a padding slot's lane does not matter for what is read
    b = sequence.sequence[real].astype(np.int64)
    ends = sequence.starts[b + 1].astype(np.int64) - 1
    first, last = sequence.starts[b].astype(np.int64), ends
    if sequence.order is not None:
        first, last = sequence.order[first], sequence.order[last]
    return run_lanes(code[first], code[last], lanes)


def epoch_rows(columns, world: int, workers: int, epoch: int, cfg: PlanConfig, cap: int, kb_per_second: float,
               previous: set | None) -> tuple[dict, set]:
    durations, shards, rows, chunks = columns
    started = time.perf_counter()
    sequence = epoch_batches(durations, shards, rows, epoch, cfg, chunks, world)
    seconds = sequence.seconds()
    firsts, lengths, of_lane = epoch_deal(epoch, len(sequence), world, cfg, seconds)
    plan_s = time.perf_counter() - started
    code = shards.astype(np.int64) << 32 | chunks
    chunk_codes, chunk_of = np.unique(code, return_inverse=True)
    chunk_kb = np.bincount(chunk_of, durations.astype(np.float64) * kb_per_second)
    amp, rank_amp, opens, rank_audio, rank0 = [], [], 0, [], []
    positions = [np.asarray(positions_of(firsts, lengths, r, of_lane)) for r in range(world)]
    for r in range(world):
        read_kb = trained_kb = 0.0
        lanes = rank_lanes(sequence, positions[r], code, epoch, cfg.lanes)
        for w in range(workers):
            ids = worker_ids(sequence, positions[r][worker_positions(len(positions[r]), 0, w, workers, lanes,
                                                                     cfg.lanes)])
            if not len(ids):
                continue
            mine = np.unique(chunk_of[ids])
            kb = chunk_kb[mine].sum()
            own = durations[ids].astype(np.float64).sum() * kb_per_second
            amp.append(kb / own)
            read_kb, trained_kb = read_kb + kb, trained_kb + own
            opens += len(np.unique(shards[ids]))
            if r == 0:
                reads, rereads = replay(chunk_of[ids], cap)
                rank0.append({"worker": w, "utterances": len(ids), "chunk_reads": len(reads), "rereads": rereads,
                              "amplification": float(chunk_kb[reads].sum() / own)})
        rank_amp.append(read_kb / trained_kb)
        rank_audio.append(trained_kb / kb_per_second)
    steps = len(positions[0])
    sampled = np.unique(np.linspace(0, steps - 1, min(steps, 9)).astype(int))
    step_shards = [len(np.unique(np.concatenate([shards[worker_ids(sequence, positions[r][[i]])]
                                                 for r in range(world)]))) for i in sampled]
    mine = set(worker_ids(sequence, positions[0]).tolist())
    starts = sequence.starts.astype(np.int64)
    d = durations if sequence.order is None else durations[sequence.order]
    longest = np.maximum.reduceat(d, starts[:-1])
    padded = float((longest.astype(np.float64) * np.diff(starts)).sum() / seconds.astype(np.float64).sum())
    audio = np.asarray(rank_audio)
    row = {"utterances": len(durations), "world_size": world, "workers": workers, "epoch": epoch,
           "shards": int(shards.max()) + 1, "chunks": len(chunk_codes), "plan_and_deal_s": plan_s,
           "amplification_worker_mean": float(np.mean(amp)), "amplification_worker_max": float(np.max(amp)),
           "amplification_rank_max": float(np.max(rank_amp)), "rank0_workers_replayed": rank0,
           "shard_opens": opens, "opens_per_shard": opens / (int(shards.max()) + 1),
           "small_files_over_opens": len(durations) / opens,
           "distinct_shards_per_step_median": float(np.median(step_shards)),
           "distinct_shards_per_step_min": int(np.min(step_shards)),
           "rank0_overlap_with_previous_epoch": (len(mine & previous) / len(mine)) if previous else None,
           "imbalance": float(np.ptp(audio) / audio.mean()), "padding_waste": padded - 1}
    return row, mine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="3000000:64,30000000:512", help="UTTERANCES:WORLD,...")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", default="0,1,2")
    p.add_argument("--kb-per-second", type=float, default=20.0)
    p.add_argument("--shard-mb", type=float, default=256.0)
    args = p.parse_args(argv)
    cfg = PlanConfig()
    cap = ReaderConfig().max_held_chunks
    out = []
    for size in args.sizes.split(","):
        n, world = map(int, size.split(":"))
        columns = synthetic(n, args.kb_per_second, args.shard_mb)
        previous = None
        for epoch in map(int, args.epochs.split(",")):
            r, previous = epoch_rows(columns, world, args.workers, epoch, cfg, cap, args.kb_per_second, previous)
            out.append(r)
            replayed = max(w["amplification"] for w in r["rank0_workers_replayed"])
            print(f"{n:>10,} utterances, {world} ranks x {args.workers} workers, epoch {epoch}: amplification "
                  f"per worker mean {r['amplification_worker_mean']:.3f} max {r['amplification_worker_max']:.3f} "
                  f"(rank 0 replayed, re-reads in: max {replayed:.3f}), per rank max {r['amplification_rank_max']:.3f}; "
                  f"{r['opens_per_shard']:.2f} opens a shard ({r['small_files_over_opens']:.0f}x fewer than small "
                  f"files); {r['distinct_shards_per_step_median']:.0f} shards a step; overlap "
                  f"{r['rank0_overlap_with_previous_epoch'] if r['rank0_overlap_with_previous_epoch'] is not None else '-'}"
                  f"; imbalance {100 * r['imbalance']:.2f}%; padding {100 * r['padding_waste']:.3f}%", flush=True)
    path = write_result("locality", {"lanes": cfg.lanes, "window_utterances": cfg.window_utterances,
                                     "max_held_chunks": cap, "kb_per_second": args.kb_per_second,
                                     "shard_mb": args.shard_mb, "rows": out,
                                     "goal": "amplification <= 1.15 per worker and rank; opens <= 3 x shards"})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
