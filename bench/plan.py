"""bench/plan: plan a synthetic index of 3M utterances (about 10,000 hours) for 64 ranks.

    python -m bench.plan [--utterances 3000000] [--world-size 64] [--repeats 3]

Goals: planning an epoch under 5 s; per-rank duration imbalance, (max - min) / mean
of the audio seconds each rank reads, at most 1%.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import bench_args, median, write_result
from hdfs_io.plan import PlanConfig, plan_epoch


def synthetic_index(n: int, seed: int = 0, shard_rows: int = 20000):
    """Returns (durations, shards, rows) of a duration-layout index: LibriSpeech-like 1-35 s lengths."""
    rng = np.random.default_rng(seed)
    durations = np.sort(np.clip(rng.gamma(4.0, 3.0, n), 1.0, 35.0))
    ids = np.arange(n)
    return durations, ids // shard_rows, ids % shard_rows


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv, utterances=3_000_000, world_size=64)
    durations, shards, rows = synthetic_index(args.utterances)
    cfg = PlanConfig(batch_seconds=60.0)
    rows_out = {}
    for epoch in (0, 1):
        times, plan = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            plan = plan_epoch(durations, shards, rows, args.world_size, epoch, cfg)
            times.append(time.perf_counter() - started)
        per_rank = np.array([sum(durations[b].sum() for b in r.batches) for r in plan.ranks])
        rows_out[f"epoch{epoch}"] = {
            "median_s": median(times), "runs_s": times, "batches_per_rank": len(plan.ranks[0].batches),
            "imbalance": float((per_rank.max() - per_rank.min()) / per_rank.mean()),
            "repeated_batches": plan.repeated_batches}
    result = {"utterances": args.utterances, "hours": float(durations.sum() / 3600), "world_size": args.world_size,
              "batch_seconds": cfg.batch_seconds, "rows": rows_out,
              "goal": "plan < 5 s, per-rank duration imbalance <= 1%"}
    path = write_result("plan", result)
    for name, r in rows_out.items():
        print(f"{name}: {r['median_s']:.2f} s, imbalance {100 * r['imbalance']:.3f}%, "
              f"{r['batches_per_rank']} batches/rank, {r['repeated_batches']} repeated")
    print(f"{result['hours']:.0f} h -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
