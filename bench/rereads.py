"""bench/rereads: chunk reads and re-reads per epoch of one worker, at scale, from the plan and the chunk layout.

    python -m bench.rereads [--sizes 3000000:64,30000000:512] [--workers 4] [--kb-per-second 20]
    python -m bench.rereads --dataset URI [--world-size 1] [--workers 4]   # a packed dataset's own index

Replays ChunkFetcher's policy (chunks read in order of first use; at most
`max_held_chunks` held, the one needed again last dropped first and read again
when needed) over the chunk of every utterance worker 0 of rank 0 reads, in epochs
0 and 1. The synthetic index is laid out as the pack job lays one out by duration
(bench.plan's durations, in duration order) and cut into 16 MB chunks of
`kb-per-second` of audio (FLAC of 16 kHz speech: about 20 KB/s). With --dataset the
real index's chunks are used; the replay then matches the reader's counts
(bench/memory measures those).
Goal: re-reads under 5% of chunk reads in every epoch at the default cap.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import write_result
from bench.plan import synthetic_index
from hdfs_io import dataset_format as F
from hdfs_io.plan import PlanConfig, plan_rank
from hdfs_io.reader_config import ReaderConfig
from hdfs_io.shard_reader import ShardDataset


def replay(uses: np.ndarray, cap: int) -> tuple[int, int]:
    """Returns (chunk reads, re-reads) of ChunkFetcher serving `uses` (a chunk code per item, in order)."""
    codes, first, inverse = np.unique(uses, return_index=True, return_inverse=True)
    order = np.argsort(first)
    by_chunk = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    ends = np.cumsum(counts)
    items_of = [by_chunk[end - n:end] for n, end in zip(counts, ends)]
    remaining = counts.copy()
    ready: set[int] = set()
    dropped: set[int] = set()
    pulled = reads = rereads = 0
    for t, c in enumerate(inverse.tolist()):
        if c in dropped:
            dropped.discard(c)
            ready.add(c)
            reads += 1
            rereads += 1
        while c not in ready:
            ready.add(int(order[pulled]))
            pulled += 1
            reads += 1
        while len(ready) > max(1, cap):
            victim = max((x for x in ready if x != c),
                         key=lambda x: int(items_of[x][np.searchsorted(items_of[x], t)]))
            ready.discard(victim)
            dropped.add(victim)
        remaining[c] -= 1
        if remaining[c] == 0:
            ready.discard(c)
    return reads, rereads


def synthetic(utterances: int, kb_per_second: float):
    """Returns (durations, shards, rows, chunks) of a duration-layout index in 16 MB chunks."""
    durations, shards, rows = synthetic_index(utterances)
    kb = np.cumsum(durations.astype(np.float64) * kb_per_second)
    chunks = (kb // (F.SEQ_CHUNK_BYTES / 1024)).astype(np.int64)
    chunks -= np.minimum.reduceat(chunks, np.r_[0, np.flatnonzero(np.diff(shards)) + 1])[shards - shards[0]]
    return durations, shards, rows, chunks.astype(np.int32)


def row(durations, shards, rows, chunks, world: int, workers: int, epoch: int, cfg: PlanConfig, cap: int) -> dict:
    plan = plan_rank(durations, shards, rows, world, 0, epoch, cfg)
    mine = [plan.batches[p] for p in range(0, len(plan.batches), workers)]
    ids = np.concatenate(mine)
    reads, rereads = replay(shards[ids].astype(np.int64) << 32 | chunks[ids], cap)
    distinct = len(np.unique(shards[ids].astype(np.int64) << 32 | chunks[ids]))
    return {"utterances": len(durations), "world_size": world, "workers": workers, "epoch": epoch,
            "worker_utterances": len(ids), "distinct_chunks": distinct, "chunk_reads": reads, "chunk_rereads": rereads,
            "reread_fraction": rereads / reads if reads else 0.0,
            "utterances_per_chunk": float(len(durations) / len(np.unique(shards.astype(np.int64) << 32 | chunks)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="3000000:64,30000000:512", help="UTTERANCES:WORLD,...")
    p.add_argument("--dataset", help="replay a packed dataset's own index instead")
    p.add_argument("--world-size", type=int, default=1, help="with --dataset")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kb-per-second", type=float, default=20.0)
    p.add_argument("--window-utterances", type=int, default=PlanConfig().window_utterances)
    args = p.parse_args(argv)
    cfg = PlanConfig(window_utterances=args.window_utterances)
    cap = ReaderConfig().max_held_chunks
    if args.dataset:
        ds = ShardDataset(args.dataset, 0, args.world_size)
        inputs = [((ds.durations, ds.shards, ds.rows, ds.chunks), args.world_size)]
    else:
        inputs = [(synthetic(int(n), args.kb_per_second), int(w))
                  for n, w in (size.split(":") for size in args.sizes.split(","))]
    rows_out = []
    for columns, world in inputs:
        for epoch in (0, 1):
            r = row(*columns, world, args.workers, epoch, cfg, cap)
            rows_out.append(r)
            print(f"{r['utterances']:>10,} utterances ({r['utterances_per_chunk']:.0f} a chunk), {world} ranks, "
                  f"worker 0 of {args.workers}, epoch {epoch}: {r['chunk_reads']:,} chunk reads of "
                  f"{r['distinct_chunks']:,} chunks, {100 * r['reread_fraction']:.1f}% re-reads", flush=True)
    name = "rereads_dataset" if args.dataset else "rereads"
    path = write_result(name, {"window_utterances": cfg.window_utterances, "max_held_chunks": cap,
                               "kb_per_second": args.kb_per_second, "rows": rows_out,
                               "goal": "re-reads < 5% of chunk reads in every epoch"})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
