"""bench/ddp: a 2-process run and a 1-process run with the same global batch and seed give the same loss curve.

    python -m bench.ddp [--steps 150]

Trains conf/ds2_tiny.yaml on the demo's training set (make demo first) twice:
1 process with 60 s batches, and torchrun with 2 processes of 30 s batches each.
The two runs see different batch compositions (the planner deals batches to ranks),
so the curves agree within noise, not exactly. Writes bench/results/ddp.json and
bench/results/ddp.png.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from bench.common import RESULTS, ROOT, WORK, write_result


def run(procs: int, batch_seconds: float, steps: int, dataset: str) -> list[float]:
    log = WORK / f"ddp-{procs}"
    subprocess.run(["rm", "-rf", str(log)], check=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    subprocess.run([*launcher, "-m", "trainer.train", "--conf", str(ROOT / "conf" / "ds2_tiny.yaml"),
                    "--dataset", dataset, "--out", str(log / "out"), "--log-dir", str(log), "--epochs", "100",
                    "--max-steps", str(steps), f"--train.batch_seconds={batch_seconds}", "--train.num_workers=1",
                    "--train.checkpoint_every_steps=0"], cwd=ROOT, check=True, capture_output=True)
    return [json.loads(line)["loss"] for line in (log / "metrics.jsonl").read_text().splitlines()]


def smooth(values: list[float], width: int = 10) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--dataset", default=str(ROOT / "demo-out" / "datasets" / "train"))
    args = p.parse_args(argv)
    one = run(1, 60.0, args.steps, args.dataset)
    two = run(2, 30.0, args.steps, args.dataset)
    a, b = smooth(one), smooth(two)
    gap = np.abs(a - b) / np.maximum(np.abs(a), 1e-6)
    result = {"steps": args.steps, "loss_1_process": one, "loss_2_processes": two,
              "smoothed_relative_gap_median": float(np.median(gap)), "smoothed_relative_gap_max": float(gap.max()),
              "goal": "same loss curve within noise"}
    path = write_result("ddp", result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(7, 4))
    plt.plot(one, lw=0.8, label="1 process, 60 s batches")
    plt.plot(two, lw=0.8, label="2 processes x 30 s batches")
    plt.xlabel("step")
    plt.ylabel("CTC loss")
    plt.legend()
    plt.tight_layout()
    plt.savefig(RESULTS / "ddp.png", dpi=90)
    print(f"smoothed loss gap: median {100 * result['smoothed_relative_gap_median']:.1f}%, "
          f"max {100 * result['smoothed_relative_gap_max']:.1f}% -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
