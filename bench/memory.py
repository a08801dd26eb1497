"""bench/memory: peak reader RSS for a dataset and one 10x larger.

    python -m bench.memory [--utterances 5000]

The small dataset is bench's espeak corpus of N utterances (5,000: about 270 MB of
FLAC, several times the reader's buffers); the large one is the same audio ten
times over under new speaker ids and keys (hard links, so no new synthesis),
packed by the same job: 10x the utterances, shards and index rows. Each is read
for one full epoch in a fresh process (ShardDataset in-process, log-mel output,
default buffers), and the process's peak RSS (ru_maxrss) is recorded, with
its RSS once the imports are done (torch and pyarrow alone are about 760 MB),
so that the reader's own memory (peak minus that) is reported too.
Goal: the 10x larger dataset costs less than 10% more RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, WORK, bench_args, corpus, median, spark_pack, write_result


def peak_rss_mb(uri: str) -> tuple[float, float, int]:
    """Reads an epoch in a child process; returns (its peak RSS in MB, its RSS once the imports are done, in MB,
    utterances read)."""
    code = ("import json, os, resource, sys\n"
            "from hdfs_io.shard_reader import ShardDataset\n"
            "base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
            "n = sum(len(b['keys']) for b in ShardDataset(sys.argv[1], 0, 1))\n"
            "print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base, n]))\n")
    out = subprocess.run([sys.executable, "-c", code, uri], cwd=ROOT, check=True, capture_output=True, text=True)
    peak, base, n = json.loads(out.stdout.strip().splitlines()[-1])
    return peak, base, n


def replicated(root: Path, times: int) -> Path:
    """Returns a LibriSpeech tree holding `root`'s utterances `times` over, keys made unique by speaker id."""
    out = WORK / f"{root.name}-x{times}"
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    for trans in sorted(root.rglob("*.trans.txt")):
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        for r in range(times):
            new_speaker = f"{speaker}{r:02d}"
            folder = out / new_speaker / chapter
            folder.mkdir(parents=True)
            lines = []
            for line in trans.read_text().splitlines():
                key, text = line.split(" ", 1)
                new_key = f"{new_speaker}-{key.split('-', 1)[1]}"
                os.link(trans.parent / f"{key}.flac", folder / f"{new_key}.flac")
                lines.append(f"{new_key} {text}")
            (folder / f"{new_speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    (out / ".complete").write_text("")
    return out


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    small_corpus = corpus(args.utterances)
    sizes = (args.utterances, args.utterances * 10)
    uris = {}
    for n, tree in zip(sizes, (small_corpus, replicated(small_corpus, 10))):
        uris[n] = str(WORK / f"memory-{n}")
        if not os.path.exists(f"{uris[n]}/dataset.json"):
            spark_pack("local[2]", str(tree), uris[n])
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    own: dict[int, list[float]] = {n: [] for n in sizes}  # peak minus the RSS of the imports (torch, pyarrow)
    for _ in range(args.repeats):
        for n in sizes:
            peak, base, read = peak_rss_mb(uris[n])
            if read != n:
                raise SystemExit(f"memory: read {read} utterances of {n}")
            runs[n].append(peak)
            own[n].append(peak - base)
    small, large = (median(runs[n]) for n in sizes)
    small_own, large_own = (median(own[n]) for n in sizes)
    result = {"utterances": list(sizes), "peak_rss_mb": {str(n): median(runs[n]) for n in sizes},
              "runs_mb": {str(n): runs[n] for n in sizes}, "growth": large / small - 1,
              "reader_mb": {str(n): median(own[n]) for n in sizes}, "reader_runs_mb": {str(n): own[n] for n in sizes},
              "reader_growth": large_own / small_own - 1,
              "goal": "RSS grows < 10% for a 10x larger dataset"}
    path = write_result("memory", result)
    print(f"peak RSS: {small:.0f} MB at {sizes[0]} utterances, {large:.0f} MB at {sizes[1]}: "
          f"+{100 * result['growth']:.1f}%; beyond the imports: {small_own:.0f} MB, {large_own:.0f} MB: "
          f"+{100 * result['reader_growth']:.1f}% -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
