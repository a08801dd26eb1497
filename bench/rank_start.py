"""bench/rank_start: what one rank of 512 pays to open a packed dataset and plan epoch 0, at 3M and 30M utterances.

    python -m bench.rank_start [--utterances 3000000,30000000] [--world-size 512] \\
        [--formats parquet,sequencefile] [--ref COMMIT] [--repeats 1] [--rss-cap-gb 12]

Each (size, format) is a synthetic format version 2 dataset, made once under
bench/work/rank_start/ as spark_jobs/pack.py lays one out with its defaults: duration
layout, 256 MB shards of about 235 KB utterances (20 KB a second of 16 kHz FLAC,
about 1,090 a shard), 16 MB Parquet row groups, `dataset.json` from pack's own
`merge_summaries` and `build_manifest`, `index/part-NNNNN.parquet` per shard and
`index.parquet` in row groups of whole shards of at least 2^18 rows (as
`packing.concat_index`). Metadata as LibriSpeech's: SSSS-CCCCCC-NNNN keys, transcripts
of 60-300 characters of words, full hdfs:// source paths, gamma(4, 3) durations of
1-35 s. The shard files themselves are not written: opening and planning never read them.

Each run is a fresh process, as a rank starts: it imports the reader, then times
`ShardDataset(uri, rank=0, world_size=W)` (open) and `ds.plan(0)` (plan), and records
its peak RSS above the RSS once the imports are done (the reader's modules, and pandas,
which pyarrow imports on first use; VmHWM, reset after the imports) and the bytes it
read (rchar, /proc/self/io; the dataset is on local disk, page-cached by reading it
once before a case's runs, so the times are CPU and the bytes are what HDFS would serve). A run that fails records its error's one line; a run whose RSS
passes --rss-cap-gb is killed and says so. `--ref` also runs every case with the
reader of that commit (a git worktree), interleaved with this one.
Goals (issue 28), per rank: open + plan of epoch 0 within 5 s, peak RSS over the
imports within 1 GB, at most 10 bytes read per utterance of the dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ROOT, WORK, checkout, median, write_result
from hdfs_io.format import dataset_format as F

DATA = WORK / "rank_start"
SEED = 28
SHARD_BYTES = 256 * 2**20  # pack's --shard-size-mb default
ROW_GROUP_BYTES = 16 * 2**20  # pack's --row-group-mb default
INDEX_ROWS_PER_GROUP = 1 << 18  # packing.concat_index's default
SAMPLE_RATE = 16000
FLAC_BYTES_PER_SECOND = 20 * 1024
CHARS_PER_SECOND = 15.0  # LibriSpeech reads at about 15 characters a second
TRANSCRIPT_CHARS = (60, 300)
PER_CHAPTER = 100
SOURCE_ROOT = "hdfs://nn:8020/corpora/LibriSpeech/train-other-500"
GOAL = {"open_plan_s": 5.0, "added_mb": 1024.0, "bytes_per_utterance": 10.0}

# Runs in a fresh process, with the code of the checkout it is started in (cwd and PYTHONPATH).
CHILD = r"""
import json, os, sys, time
import pandas  # pyarrow imports it on first use: an import, not the reader's own reading
import hdfs_io, hdfs_io.format.dataset, hdfs_io.reader.planner, hdfs_io.reader.shard_reader
from hdfs_io.reader.shard_reader import ShardDataset

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

def rchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

uri, world = sys.argv[1], int(sys.argv[2])
out = {"hdfs_io": os.path.dirname(hdfs_io.__file__), "rss_imports_mb": rss_mb(), "open_s": None, "plan_s": None,
       "batches": None, "error": None}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM: the peak that follows is the reader's, not the imports'
read_before = rchar()
started = time.perf_counter()
try:
    ds = ShardDataset(uri, rank=0, world_size=world)
    out["open_s"] = time.perf_counter() - started
    started = time.perf_counter()
    plan = ds.plan(0)
    out["plan_s"] = time.perf_counter() - started
    out["batches"] = len(plan.batches)
except Exception as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    out["error"] = f"{type(e).__module__}.{type(e).__qualname__}: {lines[0] if lines else ''}"
out["read_bytes"] = rchar() - read_before
out["added_mb"] = peak_mb() - out["rss_imports_mb"]
print("RESULT " + json.dumps(out), flush=True)
"""


# ---- the synthetic dataset

def name_of(utterances: int, fmt: str) -> str:
    return f"{fmt}-{utterances}"


def digits(values: np.ndarray, width: int) -> np.ndarray:
    """Returns zero-padded decimal digits of `values` as an (n, width) uint8 matrix of ASCII."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values.astype(np.int64)[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def text(value: str, n: int) -> np.ndarray:
    """Returns `value` as n rows of ASCII bytes (a view, for np.hstack)."""
    return np.broadcast_to(np.frombuffer(value.encode(), np.uint8), (n, len(value)))


def fixed_strings(matrix: np.ndarray) -> pa.StringArray:
    """Returns a string array of the rows of an (n, width) uint8 matrix, built on its bytes."""
    n, width = matrix.shape
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(matrix)))


def names(ids: np.ndarray) -> tuple[pa.StringArray, pa.StringArray, pa.StringArray]:
    """Returns the keys, speakers and source paths of corpus utterances `ids` (SSSS-CCCCCC-NNNN, as LibriSpeech's)."""
    chapter = ids // PER_CHAPTER
    speaker = digits(1000 + chapter // 40 % 9000, 4)
    chapter, utterance = digits(chapter, 6), digits(ids % PER_CHAPTER, 4)
    n = len(ids)
    key = np.hstack([speaker, text("-", n), chapter, text("-", n), utterance])
    source = np.hstack([text(SOURCE_ROOT + "/", n), speaker, text("/", n), chapter, text("/", n), key,
                        text(".flac", n)])
    return fixed_strings(key), fixed_strings(speaker), fixed_strings(source)


# a-z, percent of letters in English text
ENGLISH_LETTERS = np.array([8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4, 6.7, 7.5, 1.9,
                            0.095, 6.0, 6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074])
ENGLISH_LETTERS = ENGLISH_LETTERS / ENGLISH_LETTERS.sum()


class Words:
    """A vocabulary of pseudo-words with Zipf frequencies, for transcripts that compress about as English does."""

    def __init__(self, rng: np.random.Generator, size: int = 20000):
        lengths = np.clip(rng.poisson(4.0, size) + 1, 1, 12)
        letters = rng.choice(26, int(lengths.sum()), p=ENGLISH_LETTERS) + ord("a")
        ends = np.cumsum(lengths)
        # each word followed by its space
        self.data = np.insert(letters.astype(np.uint8), ends, ord(" "))
        self.lengths = lengths + 1
        self.starts = np.cumsum(self.lengths) - self.lengths
        weights = 1.0 / np.arange(1, size + 1)
        self.p = weights / weights.sum()
        self.mean_length = float((self.p * self.lengths).sum())
        self.vocabulary = sorted({chr(c) for c in np.unique(self.data)})

    def transcripts(self, rng: np.random.Generator, lengths: np.ndarray) -> pa.StringArray:
        """Returns transcripts of about `lengths` characters (whole words: within a word's length of it)."""
        targets = np.cumsum(lengths)
        count = int(targets[-1] / self.mean_length * 1.05) + 100
        while True:
            ids = rng.choice(len(self.p), count, p=self.p)
            sizes = self.lengths[ids]
            if sizes.sum() > targets[-1] + 20:
                break
            count *= 2
        out_starts = np.cumsum(sizes) - sizes
        stream = self.data[np.arange(int(sizes.sum())) - np.repeat(out_starts - self.starts[ids], sizes)]
        spaces = np.flatnonzero(stream == ord(" "))
        cuts = spaces[np.searchsorted(spaces, targets)]  # the first space at or after each target end
        n = len(lengths)
        offsets = np.concatenate([[0], cuts + 1 - np.arange(1, n + 1)]).astype(np.int32)
        data = np.delete(stream[:cuts[-1]], cuts[:-1])  # the spaces between transcripts go
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def layout(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Returns the utterances in pack's duration layout: corpus ids, lengths in samples, sizes, shards, rows.

    Sorted by (duration, key), as `pack_stages.lay_out` sorts; a key's corpus id orders as
    the key does. Each utterance goes to the shard where its first byte falls (`packing.cut_shards`).
    """
    seconds = np.clip(rng.gamma(4.0, 3.0, n), 1.0, 35.0)
    samples = np.rint(seconds * SAMPLE_RATE).astype(np.int64)
    del seconds
    sizes = (samples / SAMPLE_RATE * FLAC_BYTES_PER_SECOND * rng.uniform(0.85, 1.15, n)).astype(np.int64)
    order = np.argsort(samples, kind="stable")
    samples, sizes = samples[order], sizes[order]
    shards = ((np.cumsum(sizes) - sizes) // SHARD_BYTES).astype(np.int32)
    firsts = np.searchsorted(shards, np.arange(int(shards[-1]) + 1))
    rows = np.arange(n, dtype=np.int64) - firsts[shards]
    return {"ids": order, "samples": samples, "sizes": sizes, "shards": shards, "rows": rows}


def index_groups(shard_rows: np.ndarray) -> list[tuple[int, int]]:
    """Returns [first, end) shards of each index.parquet row group: whole shards until 2^18 rows, as concat_index."""
    groups, first, pending = [], 0, 0
    for shard, rows in enumerate(shard_rows.tolist()):
        pending += rows
        if pending >= INDEX_ROWS_PER_GROUP:
            groups.append((first, shard + 1))
            first, pending = shard + 1, 0
    if first < len(shard_rows):
        groups.append((first, len(shard_rows)))
    return groups


def row_groups(sizes: np.ndarray, rows: np.ndarray, shards: np.ndarray) -> np.ndarray:
    """Returns each row's Parquet row group: a shard's sizes barely vary (duration layout), so k rows of
    ceil(16 MB / its mean size) fill a group, as pack closes one once it holds 16 MB."""
    local = shards - shards[0]
    mean = np.bincount(local, weights=sizes) / np.bincount(local)
    per_group = np.ceil(ROW_GROUP_BYTES / mean).astype(np.int64)
    return (rows // per_group[local]).astype(np.int32)


def seq_offsets(sizes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns each record's byte offset in its SequenceFile shard, and each record's end, as
    SequenceFileWriter places them: after the header, a sync mark once 100 KB are past the last."""
    from hdfs_io.format.sequencefile import SYNC_INTERVAL, SequenceFileWriter

    header = SequenceFileWriter(io.BytesIO()).pos
    records = (8 + 1 + 16 + 4 + sizes).tolist()  # lengths, Text key (vint + 16 bytes), BytesWritable
    offsets = np.empty(len(records), np.int64)
    pos = last_sync = 0
    for i, (row, size) in enumerate(zip(rows.tolist(), records)):
        if row == 0:
            pos = last_sync = header
        elif pos >= last_sync + SYNC_INTERVAL:
            pos += 4 + 16
            last_sync = pos
        offsets[i] = pos
        pos += size
    return offsets, offsets + np.array(records, np.int64)


def index_table(part: dict[str, np.ndarray], fmt: str, words: Words, rng: np.random.Generator) -> pa.Table:
    """Returns the index rows of consecutive whole shards, in (shard, row) order, as INDEX_SCHEMA."""
    n = len(part["ids"])
    durations = part["samples"] / SAMPLE_RATE
    keys, speakers, sources = names(part["ids"])
    lengths = np.clip(np.rint(durations * CHARS_PER_SECOND * rng.uniform(0.8, 1.2, n)),
                      TRANSCRIPT_CHARS[0] + 12, TRANSCRIPT_CHARS[1] - 12).astype(np.int64)
    minus_one = np.full(n, -1)
    if fmt == "parquet":
        row_group, offset = row_groups(part["sizes"], part["rows"], part["shards"]), minus_one
    else:
        row_group, offset = minus_one, part["offsets"]
    columns = {
        F.KEY: keys, F.SHARD: part["shards"], F.ROW: part["rows"], F.ROW_GROUP: row_group, F.OFFSET: offset,
        F.NUM_BYTES: part["sizes"], F.CODEC: pa.repeat("flac", n), F.SAMPLE_RATE: np.full(n, SAMPLE_RATE),
        F.CHANNELS: np.ones(n, np.int16), F.NUM_SAMPLES: part["samples"], F.DURATION_S: durations,
        F.TRANSCRIPT: words.transcripts(rng, lengths), F.SPEAKER: speakers,
        F.CHECKSUM: rng.integers(0, 2**32, n, dtype=np.int64), F.SOURCE: sources,
    }
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) if isinstance(columns[f.name], np.ndarray)
                                 else columns[f.name] for f in F.INDEX_SCHEMA], schema=F.INDEX_SCHEMA)


def shard_summary(shard: int, fmt: str, table: pa.Table, shard_bytes: int, vocabulary: str,
                  rng: np.random.Generator) -> dict:
    """Returns a shard's summary as packing.write_shard returns it (checksum made up: no shard is written)."""
    from spark_jobs.packing import histogram_counts

    durations = table.column(F.DURATION_S).to_numpy()
    return {F.SHARD: shard, "path": F.shard_path(shard, fmt), "rows": table.num_rows, "bytes": shard_bytes,
            "checksum": f"{F.CHECKSUM_ALGORITHM}:{int(rng.integers(0, 2**32)):08x}",
            "min_duration_s": float(durations.min()), "max_duration_s": float(durations.max()),
            "audio_seconds": float(durations.sum()), "histogram": histogram_counts(durations).tolist(),
            "vocabulary": vocabulary, "failed": 0}


def manifest(fmt: str, summaries: list[dict], output: str, seconds: float) -> dict:
    """Returns dataset.json as pack writes it for these shards, with pack's default arguments."""
    from hdfs_io.speech.features import FeatureConfig, FeatureMoments
    from spark_jobs import pack, packing

    argv = ["--input", SOURCE_ROOT, "--output", output, "--format", fmt]
    args = pack.parse_args(argv)
    config = FeatureConfig(kind=args.feature)
    frames = 2000 * 1200
    moments = FeatureMoments(frames, np.full(config.num_bins, -4.0 * frames), np.full(config.num_bins, 20.0 * frames))
    return packing.build_manifest(
        fmt=fmt, totals=packing.merge_summaries(summaries), quarantined=0, feature_config=config,
        moments=moments, stats_utterances=args.stats_sample, exact_stats=False,
        command=["spark_jobs/pack.py", *argv],
        config={k: v for k, v in vars(args).items() if k not in ("master", "quiet", "progress_s")},
        timing_s={"discover_and_probe": 0.0, "write_shards": seconds, "total_in_spark": seconds})


def disk_use(root: Path) -> dict:
    files = [p for p in root.rglob("*") if p.is_file()]
    index_parts = root / F.INDEX_DIR
    return {"files": len(files), "disk_bytes": sum(p.stat().st_blocks * 512 for p in files),
            "bytes": sum(p.stat().st_size for p in files), "index_bytes": (root / F.INDEX).stat().st_size,
            "index_parts_bytes": sum(p.stat().st_size for p in index_parts.iterdir())}


def dataset(utterances: int, fmt: str) -> tuple[str, dict]:
    """Returns the URI of the synthetic dataset of `utterances` in `fmt`, and how it was made (made once, kept).

    Streams: holds the layout's numeric columns (about 40 bytes an utterance) and one
    index row group's strings at a time.
    """
    name = name_of(utterances, fmt)
    root, done = DATA / name, DATA / f"{name}.json"
    if not done.exists():
        staging = DATA / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        (staging / F.INDEX_DIR).mkdir(parents=True)
        started = time.perf_counter()
        made = generate(utterances, fmt, staging, f"file://{root}")
        seconds = time.perf_counter() - started
        staging.rename(root)
        done.write_text(json.dumps({"seconds": seconds, **made, **disk_use(root)}) + "\n")
    return f"file://{root}", json.loads(done.read_text())


def generate(utterances: int, fmt: str, out: Path, uri: str) -> dict:
    """Writes index parts, index.parquet and dataset.json of a synthetic dataset into `out`; returns its shape."""
    rng = np.random.default_rng(SEED)
    words = Words(rng)
    vocabulary = "".join(words.vocabulary)
    lay = layout(utterances, rng)
    shard_rows = np.bincount(lay["shards"])
    firsts = np.concatenate([[0], np.cumsum(shard_rows)])
    summaries = []
    started = time.perf_counter()
    with pq.ParquetWriter(out / F.INDEX, F.INDEX_SCHEMA, write_page_checksum=True) as writer:  # as concat_index
        groups = index_groups(shard_rows)
        for number, (first, end) in enumerate(groups):
            lo, hi = int(firsts[first]), int(firsts[end])
            group_rng = np.random.default_rng([SEED, utterances, number])
            part = {k: v[lo:hi] for k, v in lay.items()}
            if fmt != "parquet":
                part["offsets"], ends = seq_offsets(part["sizes"], part["rows"])
            table = index_table(part, fmt, words, group_rng)
            for shard in range(first, end):
                rows = table.slice(int(firsts[shard]) - lo, int(shard_rows[shard]))
                pq.write_table(rows, out / F.index_part_path(shard), write_page_checksum=True)  # as write_shard
                a, b = int(firsts[shard]) - lo, int(firsts[shard + 1]) - lo
                # a shard's size: its last record's end, or its audio and about 200 bytes of metadata a row
                shard_bytes = int(ends[b - 1]) if fmt != "parquet" else int(part["sizes"][a:b].sum()) + 200 * (b - a)
                summaries.append(shard_summary(shard, fmt, rows, shard_bytes, vocabulary, group_rng))
            writer.write_table(table, row_group_size=table.num_rows)
            del table
            if number % 20 == 0:
                print(f"  {name_of(utterances, fmt)}: {hi:,} of {utterances:,} rows, "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    shards = len(shard_rows)
    del lay
    content = json.dumps(manifest(fmt, summaries, uri, time.perf_counter() - started), indent=1)
    F.parse_manifest(content)  # what the reader checks first
    (out / F.MANIFEST).write_text(content)
    return {"shards": shards, "index_row_groups": len(groups),
            "rows_per_shard_median": float(np.median(shard_rows))}


# ---- measurement

def warm(uri: str) -> float:
    """Reads every file of the dataset once, so every run finds it in the page cache; returns the seconds."""
    started = time.perf_counter()
    for path in Path(uri.removeprefix("file://")).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(16 * 2**20):
                    pass
    return time.perf_counter() - started


def rss_of(pid: int) -> float:
    """Returns a process's RSS in MB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0) / 1024
    except OSError:
        return 0.0


def run_child(uri: str, world: int, code: str, cap_mb: float, timeout_s: float) -> dict:
    """Runs CHILD in a fresh process in checkout `code`; kills it past `cap_mb` of RSS or `timeout_s`."""
    env = dict(os.environ, PYTHONPATH=code)
    started = time.perf_counter()
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # not pipes: nothing blocks
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(world)], cwd=code, env=env,
                             stdout=stdout, stderr=stderr, text=True)
    killed, largest = None, 0.0
    while child.poll() is None:
        largest = max(largest, rss_of(child.pid))
        if largest > cap_mb:
            killed = f"killed by the benchmark: RSS passed {cap_mb / 1024:.0f} GB"
        elif time.perf_counter() - started > timeout_s:
            killed = f"killed by the benchmark: still running after {timeout_s:.0f} s"
        if killed:
            child.kill()
            break
        time.sleep(0.05)
    child.wait()
    wall = time.perf_counter() - started
    stdout.seek(0)
    stderr.seek(0)
    stdout, stderr = stdout.read(), stderr.read()
    result = next((json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")),
                  None)
    if result is None:
        tail = [line for line in stderr.splitlines() if line.strip()]
        result = {"open_s": None, "plan_s": None, "added_mb": None, "read_bytes": None, "rss_imports_mb": None,
                  "batches": None, "error": killed or f"exit {child.returncode}: {tail[-1] if tail else ''}"}
    return dict(result, wall_s=wall, sampled_peak_rss_mb=largest)


def medians(runs: list[dict]) -> dict:
    """Returns the medians of a case's runs; its first error if any run failed."""
    errors = [r["error"] for r in runs if r["error"]]
    out = {"runs": len(runs), "error": errors[0] if errors else None}
    for key in ("open_s", "plan_s", "added_mb", "read_bytes"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = median(values) if values and not errors else None
    return out


def met(row: dict, utterances: int) -> bool:
    if row["error"]:
        return False
    return (row["open_s"] + row["plan_s"] <= GOAL["open_plan_s"] and row["added_mb"] <= GOAL["added_mb"]
            and row["read_bytes"] / utterances <= GOAL["bytes_per_utterance"])


def table_line(utterances: int, fmt: str, code: str, row: dict) -> str:
    def number(value, scale=1.0, digits=2):
        return f"{value / scale:,.{digits}f}" if value is not None else "-"

    per_utt = row["read_bytes"] / utterances if row["read_bytes"] is not None else None
    return (f"| {utterances:,} | {fmt} | {code} | {number(row['open_s'])} | {number(row['plan_s'])} | "
            f"{number(row['added_mb'], digits=0)} | {number(row['read_bytes'], 2**20, 0)} | {number(per_utt, digits=1)} | "
            f"{'yes' if met(row, utterances) else 'no'} | {row['error'] or ''} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--utterances", default="3000000,30000000", help="dataset sizes, comma-separated")
    p.add_argument("--world-size", type=int, default=512)
    p.add_argument("--formats", default="parquet,sequencefile", help="shard formats, comma-separated")
    p.add_argument("--ref", default="", help="also run the reader of this commit, interleaved")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rss-cap-gb", type=float, default=12.0, help="a run past this RSS is killed (a shared machine)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="a run past this is killed")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.utterances.split(",")]
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in F.FORMATS]
    if unknown:
        p.error(f"unknown format {unknown[0]!r}: use {' or '.join(F.FORMATS)}")
    codes = {"new": str(ROOT)}
    if args.ref:
        sha = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.strip()
        codes[f"ref {sha}"] = checkout(sha)

    made = {}
    for utterances in sizes:
        for fmt in formats:
            uri, info = dataset(utterances, fmt)
            made[name_of(utterances, fmt)] = dict(info, uri=uri)
            print(f"dataset {name_of(utterances, fmt)}: {info['shards']:,} shards, made in {info['seconds']:.0f} s, "
                  f"{info['disk_bytes'] / 2**30:.2f} GB on disk (index.parquet {info['index_bytes'] / 2**30:.2f} GB, "
                  f"index parts {info['index_parts_bytes'] / 2**30:.2f} GB)", flush=True)

    if changes():
        print(f"new = this checkout, with uncommitted changes: {'; '.join(changes())}", flush=True)
    runs, summary = [], []
    for utterances in sizes:
        for fmt in formats:
            uri = made[name_of(utterances, fmt)]["uri"]
            made[name_of(utterances, fmt)]["warm_s"] = warm(uri)
            for repeat in range(args.repeats):
                for code, path in codes.items():
                    row = {"utterances": utterances, "format": fmt, "code": code, "repeat": repeat,
                           **run_child(uri, args.world_size, path, args.rss_cap_gb * 1024, args.timeout_s)}
                    runs.append(row)
                    print(f"  {utterances:>10,} {fmt:>12} {code:>12}: open {row['open_s']} s, plan {row['plan_s']} s, "
                          f"+{row['added_mb']} MB, read {row['read_bytes']} B, error {row['error']}", flush=True)
            for code in codes:
                mine = [r for r in runs if (r["utterances"], r["format"], r["code"]) == (utterances, fmt, code)]
                summary.append({"utterances": utterances, "format": fmt, "code": code, **medians(mine)})

    print(f"\nrank 0 of {args.world_size}, medians of {args.repeats}; goal: open + plan <= 5 s, "
          "peak RSS over imports <= 1,024 MB, <= 10 B read per utterance")
    print("| utterances | format | code | open s | plan s | peak RSS over imports MB | read MB | B/utt | goal met | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in summary:
        print(table_line(row["utterances"], row["format"], row["code"], row))
    path = write_result("rank_start", {
        "command": ["python", "-m", "bench.rank_start", *(sys.argv[1:] if argv is None else argv)],
        "world_size": args.world_size, "rank": 0, "repeats": args.repeats, "codes": codes,
        "head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip(),
        "uncommitted": changes(), "datasets": made, "rows": runs, "medians": summary,
        "goal": "per rank: open + plan of epoch 0 <= 5 s, peak RSS over the imports <= 1 GB, "
                "<= 10 bytes read per utterance"})
    print(f"-> {path}")
    return 0


def changes() -> list[str]:
    """Returns the reader's files that differ from HEAD in this checkout (`git status --short`): the "new" code."""
    status = subprocess.run(["git", "status", "--short", "--", "hdfs_io"], cwd=ROOT, capture_output=True, text=True)
    return status.stdout.splitlines()


if __name__ == "__main__":
    raise SystemExit(main())
