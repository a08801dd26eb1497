"""What the benchmarks share: the corpus they run on and how results are written."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyspark

from scripts.devcluster import local_spark_env
from scripts.synth_corpus import DEFAULT_VOICES, librispeech_tree

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
SPARK_SUBMIT = Path(pyspark.__file__).parent / "bin" / "spark-submit"


def corpus(utterances: int, seed: int = 7) -> Path:
    """Returns a synthetic LibriSpeech tree of `utterances` espeak utterances, made once and kept."""
    root = WORK / f"corpus-{utterances}"
    done = root / ".complete"
    if not done.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
        started = time.perf_counter()
        librispeech_tree(root, utterances, DEFAULT_VOICES, seed=seed, per_chapter=100, workers=2)
        done.write_text(f"{time.perf_counter() - started:.1f}s\n")
    return root


def checkout(ref: str) -> str:
    """Returns the path of a git worktree of `ref` under bench/work/, made once."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = WORK / f"ref-{sha}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return str(path)


def tree_bytes(root: Path) -> tuple[int, int]:
    """Returns (audio files, bytes) under root."""
    files = [p for p in root.rglob("*.flac")]
    return len(files), sum(p.stat().st_size for p in files)


def spark_pack(master: str, input_uri: str, output_uri: str, *extra: str, env: dict | None = None) -> dict:
    """Runs the pack job with spark-submit and returns its dataset.json."""
    from hdfs_io.format.dataset import open_dataset

    subprocess.run([str(SPARK_SUBMIT), "--master", master, "--conf", "spark.ui.enabled=false",
                    str(ROOT / "spark_jobs" / "pack.py"), "--input", input_uri, "--output", output_uri,
                    "--overwrite", *extra], check=True, capture_output=True, env=local_spark_env(env))
    return open_dataset(output_uri).manifest


def bench_args(doc: str, argv: list[str] | None, utterances: int = 5000, **extra: int) -> argparse.Namespace:
    """Returns the parsed common options (--utterances, --repeats) plus integer `extra` ones."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--utterances", type=int, default=utterances)
    p.add_argument("--repeats", type=int, default=3)
    for name, default in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return p.parse_args(argv)


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = dict(result, machine={"python": sys.version.split()[0], "platform": platform.platform(),
                                   "cpus": __import__("os").cpu_count()},
                  recorded=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
