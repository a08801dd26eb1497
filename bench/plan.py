"""bench/plan: what one rank pays to plan an epoch of a synthetic index, at 3M utterances on 64 ranks and 30M on 512.

    python -m bench.plan [--sizes 3000000:64,30000000:512] [--repeats 3]

Each (size, epoch) runs in a fresh process, as a rank would: it holds the index's
numeric columns (float32 durations, int32 shards and rows, as a reader does), then
plans its own share with `plan_rank`. Reported: the median time, the RSS planning
adds above the RSS once the index is held (peak minus before), and the per-rank
imbalance of audio seconds, (max - min) / mean over all ranks, repeats included.
Goals (issue "Read 30 million utterances on 512 ranks"): under 5 s per epoch per
rank, under 500 MB added, imbalance at most 1% in every epoch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from bench.common import median, write_result
from hdfs_io.reader.planner import PlanConfig, deal_cycles, epoch_batches, plan_rank

CONFIG = PlanConfig(batch_seconds=60.0)


def synthetic_index(n: int, seed: int = 0, shard_rows: int = 20000):
    """Returns (durations, shards, rows) of a duration-layout index: LibriSpeech-like 1-35 s lengths."""
    rng = np.random.default_rng(seed)
    durations = np.sort(np.clip(rng.gamma(4.0, 3.0, n), 1.0, 35.0)).astype(np.float32)
    ids = np.arange(n, dtype=np.int32)
    return durations, ids // shard_rows, ids % shard_rows


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Resets this process's peak RSS (VmHWM), so the peak that follows is planning's, not the index build's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def imbalance(durations: np.ndarray, shards: np.ndarray, rows: np.ndarray, world: int, epoch: int) -> float:
    """Returns (max - min) / mean of the audio seconds each rank reads, a padding slot counting its repeat."""
    sequence = epoch_batches(durations, shards, rows, epoch, CONFIG)
    seconds = sequence.seconds()
    firsts, lengths = deal_cycles(len(sequence), world, CONFIG.segment_batches, seconds)
    cumulative = np.r_[0.0, np.cumsum(seconds, dtype=np.float64)]
    totals = np.zeros(world)
    last = np.zeros(world)
    for row, length in zip(firsts, lengths):
        first, end = np.minimum(row, len(sequence)), np.minimum(row + length, len(sequence))
        totals += cumulative[end] - cumulative[first]
        last = np.where(end > first, seconds[np.maximum(end - 1, 0)], last)
        totals += (length - (end - first)) * last  # a padding slot repeats the rank's previous batch
    return float((totals.max() - totals.min()) / totals.mean())


def one(utterances: int, world: int, epoch: int, repeats: int) -> dict:
    """Measures one (size, world, epoch) in this process; returns its row."""
    durations, shards, rows = synthetic_index(utterances)
    before = rss_mb()
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        plan = plan_rank(durations, shards, rows, world, 0, epoch, CONFIG)
        times.append(time.perf_counter() - started)
        del plan
    peak = peak_rss_mb()
    return {"utterances": utterances, "world_size": world, "epoch": epoch, "median_s": median(times),
            "runs_s": times, "rss_before_mb": before, "planning_added_mb": peak - before,
            "imbalance": imbalance(durations, shards, rows, world, epoch),
            "hours": float(durations.astype(np.float64).sum() / 3600)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="3000000:64,30000000:512", help="UTTERANCES:WORLD,...")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)  # UTTERANCES:WORLD:EPOCH, run in a child process
    args = p.parse_args(argv)
    if args.one:
        utterances, world, epoch = map(int, args.one.split(":"))
        print(json.dumps(one(utterances, world, epoch, args.repeats)))
        return 0
    rows = []
    for size in args.sizes.split(","):
        for epoch in (0, 1):
            child = subprocess.run([sys.executable, "-m", "bench.plan", "--one", f"{size}:{epoch}",
                                    "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['utterances']:>10,} utterances, {row['world_size']:>3} ranks, epoch {epoch}: "
                  f"{row['median_s']:.2f} s, +{row['planning_added_mb']:.0f} MB over {row['rss_before_mb']:.0f} MB, "
                  f"imbalance {100 * row['imbalance']:.3f}%", flush=True)
    path = write_result("plan", {"config": {"batch_seconds": CONFIG.batch_seconds,
                                            "segment_batches": CONFIG.segment_batches,
                                            "window_utterances": CONFIG.window_utterances},
                                 "rows": rows,
                                 "goal": "< 5 s per epoch per rank, < 500 MB added, imbalance <= 1% every epoch"})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
