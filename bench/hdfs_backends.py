"""bench/hdfs_backends: a reader's start and memory on HDFS, libhdfs and hdfs-native, against a file:// copy.

    python -m bench.hdfs_backends [DATASET_URI] [--workers 4] [--repeats 3] [--ref COMMIT] [--utterances 600]

Runs `python -m hdfs_io.read --json` (rank 0 of 1, epoch 1) on the dataset on HDFS with
SPEECHPACK_HDFS_BACKEND=libhdfs and =native, and on a file:// copy of it, interleaved, and with
--ref the same for that commit's reader. Reports medians of the time to the first batch, the
reader's peak RSS, and the peaks of the summed RSS (every 50 ms) and PSS (every 0.5 s) of all the reader's
descendants: its DataLoader workers, and the forkserver they start from. RSS counts a page shared by
forked processes in each of them; PSS splits it between them, so its sum is what the node's memory holds.
Without DATASET_URI it packs `--utterances` synthetic utterances (bench/common.corpus) once, under
bench/work/hdfs_backends, and copies them to the dev cluster's HDFS (`make cluster-up`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

from bench.common import ROOT, WORK, checkout, corpus, median, spark_pack, write_result
from hdfs_io.fs.filesystem import BACKEND_VARIABLE, BACKENDS
from scripts.devcluster import NAMENODE_PORT

HDFS_COPY = f"hdfs://127.0.0.1:{NAMENODE_PORT}/bench/hdfs_backends"


def datasets(uri: str | None, utterances: int) -> dict[str, str]:
    """Returns {"hdfs": URI, "file": URI of a local copy}, packing and copying what is not there yet."""
    from pyarrow import fs as pafs

    from hdfs_io.fs.filesystem import open_filesystem

    local = WORK / "hdfs_backends" / (f"copy-{zlib.crc32(uri.encode()):08x}" if uri else f"train-{utterances}")
    if not (local / "dataset.json").exists():
        if uri:
            fs, path = open_filesystem(uri)
            pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            spark_pack("local[2]", str(corpus(utterances)), f"file://{local}")
    if uri is None:
        uri = f"{HDFS_COPY}/train-{utterances}"
        fs, path = open_filesystem(uri)
        if fs.get_file_info(f"{path}/dataset.json").type == pafs.FileType.NotFound:
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return {"hdfs": uri, "file": f"file://{local}"}


def descendants(pid: int) -> list[int]:
    """Returns the pids of every live descendant of `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        except (OSError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def memory_mb(pid: int, file: str, field: str) -> float:
    """Returns `field` of /proc/PID/FILE in MB: VmRSS of status, or Pss of smaps_rollup (shared pages split
    between the processes that share them); 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def read_once(code: str, uri: str, backend: str, workers: int) -> dict:
    """Runs one read in a fresh process and returns its report with the peak of its descendants' summed RSS."""
    env = {**os.environ, BACKEND_VARIABLE: backend}
    proc = subprocess.Popen([sys.executable, "-m", "hdfs_io.read", uri, "--epoch", "1", "--workers", str(workers),
                             "--json"], cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0.0, "pss": 0.0}
    done = threading.Event()

    def sample() -> None:
        tick = 0
        while not done.wait(0.05):
            pids = descendants(proc.pid)
            peak["rss"] = max(peak["rss"], sum(memory_mb(p, "status", "VmRSS") for p in pids))
            if tick % 10 == 0:  # smaps_rollup walks every mapping: less often
                peak["pss"] = max(peak["pss"], sum(memory_mb(p, "smaps_rollup", "Pss") for p in pids))
            tick += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"hdfs_backends: the read of {uri} ({backend}) failed: {err.strip().splitlines()[-1:]}")
    return dict(json.loads(out.strip().splitlines()[-1]), descendants_rss_mb=peak["rss"],
                descendants_pss_mb=peak["pss"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", nargs="?", help="a dataset on HDFS (default: one packed here)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--utterances", type=int, default=600)
    p.add_argument("--ref", default="", help="also run the reader of this commit, interleaved")
    args = p.parse_args(argv)
    uris = datasets(args.dataset, args.utterances)
    codes = {"new": str(ROOT)}
    if args.ref:
        codes[f"ref {args.ref}"] = checkout(args.ref)
    sides = [("file", "file", BACKENDS[0])] + [(backend, "hdfs", backend) for backend in BACKENDS]
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for code_name, code in codes.items():
            for side, where, backend in sides:
                runs.setdefault((code_name, side), []).append(read_once(code, uris[where], backend, args.workers))
    rows = []
    for (code_name, side), results in runs.items():
        row = {"code": code_name, "side": side, "workers": args.workers,
               "first_batch_s": median([r["first_batch_seconds"] for r in results]),
               "reader_rss_mb": median([r["peak_rss_mb"]["reader"] for r in results]),
               "descendants_rss_mb": median([r["descendants_rss_mb"] for r in results]),
               "descendants_pss_mb": median([r["descendants_pss_mb"] for r in results]),
               "utterances_per_s": median([r["utterances_per_s"] for r in results]), "runs": results}
        file_row = next((r for r in rows if r["code"] == code_name and r["side"] == "file"), row)
        row["first_batch_x_file"] = row["first_batch_s"] / file_row["first_batch_s"]
        row["descendants_rss_x_file"] = row["descendants_rss_mb"] / file_row["descendants_rss_mb"]
        row["descendants_pss_x_file"] = row["descendants_pss_mb"] / file_row["descendants_pss_mb"]
        rows.append(row)
        print(f"{code_name:12s} {side:8s} {args.workers} workers: first batch {row['first_batch_s']:.2f} s "
              f"({row['first_batch_x_file']:.2f}x file), reader {row['reader_rss_mb']:.0f} MB, workers and "
              f"forkserver RSS {row['descendants_rss_mb']:.0f} MB ({row['descendants_rss_x_file']:.2f}x file), "
              f"PSS {row['descendants_pss_mb']:.0f} MB ({row['descendants_pss_x_file']:.2f}x), "
              f"{row['utterances_per_s']:.0f} utt/s", flush=True)
    path = write_result("hdfs_backends", {"datasets": uris, "repeats": args.repeats, "ref": args.ref, "rows": rows})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
