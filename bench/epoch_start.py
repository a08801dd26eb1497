"""bench/epoch_start: how long the first batch of an epoch is waited for, against the other batches.

    python -m bench.epoch_start DATASET_URI [--ref 5772c96] [--repeats 3] [--epochs 9]
                                [--step-seconds 0.1] [--workers 2] [--busy-threads 0]

One rank reads the dataset through ShardLoader for several epochs, as a trainer
would: each batch is "trained on" for --step-seconds, and the wait for every batch
is timed. A step is a sleep, which leaves the machine's cores to the reader, or with
--busy-threads N, matrix products on N torch threads, which contend for them as a
trainer's steps do. Epoch 0 is left
out of the first batches (it includes starting the workers). With --ref, the same
run of that commit's reader (a git worktree under bench/work/) alternates with this
checkout's, each in its own process. Reported per side, as medians over the runs:
the mean and median wait for an epoch's first batch and for the others, their ratio,
and how long before it was asked for the first batch had been formed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def step(seconds: float, busy_threads: int) -> None:
    """A training step's stand-in: a sleep, or `seconds` of matrix products on `busy_threads` threads."""
    if not busy_threads:
        time.sleep(seconds)
        return
    import torch

    torch.set_num_threads(busy_threads)
    a, until = torch.rand(256, 256), time.perf_counter() + seconds
    while time.perf_counter() < until:
        a = torch.tanh(a @ a)


def one_run(dataset: str, epochs: int, step_seconds: float, workers: int, busy_threads: int) -> dict:
    """Reads `epochs` epochs in this process; returns the waits (s) for first and other batches."""
    from hdfs_io.reader.shard_reader import ShardDataset, ShardLoader  # the checkout on PYTHONPATH: this one or --ref

    loader = ShardLoader(ShardDataset(dataset, 0, 1), num_workers=workers, timeout=600)
    firsts, others, formed_before = [], [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        asked, asked_wall, first = time.perf_counter(), time.time(), True
        for batch in loader:
            waited = time.perf_counter() - asked
            if not first:
                others.append(waited)
            elif epoch:
                firsts.append(waited)
                formed_before.append(asked_wall - batch["formed_at"])
            first = False
            step(step_seconds, busy_threads)
            asked, asked_wall = time.perf_counter(), time.time()
    return {"firsts": firsts, "others": others, "formed_before": formed_before}


def summary(run: dict) -> dict:
    first, other = statistics.mean(run["firsts"]), statistics.mean(run["others"])
    return {"first_mean_ms": 1000 * first, "first_median_ms": 1000 * statistics.median(run["firsts"]),
            "other_mean_ms": 1000 * other, "other_median_ms": 1000 * statistics.median(run["others"]),
            "first_over_other_mean": first / other,
            "first_formed_before_asked_s": statistics.median(run["formed_before"])}


def child_run(root: str, args: argparse.Namespace) -> dict:
    """One run in a child process reading with the checkout at `root`."""
    script = os.path.abspath(__file__)  # this checkout's; hdfs_io comes from `root`
    out = subprocess.run([sys.executable, script, args.dataset, "--one", "--epochs",
                          str(args.epochs), "--step-seconds", str(args.step_seconds), "--workers", str(args.workers),
                          "--busy-threads", str(args.busy_threads)],
                         cwd=root, env=dict(os.environ, PYTHONPATH=root), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset")
    p.add_argument("--ref")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--step-seconds", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--busy-threads", type=int, default=0)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one run, JSON on stdout
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args.dataset, args.epochs, args.step_seconds, args.workers, args.busy_threads)))
        return 0
    from bench.common import ROOT, checkout, median, write_result  # not in a child, which may run another checkout

    sides = {"this": str(ROOT), **({args.ref: checkout(args.ref)} if args.ref else {})}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, root in sides.items():
            runs[side].append(summary(child_run(root, args)))
    result = {side: {key: median([r[key] for r in rs]) for key in rs[0]} | {"runs": rs} for side, rs in runs.items()}
    path = write_result("epoch_start", {"dataset": args.dataset, "ref": args.ref, "repeats": args.repeats,
                                        "epochs": args.epochs, "step_seconds": args.step_seconds,
                                        "workers": args.workers, "busy_threads": args.busy_threads, "sides": result})
    for side, r in result.items():
        print(f"{side:8s} first batch of an epoch: {r['first_mean_ms']:.1f} ms mean, {r['first_median_ms']:.1f} ms "
              f"median (formed {r['first_formed_before_asked_s']:.2f} s ahead); other batches: "
              f"{r['other_mean_ms']:.1f} ms mean, {r['other_median_ms']:.1f} ms median; first / other (means) "
              f"{r['first_over_other_mean']:.2f}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
