"""bench/probe_cost: what each read and check of the pack job costs per file, tiny and real-sized.

    python -m bench.probe_cost [--files 200] [--repeats 5]

The pack job reads every file twice: the probe reads it whole, decodes every
frame and takes its CRC32, and the write task reads it again and checks the
CRC32. The alternative is a header-only probe (size and duration from the
first 64 KB) with the full decode moved into the write task: one whole read
fewer, the same decode. This measures, per file and from the page cache, the
parts both ways are made of, on tiny FLACs (0.1-0.3 s) and on real-sized ones
(3-15 s), both tones with noise so FLAC compresses them as it does speech.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.common import WORK, write_result
from hdfs_io.speech.audio import probe

HEADER_BYTES = 64 * 1024


def noisy_flacs(folder: Path, count: int, min_s: float, max_s: float, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.flac"
        if not path.exists():
            t = np.arange(int(16000 * rng.uniform(min_s, max_s))) / 16000
            signal = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
            sf.write(path, signal.astype(np.float32), 16000)
        paths.append(path)
    return paths


def per_file_ms(paths: list[Path], step) -> float:
    started = time.perf_counter()
    for p in paths:
        step(p)
    return 1000 * (time.perf_counter() - started) / len(paths)


def header_probe(p: Path) -> None:
    with p.open("rb") as f:
        head = f.read(HEADER_BYTES)
    sf.info(io.BytesIO(head))


STEPS = {
    "read": lambda p: p.read_bytes(),
    "read_crc": lambda p: zlib.crc32(p.read_bytes()),
    "read_full_probe_crc": lambda p: (lambda d: (probe(d), zlib.crc32(d)))(p.read_bytes()),
    "header_probe": header_probe,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    sets = {"tiny_0.1-0.3s": noisy_flacs(WORK / "probe-cost" / "tiny", args.files, 0.1, 0.3, 1),
            "real_3-15s": noisy_flacs(WORK / "probe-cost" / "real", args.files, 3.0, 15.0, 2)}
    result = {}
    for name, paths in sets.items():
        runs = {step: [] for step in STEPS}
        for _ in range(args.repeats):  # interleaved, so the machine's noise falls on every step alike
            for step, fn in STEPS.items():
                runs[step].append(per_file_ms(paths, fn))
        ms = {step: statistics.median(v) for step, v in runs.items()}
        today = ms["read_full_probe_crc"] + ms["read_crc"]  # probe stage + write stage
        header_first = ms["header_probe"] + ms["read_full_probe_crc"]  # header probe + decoding write
        result[name] = {"median_ms_per_file": ms, "runs_ms": runs,
                        "mean_kb": statistics.mean(p.stat().st_size for p in paths) / 1024,
                        "today_ms": today, "header_first_ms": header_first,
                        "header_first_saves_fraction": 1 - header_first / today}
        print(f"{name:14s} {result[name]['mean_kb']:6.1f} KB: today {today:.3f} ms/file, header-only probe first "
              f"{header_first:.3f} ms/file ({100 * result[name]['header_first_saves_fraction']:+.1f}% saved); "
              + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    path = write_result("probe_cost", {"files": args.files, "repeats": args.repeats, "sets": result,
                                       "note": "page-cached local reads; an HDFS read costs more per byte"})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
