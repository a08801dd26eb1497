"""bench/upload_resume: what a resumed upload pays before and while it finds nothing to copy, at 200k and 1M files.

    python -m bench.upload_resume [--files 200000,1000000] [--ref HEAD]

The source is N hard links to one 1 KB file, in folders of 100 (as LibriSpeech's chapters); the
destination (a local folder, file://) holds the same and a checksum record with each file's size,
CRC32 and mtime, as a finished upload leaves it. Each run is a fresh process that resumes the upload
with 8 workers and finds everything there. Reported: wall time, the RSS the upload adds above the RSS
after imports (peak minus before), and the bytes the process reads (rchar, /proc/self/io). `--ref`
runs `hdfs_io/upload.py` as it was at that commit too, on the same trees, interleaved. Goal (issue 27,
item 16): the added RSS does not grow with the tree, and a resume reads no source file it has recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

from bench.common import ROOT, WORK, median, write_result

DATA = b"u" * 1024
PER_FOLDER = 100
DAY_NS = 86400 * 10**9
LINKS_PER_TARGET = 60_000  # ext4 allows 65,000 links to one file


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def rel(i: int) -> str:
    return f"d{i // PER_FOLDER:05d}/utt-{i:07d}.bin"


def trees(files: int) -> tuple[Path, Path]:
    """Returns (source, destination) of `files` hard links each, made once under bench/work/."""
    root = WORK / f"upload-resume-{files}"
    src, dest = root / "src", root / "dest"
    if not (root / ".complete").exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
        mtime = time.time_ns() - DAY_NS
        targets = [f".data-{k}" for k in range(0, files, LINKS_PER_TARGET)]
        for side in (src, dest):
            side.mkdir(parents=True)
            for target in targets:
                (side / target).write_bytes(DATA)
                os.utime(side / target, ns=(mtime, mtime))
            for i in range(files):
                if i % PER_FOLDER == 0:
                    (side / rel(i)).parent.mkdir()
                os.link(side / f".data-{i - i % LINKS_PER_TARGET}", side / rel(i))
            for target in targets:
                os.unlink(side / target)
        (root / ".complete").write_text(str(mtime))
    return src, dest


def write_record(dest: Path, files: int, mtime_ns: int) -> None:
    """Writes the record a finished upload leaves, and removes what an earlier run left beside it."""
    for name in os.listdir(dest):
        if name.startswith(".upload-checksums"):
            os.unlink(dest / name)
    crc = zlib.crc32(DATA)
    with open(dest / ".upload-checksums.jsonl", "w") as f:
        f.write('{"run": 1}\n')
        for i in range(files):
            f.write(json.dumps({"path": rel(i), "size": len(DATA), "crc32": crc, "mtime_ns": mtime_ns}) + "\n")


def ref_module(ref: str) -> str:
    """Returns the path of hdfs_io/upload.py as it was at `ref`, written once under bench/work/."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = WORK / f"upload-{sha}.py"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text(subprocess.run(["git", "show", f"{sha}:hdfs_io/upload.py"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
    return str(path)


def one(src: str, dest: str, module: str) -> dict:
    """Resumes one upload in this process; returns its measurements."""
    if module:
        spec = importlib.util.spec_from_file_location("upload_ref", module)
        upload = sys.modules["upload_ref"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(upload)
    else:
        from hdfs_io import upload
    before, read_before = rss_mb(), bytes_read()
    started = time.perf_counter()
    summary = upload.upload(src, f"file://{dest}", workers=8, progress=False)
    return {"seconds": time.perf_counter() - started, "rss_before_mb": before, "added_mb": peak_rss_mb() - before,
            "read_mb": (bytes_read() - read_before) / 2**20, "copied": summary.files, "skipped": summary.skipped,
            "failed": len(summary.failed)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", default="200000,1000000")
    p.add_argument("--ref", default="", help="also run hdfs_io/upload.py of this commit")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--one", nargs=3, metavar=("SRC", "DEST", "MODULE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    variants = {"new": ""} | ({f"ref {args.ref}": ref_module(args.ref)} if args.ref else {})
    rows = []
    for files in map(int, args.files.split(",")):
        src, dest = trees(files)
        mtime = int((src.parent / ".complete").read_text())
        for repeat in range(args.repeats):
            for name, module in variants.items():
                write_record(dest, files, mtime)
                run = subprocess.run([sys.executable, "-m", "bench.upload_resume", "--one", str(src), str(dest),
                                      module], cwd=ROOT, check=True, capture_output=True, text=True)
                row = {"files": files, "variant": name, "repeat": repeat, **json.loads(run.stdout)}
                rows.append(row)
                print(f"{files:>9,} {name:>12}: {row['seconds']:7.1f} s, +{row['added_mb']:7.1f} MB RSS, "
                      f"read {row['read_mb']:8.1f} MB, {row['skipped']:,} skipped, {row['copied']} copied, "
                      f"{row['failed']} failed", flush=True)
    summary = {f"{files} {name}": {key: median([r[key] for r in rows if (r["files"], r["variant"]) == (files, name)])
                                   for key in ("seconds", "added_mb", "read_mb")}
               for files in map(int, args.files.split(",")) for name in variants}
    print(f"wrote {write_result('upload_resume', {'rows': rows, 'medians': summary})}")


if __name__ == "__main__":
    main()
