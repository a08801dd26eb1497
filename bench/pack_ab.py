"""bench/pack_ab: this checkout's pack job against another commit's, interleaved, on bench/pack's corpora.

    python -m bench.pack_ab --ref 0bb26e4 [--repeats 3]

Runs `spark_jobs/pack.py` of this checkout and of `--ref` (checked out once as a git
worktree under bench/work/) on `local[2]` over the 2,500- and 5,000-utterance corpora,
in turn, and compares the job's own time (`timing_s.total_in_spark`, JVM start
excluded): the whole job at 5,000, and the steady state (marginal throughput from
2,500 to 5,000), as medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

from bench.common import ROOT, SPARK_SUBMIT, WORK, checkout, corpus, median, write_result
from scripts.devcluster import local_spark_env

SIZES = (2500, 5000)


def pack_seconds(root: str, n: int) -> float:
    out = WORK / f"pack-ab-{os.path.basename(root)}-{n}"
    subprocess.run([str(SPARK_SUBMIT), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
                    f"{root}/spark_jobs/pack.py", "--input", str(corpus(n)), "--output", str(out), "--overwrite",
                    "--shard-size-mb", "16"], check=True, capture_output=True, cwd=root,
                   env=local_spark_env(dict(os.environ, PYTHONPATH=root)))
    return json.loads((out / "dataset.json").read_text())["timing_s"]["total_in_spark"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    jobs = {"this": str(ROOT), args.ref: checkout(args.ref)}
    runs = {(job, n): [] for job in jobs for n in SIZES}
    for _ in range(args.repeats):
        for n in SIZES:
            for job, root in jobs.items():
                runs[(job, n)].append(pack_seconds(root, n))
    result = {}
    for job in jobs:
        small, large = (median(runs[(job, n)]) for n in SIZES)
        result[job] = {"median_s": {str(n): median(runs[(job, n)]) for n in SIZES},
                       "runs_s": {str(n): runs[(job, n)] for n in SIZES},
                       "steady_utterances_per_s": (SIZES[1] - SIZES[0]) / max(large - small, 1e-9)}
    ratio = result["this"]["steady_utterances_per_s"] / result[args.ref]["steady_utterances_per_s"]
    path = write_result("pack_ab", {"ref": args.ref, "repeats": args.repeats, "jobs": result,
                                    "steady_ratio_this_vs_ref": ratio})
    for job, r in result.items():
        print(f"{job:10s} {r['median_s']} s, steady state {r['steady_utterances_per_s']:.0f} utt/s")
    print(f"steady state this / {args.ref}: {ratio:.2f}x -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
