"""bench/pack_scale: the pack job at 100,000 and 1,000,000 files, with the driver's memory sampled.

    python -m bench.pack_scale [--sizes 100000,1000000] [--layouts manifest,librispeech] [--sources 300]

Each corpus is hard links to `--sources` short FLAC tones (0.1-0.3 s), as a
DS2 manifest or as a LibriSpeech tree; links cost an inode each and no data.
Each is packed on local[2] with `--driver-memory 1g` and
`spark.driver.maxResultSize=16m`, while /proc is sampled every 0.5 s for the
resident memory of the driver's JVM (which in local mode also runs the
executor and its shuffle), the driver's Python process, and the Python
workers. Goal: every pack succeeds, and the driver's Python peak at the
largest size is within 10% of its peak at the smallest.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from pathlib import Path

from bench.common import ROOT, SPARK_SUBMIT, WORK, write_result
from hdfs_io.format.dataset import open_dataset
from scripts.devcluster import local_spark_env
from scripts.synth_corpus import linked_corpus, tones


def build(layout: str, n: int, sources: list[Path]) -> str:
    root = WORK / "pack-scale" / f"{layout}-{n}"
    done = root / ".complete"
    if not done.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
        started = time.perf_counter()
        target = linked_corpus(root, n, layout, sources)
        done.write_text(f"{target}\n{time.perf_counter() - started:.1f}s\n")
    return done.read_text().splitlines()[0]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for thread in Path(f"/proc/{p}/task").glob("*"):  # a JVM starts processes from many threads
            try:
                todo += [int(c) for c in (thread / "children").read_text().split()]
            except OSError:
                continue
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def role(pid: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    if "pack.py" in cmd and "python" in cmd.split()[0]:
        return "driver_python"
    if "org.apache.spark.deploy.SparkSubmit" in cmd:
        return "driver_jvm"
    if "pyspark.daemon" in cmd or "pyspark/daemon" in cmd or "pyspark.worker" in cmd:
        return "python_workers"
    return None


def sample(pid: int, peaks: dict, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        now: dict[str, float] = {}
        for p in descendants(pid):
            r = role(p)
            if r:
                now[r] = now.get(r, 0.0) + rss_mb(p)
        for r, mb in now.items():
            peaks[r] = max(peaks.get(r, 0.0), mb)


def pack(input_uri: str, out: Path) -> dict:
    argv = [str(SPARK_SUBMIT), "--master", "local[2]", "--driver-memory", "1g",
            "--conf", "spark.driver.maxResultSize=16m", "--conf", "spark.ui.enabled=false",
            str(ROOT / "spark_jobs" / "pack.py"), "--input", input_uri, "--output", str(out), "--overwrite",
            "--shard-size-mb", "256"]
    peaks: dict[str, float] = {}
    stop = threading.Event()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=local_spark_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sampler = threading.Thread(target=sample, args=(proc.pid, peaks, stop), daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    result = {"exit": proc.returncode, "wall_s": wall, "peak_rss_mb": peaks,
              "last_lines": [line for line in output.splitlines() if line.startswith("pack:")][-4:]}
    if proc.returncode == 0:
        manifest = open_dataset(str(out)).manifest
        result.update(utterances=manifest["utterances"], shards=len(manifest["shards"]),
                      utterances_per_s=manifest["utterances"] / wall, timing_s=manifest["timing_s"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--layouts", default="manifest,librispeech")
    p.add_argument("--sources", type=int, default=300)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    sources = tones(WORK / "pack-scale" / "tones", args.sources, 0.1, 0.3, seed=5)
    runs = {}
    for layout in args.layouts.split(","):
        for n in sizes:
            corpus = build(layout, n, sources)
            runs[f"{layout}-{n}"] = r = pack(corpus, WORK / "pack-scale" / "out")
            print(f"{layout:12s} {n:>9d}: exit {r['exit']}, {r['wall_s']:7.1f} s, "
                  f"{r.get('utterances_per_s', 0):6.0f} utt/s, peak RSS MB "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["peak_rss_mb"].items())), flush=True)
    growth = {layout: runs[f"{layout}-{sizes[-1]}"]["peak_rss_mb"].get("driver_python", 0)
              / max(runs[f"{layout}-{sizes[0]}"]["peak_rss_mb"].get("driver_python", 1), 1)
              for layout in args.layouts.split(",")}
    path = write_result("pack_scale", {
        "sizes": sizes, "sources": args.sources, "limits": "local[2], --driver-memory 1g, maxResultSize=16m",
        "runs": runs, "driver_python_peak_growth": growth,
        "goal": "all succeed; driver Python peak at the largest size within 10% of the smallest"})
    print(f"driver Python peak, largest / smallest: {growth} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
