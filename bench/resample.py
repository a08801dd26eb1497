"""bench/resample: hdfs_io.speech.audio.resample (soxr) against an older commit's (one whole-signal FFT), side by side.

    python -m bench.resample --ref 1d67bce [--seconds 15] [--repeats 15]

Times one utterance of `--seconds` of noise resampled to 16 kHz from each common rate, both
functions interleaved in one process, and reports the medians and their ratio (before / now:
above 1 means now is faster). Utterance lengths vary by a few samples, as real ones do, since
an FFT's cost depends on the factors of the length.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import checkout, median, write_result
from hdfs_io.speech.audio import resample

RATES = (8000, 22050, 44100, 48000)


def resample_of(ref: str):
    """Returns the `resample` function of hdfs_io/speech/audio.py at commit `ref`."""
    spec = importlib.util.spec_from_file_location(f"audio_{ref}", Path(checkout(ref)) / "hdfs_io" / "audio.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.resample


def seconds_per_call(function, signal: np.ndarray, rate: int) -> float:
    started = time.perf_counter()
    function(signal, rate, 16000)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True, help="the commit to compare with")
    p.add_argument("--seconds", type=float, default=15.0, help="utterance length (LibriSpeech averages 12.3 s)")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    functions = {"now": resample, f"ref {args.ref}": resample_of(args.ref)}
    rng = np.random.default_rng(0)
    rows = []
    for rate in RATES:
        times: dict[str, list[float]] = {name: [] for name in functions}
        for i in range(args.repeats):
            signal = (0.1 * rng.standard_normal(int(rate * args.seconds) + i * 7)).astype(np.float32)
            for name, function in functions.items():
                times[name].append(seconds_per_call(function, signal, rate))
        now, before = (median(times[name]) * 1000 for name in functions)
        rows.append({"rate": rate, "now_ms": now, "ref_ms": before, "ref_over_now": before / now})
        print(f"{rate:>5} Hz -> 16 kHz, {args.seconds:g} s: soxr {now:.2f} ms, before {before:.2f} ms "
              f"({before / now:.2f}x)", flush=True)
    path = write_result("resample", {"ref": args.ref, "seconds": args.seconds, "repeats": args.repeats,
                                     "rows": rows})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
