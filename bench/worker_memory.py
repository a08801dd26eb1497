"""bench/worker_memory: what a DataLoader worker holds of a synthetic 1M- and 10M-utterance index.

    python -m bench.worker_memory [--sizes 1000000,10000000] [--world-size 8] [--workers 4]

A rank of `world-size` plans epoch 1 of a synthetic index (bench.plan's, with the other
per-utterance columns a reader holds: CRC32s and chunk ids) and hands one of its
`workers` workers its Work (hdfs_io.reader.work), as ShardLoader does. A fresh spawned process
receives it through a multiprocessing queue; its RSS growth (VmHWM after minus RSS
before) is the worker's share. Beside it, the same for what a worker received before:
the dataset's per-utterance arrays, whole. Medians of --repeats.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle

import numpy as np

from bench.common import median, write_result
from bench.plan import CONFIG, peak_rss_mb, reset_peak_rss, rss_mb, synthetic_index
from hdfs_io.reader.planner import plan_rank
from hdfs_io.reader.work import work_for, worker_positions


def receive(inbox, outbox) -> None:
    """In a fresh process: reports the RSS growth from receiving one payload."""
    import hdfs_io.reader.work  # noqa: F401  (the imports a worker has before its work arrives)
    before = rss_mb()
    reset_peak_rss()
    payload = inbox.get()
    outbox.put(peak_rss_mb() - before)
    del payload


def growth_mb(context, payload) -> float:
    inbox, outbox = context.Queue(), context.Queue()
    child = context.Process(target=receive, args=(inbox, outbox))
    child.start()
    inbox.put(payload)
    grown = outbox.get(timeout=600)
    child.join()
    return grown


def payloads(utterances: int, world: int, workers: int) -> dict:
    """Returns {"work": one worker's Work, "dataset arrays": what a worker received before}."""
    durations, shards, rows = synthetic_index(utterances)
    columns = {"durations": durations, "shards": shards, "rows": rows, "chunks": (rows // 500).astype(np.int32)}
    plan = plan_rank(durations, shards, rows, world, 0, 1, CONFIG)
    work = work_for(1, plan, worker_positions(len(plan.batches), 0, 0, workers),
                    lambda ids: {name: column[ids] for name, column in columns.items()})
    return {"work": work, "dataset arrays": columns}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,10000000")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    rows = []
    for size in map(int, args.sizes.split(",")):
        for name, payload in payloads(size, args.world_size, args.workers).items():
            runs = [growth_mb(context, payload) for _ in range(args.repeats)]
            row = {"utterances": size, "world_size": args.world_size, "workers": args.workers, "payload": name,
                   "pickled_mb": len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)) / 2**20,
                   "worker_grows_mb": median(runs), "runs_mb": runs}
            rows.append(row)
            print(f"{size:>10,} utterances, {name:14s}: {row['pickled_mb']:7.1f} MB pickled, worker RSS "
                  f"+{row['worker_grows_mb']:.1f} MB", flush=True)
    path = write_result("worker_memory", {"rows": rows, "goal": "a worker holds only its own share"})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
