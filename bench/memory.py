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
Each dataset is read three ways: epoch 0 (SortaGrad) in-process, epoch 1 (shuffled)
in-process, and epoch 1 through ShardLoader with 4 persistent workers, whose peak
RSS is read from /proc while they persist. Chunk reads and re-reads (chunks dropped
past `max_held_chunks` and read again) are counted per epoch.
Goals: the 10x larger dataset costs less than 10% more RSS; re-reads stay under 5%
of chunk reads in every epoch at the default cap.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, WORK, bench_args, corpus, median, spark_pack, write_result


def read_epoch(uri: str, epoch: int, workers: int) -> dict:
    """Reads one epoch of rank 0 of 1 in this process (workers=0) or through ShardLoader's workers.

    Returns the utterances read, chunk reads and re-reads, this process's peak RSS and its RSS once
    the imports were done, and each worker's peak RSS (VmHWM, read while the workers persist), in MB.
    """
    from hdfs_io.reader.shard_reader import ShardDataset, ShardLoader

    base = rss_mb("self")
    loader = ShardLoader(ShardDataset(uri, 0, 1), num_workers=workers, timeout=600 if workers else 0)
    loader.set_epoch(epoch)
    n = reads = rereads = 0
    pids = set()
    for batch in loader:
        n += len(batch["keys"])
        reads += batch["chunk_reads"]
        rereads += batch["chunk_rereads"]
        pids.add(batch["worker_pid"])
    pids.discard(os.getpid())
    return {"utterances": n, "chunk_reads": reads, "chunk_rereads": rereads, "base_mb": base,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": sorted(peak_of(pid) for pid in pids)}


def rss_mb(pid: str) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_of(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measured(uri: str, epoch: int, workers: int) -> dict:
    """Returns read_epoch's figures, measured in a fresh child process."""
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", f"{epoch}:{workers}:{uri}"], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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


CASES = ((0, 0), (1, 0), (1, 4))  # (epoch, DataLoader workers): SortaGrad in-process; shuffled in-process; 4 workers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # a child: EPOCH:WORKERS:URI
        epoch, workers, uri = argv[1].split(":", 2)
        print(json.dumps(read_epoch(uri, int(epoch), int(workers))))
        return 0
    args = bench_args(__doc__, argv)
    small_corpus = corpus(args.utterances)
    sizes = (args.utterances, args.utterances * 10)
    uris = {}
    for n, tree in zip(sizes, (small_corpus, replicated(small_corpus, 10))):
        uris[n] = str(WORK / f"memory-{n}")
        if not os.path.exists(f"{uris[n]}/dataset.json"):
            spark_pack("local[2]", str(tree), uris[n])
    runs: dict[str, list[dict]] = {f"{n}:{e}:{w}": [] for n in sizes for e, w in CASES}
    for _ in range(args.repeats):
        for n in sizes:
            for epoch, workers in CASES:
                row = measured(uris[n], epoch, workers)
                if row["utterances"] != n:
                    raise SystemExit(f"memory: read {row['utterances']} utterances of {n}")
                runs[f"{n}:{epoch}:{workers}"].append(row)
    cases = []
    for name, rows in runs.items():
        n, epoch, workers = map(int, name.split(":"))
        reads = median([r["chunk_reads"] for r in rows])
        case = {"utterances": n, "epoch": epoch, "workers": workers,
                "peak_rss_mb": median([r["peak_mb"] for r in rows]),
                "reader_mb": median([r["peak_mb"] - r["base_mb"] for r in rows]),
                "worker_peak_rss_mb": median([max(r["worker_peak_mb"], default=0.0) for r in rows]),
                "chunk_reads": reads, "chunk_rereads": median([r["chunk_rereads"] for r in rows]),
                "runs": rows}
        case["reread_fraction"] = case["chunk_rereads"] / reads if reads else 0.0
        cases.append(case)
        print(f"{n:>7,} utterances, epoch {epoch}, {workers} workers: peak RSS {case['peak_rss_mb']:.0f} MB "
              f"(reader's own {case['reader_mb']:.0f} MB), worker peak {case['worker_peak_rss_mb']:.0f} MB; "
              f"{reads:.0f} chunk reads, {100 * case['reread_fraction']:.1f}% re-reads", flush=True)
    by = {(c["utterances"], c["epoch"], c["workers"]): c for c in cases}
    small, large = by[(sizes[0], 0, 0)], by[(sizes[1], 0, 0)]
    result = {"utterances": list(sizes), "repeats": args.repeats, "cases": cases,
              "growth": large["peak_rss_mb"] / small["peak_rss_mb"] - 1,
              "reader_growth": large["reader_mb"] / small["reader_mb"] - 1,
              "goal": "RSS grows < 10% for a 10x larger dataset; re-reads < 5% of chunk reads in every epoch"}
    path = write_result("memory", result)
    print(f"epoch 0 in-process: +{100 * result['growth']:.1f}% RSS, +{100 * result['reader_growth']:.1f}% "
          f"reader's own for 10x the utterances -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
