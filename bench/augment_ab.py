"""bench/augment_ab: augmented / plain reader throughput, this checkout against a commit, in fresh processes.

    python -m bench.augment_ab --ref COMMIT [--utterances 1000] [--processes 3] [--repeats 3]

Each process, in its own checkout (the commit's as a git worktree: bench.common.checkout), reads
bench.reader's packed corpus once to warm up (and load the noise bank), then `--repeats` times
plainly and with the augmentation bench.reader uses, interleaved; it reports the median of each.
Processes of the two checkouts alternate. The ratio per checkout is the median plain time over the
median augmented time, across its processes (issue 30: >= 85%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import ROOT, WORK, checkout, median, write_result

CHILD = """
import json, statistics, sys
from dataclasses import replace
from bench.reader import run_reader
from trainer.config import load_config
uri, noise, conf, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
augment = replace(load_config(conf).augment, noise=noise, noise_probability=1.0)
run_reader(uri, augment)
plain, augmented = [], []
for _ in range(repeats):
    plain.append(run_reader(uri)[1])
    augmented.append(run_reader(uri, augment)[1])
print(json.dumps({"plain": statistics.median(plain), "augmented": statistics.median(augmented)}))
"""


def run_child(code: str, uri: str, noise: str, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, uri, noise, str(ROOT / "conf" / "ds2_base.yaml"), str(repeats)],
                         cwd=code, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True, help="the commit to compare with")
    p.add_argument("--utterances", type=int, default=1000)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    uri, noise = str(WORK / f"packed-{args.utterances}"), str(WORK / "packed-noise-60")
    if not os.path.exists(f"{uri}/dataset.json") or not os.path.exists(f"{noise}/dataset.json"):
        print(f"augment_ab: run python -m bench.reader --utterances {args.utterances} first: it packs the corpus",
              file=sys.stderr)
        return 2
    codes = {"this": str(ROOT), f"ref {args.ref}": checkout(args.ref)}
    runs = {name: [] for name in codes}
    for _ in range(args.processes):
        for name, code in codes.items():
            runs[name].append(run_child(code, uri, noise, args.repeats))
            print(name, runs[name][-1], flush=True)
    rows = {name: {"plain_s": median([r["plain"] for r in rs]), "augmented_s": median([r["augmented"] for r in rs]),
                   "processes": rs} for name, rs in runs.items()}
    for name, row in rows.items():
        row["augmented_vs_plain"] = row["plain_s"] / row["augmented_s"]
        print(f"{name:14s} plain {row['plain_s']:.3f} s, augmented {row['augmented_s']:.3f} s: "
              f"{100 * row['augmented_vs_plain']:.1f}%")
    write_result("augment_ab", {"utterances": args.utterances, "ref": args.ref, "rows": rows,
                                "goal": "augmented >= 85% of plain (issue 30)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
