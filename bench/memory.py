"""bench/memory: peak reader RSS for a dataset and one 10x larger.

    python -m bench.memory [--utterances 5000]

Each size is read for one full epoch in a fresh process (ShardDataset in-process,
log-mel output, default buffers), and the process's peak RSS (ru_maxrss) is
recorded. Goal: the 10x larger dataset costs less than 10% more RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import ROOT, WORK, bench_args, corpus, median, spark_pack, write_result


def peak_rss_mb(uri: str) -> tuple[float, int]:
    """Reads an epoch in a child process; returns (its peak RSS in MB, utterances read)."""
    code = ("import json, resource, sys\n"
            "from hdfs_io.shard_reader import ShardDataset\n"
            "n = sum(len(b['keys']) for b in ShardDataset(sys.argv[1], 0, 1))\n"
            "print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, n]))\n")
    out = subprocess.run([sys.executable, "-c", code, uri], cwd=ROOT, check=True, capture_output=True, text=True)
    rss, n = json.loads(out.stdout.strip().splitlines()[-1])
    return rss, n


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    sizes = (args.utterances // 10, args.utterances)
    uris = {}
    for n in sizes:
        uris[n] = str(WORK / f"memory-{n}")
        if not os.path.exists(f"{uris[n]}/dataset.json"):
            spark_pack("local[2]", str(corpus(n)), uris[n], "--shard-size-mb", "16")
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.repeats):
        for n in sizes:
            rss, read = peak_rss_mb(uris[n])
            assert read == n, (read, n)
            runs[n].append(rss)
    small, large = (median(runs[n]) for n in sizes)
    result = {"utterances": list(sizes), "peak_rss_mb": {str(n): median(runs[n]) for n in sizes},
              "runs_mb": {str(n): runs[n] for n in sizes}, "growth": large / small - 1,
              "goal": "RSS grows < 10% for a 10x larger dataset"}
    path = write_result("memory", result)
    print(f"peak RSS: {small:.0f} MB at {sizes[0]} utterances, {large:.0f} MB at {sizes[1]}: "
          f"+{100 * result['growth']:.1f}% -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
