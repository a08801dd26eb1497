"""bench/hdfs_backends: libhdfs (JVM) against hdfs-native (no JVM) reading one dataset on HDFS, side by side.

    python -m bench.hdfs_backends DATASET_URI [--workers 0,2,4] [--repeats 3]

Runs `python -m hdfs_io.read --json` with SPEECHPACK_HDFS_BACKEND=libhdfs and =native,
interleaved, for each worker count; reports medians of the time to the first batch,
the peak RSS of the reader and its largest worker, and utterances per second.
`make demo STORAGE=hdfs` leaves a dataset at hdfs://127.0.0.1:9820/demo/datasets/train.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import ROOT, median, write_result
from hdfs_io.filesystem import BACKEND_VARIABLE, BACKENDS


def read_once(uri: str, backend: str, workers: int) -> dict:
    env = {**os.environ, BACKEND_VARIABLE: backend}
    out = subprocess.run([sys.executable, "-m", "hdfs_io.read", uri, "--workers", str(workers), "--json"], cwd=ROOT,
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset")
    p.add_argument("--workers", default="0,2,4")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for workers in map(int, args.workers.split(",")):
            for backend in BACKENDS:
                runs.setdefault((backend, workers), []).append(read_once(args.dataset, backend, workers))
    rows = []
    for (backend, workers), results in runs.items():
        row = {"backend": backend, "workers": workers,
               "first_batch_s": median([r["first_batch_seconds"] for r in results]),
               "reader_rss_mb": median([r["peak_rss_mb"]["reader"] for r in results]),
               "worker_rss_mb": median([r["peak_rss_mb"]["largest_worker"] for r in results]),
               "utterances_per_s": median([r["utterances_per_s"] for r in results]), "runs": results}
        rows.append(row)
        print(f"{backend:8s} {workers} workers: first batch {row['first_batch_s']:.2f} s, peak RSS reader "
              f"{row['reader_rss_mb']:.0f} MB, largest worker {row['worker_rss_mb']:.0f} MB, "
              f"{row['utterances_per_s']:.0f} utt/s", flush=True)
    path = write_result("hdfs_backends", {"dataset": args.dataset, "repeats": args.repeats, "rows": rows})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
