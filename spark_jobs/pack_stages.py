"""The pack job's stages as Spark DataFrames: discover, resolve duplicates, probe, lay out, write, summarize.

Every per-utterance row lives in a DataFrame, on the executors. What reaches the
driver is a few numbers per input range, per Spark partition or per shard, and
what travels inside a task is a few numbers per partition: the driver's memory
does not grow with the number of utterances. The row-level work is the plain
functions of spark_jobs.sources and spark_jobs.packing, run by `mapInArrow`
through `rows_task`, which turns Arrow batches into dicts and back.
"""

from __future__ import annotations

import itertools
import math
import posixpath
import sys
import threading
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
from pyarrow import fs as pafs
from pyspark import StorageLevel, TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as sf
from pyspark.sql.pandas.types import from_arrow_schema

from hdfs_io.format import dataset_format as F
from hdfs_io.fs.filesystem import failure_cause, first_line, join_uri, open_filesystem, printable, probe_uri, uri_base
from spark_jobs import packing, sources
from spark_jobs.sources import KIND, ORDER, URI

RANGE_BYTES = 32 * 2**20  # a text input (manifest, Kaldi list) is read in ranges of this size
LIST_TASKS = 64  # a tree is split into about this many folders, each listed whole by one task
# A Python task costs Spark about 0.1 s whatever it does (measured here on local[2]): a task probes
# enough files that this stays small, and passes over few rows run in `parallelism` tasks.
PROBE_FILES_PER_TASK = 2000
WRITE_ROWS_PER_TASK = 2000  # the same for the write tasks, which take several small shards each
LAYOUT_ROWS_PER_PARTITION = 200_000
ITEM = "item"

_META = [pa.field(f.name, f.type) for f in F.INDEX_SCHEMA if f.name in (
    F.NUM_BYTES, F.CHECKSUM, F.CODEC, F.SAMPLE_RATE, F.CHANNELS, F.NUM_SAMPLES, F.DURATION_S)]
ENTRY = pa.schema([pa.field(name, pa.string()) for name in sources.ENTRY_FIELDS])
CANDIDATE = pa.schema([pa.field(n, pa.string()) for n in (ORDER, F.KEY, URI, F.TRANSCRIPT, F.SPEAKER)]
                      + [pa.field(packing.IN_SAMPLE, pa.bool_())])
PROBED = pa.schema([*CANDIDATE, pa.field(packing.ERROR, pa.string()), *_META,
                    pa.field(packing.MOMENTS, pa.binary())])
PLACED = pa.schema([pa.field(F.SHARD, pa.int32()), pa.field(packing.POS, pa.int64()),
                    *[f for f in PROBED if f.name in (F.KEY, URI, F.TRANSCRIPT, F.SPEAKER)], *_META])
TOTALS = pa.schema([("partition", pa.int32()), ("rows", pa.int64()), ("bytes", pa.int64()),
                    ("last_size", pa.int64()), ("big_starts", pa.list_(pa.int64())),
                    ("big_sizes", pa.list_(pa.int64()))])
COUNT = pa.schema([("partition", pa.int32()), ("count", pa.int64())])
LINES = pa.schema([(ITEM, pa.int64()), ("lines", pa.int64())])
MOMENTS = pa.schema([("count", pa.int64()), (packing.MOMENTS, pa.binary())])
SUMMARY = pa.schema([(F.SHARD, pa.int32()), ("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()),
                     ("checksum", pa.string()), ("min_duration_s", pa.float64()), ("max_duration_s", pa.float64()),
                     ("audio_seconds", pa.float64()), ("histogram", pa.list_(pa.int64())),
                     ("vocabulary", pa.string()), ("failed", pa.int64())])
TEXT_ITEM = pa.schema([(ITEM, pa.int64()), ("name", pa.string()), ("start", pa.int64()), ("end", pa.int64()),
                       ("first_line", pa.int64())])
# A folder travels as bytes: a local name need not be UTF-8 (sources.folder_entries).
TREE_ITEM = pa.schema([(ITEM, pa.int64()), ("folder", pa.binary()), ("recursive", pa.bool_())])


# ---- plumbing: plain-row functions as mapInArrow tasks

def rows_task(batches: Iterable[pa.RecordBatch], *, fn: Callable, schema: pa.Schema,
              batch_rows: int = 4096) -> Iterator[pa.RecordBatch]:
    """mapInArrow task: feeds the partition's rows to `fn(rows, partition)` as dicts, yields its dicts as batches."""
    rows = (row for batch in batches for row in batch.to_pylist())
    out = iter(fn(rows, TaskContext.get().partitionId()))
    while chunk := [r for _, r in zip(range(batch_rows), out)]:
        yield pa.RecordBatch.from_pylist(chunk, schema)


def map_rows(df: DataFrame, fn: Callable, schema: pa.Schema) -> DataFrame:
    """Returns `df` mapped partition by partition by `fn(rows, partition) -> rows` (top-level, picklable)."""
    return df.mapInArrow(partial(rows_task, fn=fn, schema=schema), from_arrow_schema(schema))


def frame(spark: SparkSession, rows: list[dict], schema: pa.Schema, partitions: int) -> DataFrame:
    """Returns a small driver-made DataFrame (O(items) rows) spread over `partitions` by its ITEM column."""
    df = spark.createDataFrame([tuple(r[n] for n in schema.names) for r in rows], from_arrow_schema(schema))
    return df.repartitionByRange(max(1, min(partitions, len(rows))), ITEM)


# ---- discover

def discover(spark: SparkSession, uri: str) -> tuple[str, DataFrame]:
    """Returns the input's kind and a DataFrame of its entries, read by tasks (see spark_jobs.sources).

    The driver lists a tree's folders down to the level that has LIST_TASKS of them (sources.split_tree),
    keeping their names only, and reads nothing of a text input but its size.
    """
    fs, path, info = probe_uri(uri)
    base = uri_base(uri)
    kind = sources.input_kind(fs, path, info, base)
    parallelism = spark.sparkContext.defaultParallelism
    if kind == "librispeech":
        tasks = frame(spark, tree_items(fs, path, LIST_TASKS), TREE_ITEM, 4 * parallelism)  # several per task
        return kind, map_rows(tasks, partial(tree_task, fs_uri=uri), ENTRY)
    names = ["manifest"] if kind == "manifest" else [n for n in sources.KALDI_FILES
                                                     if fs.get_file_info(posixpath.join(path, n)).type
                                                     == pafs.FileType.File]
    ranges = [(n, start, end) for n in names for start, end in sources.byte_ranges(
        fs.get_file_info(path if kind == "manifest" else posixpath.join(path, n)).size, RANGE_BYTES)]
    items = [{ITEM: i, "name": n, "start": s, "end": e, "first_line": 0} for i, (n, s, e) in enumerate(ranges)]
    counted = map_rows(frame(spark, items, TEXT_ITEM, len(items)), partial(count_task, uri=uri, kind=kind), LINES)
    lines = dict(tuple(r) for r in counted.collect())  # item -> lines: one number per range
    first = {}
    for item in items:  # ranges of one file are consecutive items
        first[item["name"]] = first.get(item["name"], 1)
        item["first_line"] = first[item["name"]]
        first[item["name"]] += lines[item[ITEM]]
    tasks = frame(spark, items, TEXT_ITEM, len(items))
    return kind, map_rows(tasks, partial(text_task, uri=uri, kind=kind), ENTRY)


def text_file(uri: str, kind: str, name: str) -> tuple[pafs.FileSystem, str, str]:
    """Returns (fs, path of the file, folder) for a manifest (`uri` itself) or a Kaldi list in folder `uri`."""
    fs, path = open_filesystem(uri)
    if kind == "manifest":
        return fs, path, posixpath.dirname(path)
    return fs, posixpath.join(path, name), path


def count_task(items: Iterable[dict], partition: int, *, uri: str, kind: str) -> Iterator[dict]:
    for item in items:
        fs, path, _ = text_file(uri, kind, item["name"])
        yield {ITEM: item[ITEM], "lines": sources.count_lines(fs, path, item["start"], item["end"])}


def text_task(items: Iterable[dict], partition: int, *, uri: str, kind: str) -> Iterator[dict]:
    base = uri_base(uri)
    for item in items:
        fs, path, folder = text_file(uri, kind, item["name"])
        lines = sources.numbered(sources.lines_in_range(fs, path, item["start"], item["end"]), item["first_line"])
        if kind == "manifest":
            yield from sources.manifest_entries(lines, path, base)
        else:
            yield from sources.kaldi_entries(lines, item["name"], folder, base)


def tree_items(fs: pafs.FileSystem, root: str, want: int) -> list[dict]:
    """Returns the TREE_ITEM rows of the tree at `root`: about `want` folders to list whole, and the folders
    above them to list alone (sources.split_tree)."""
    trees, folders = sources.split_tree(fs, root, want)
    listings = [(t, True) for t in trees] + [(f, False) for f in folders]
    return [{ITEM: i, "folder": f.encode("utf-8", "surrogateescape"), "recursive": recursive}
            for i, (f, recursive) in enumerate(listings)]


def tree_task(items: Iterable[dict], partition: int, *, fs_uri: str) -> Iterator[dict]:
    fs, _ = open_filesystem(fs_uri)
    base = uri_base(fs_uri)
    for item in items:
        folder = item["folder"].decode("utf-8", "surrogateescape")
        try:
            files = packing.confirmed(partial(sources.list_tree, recursive=item["recursive"]), fs, folder,
                                      base + folder)
        except FileNotFoundError as e:  # gone since the driver listed it: the input's own change
            yield sources.reject(printable(f"{base}{folder}"), f"cannot list folder: {first_line(e)}")
            continue
        except PermissionError as e:  # the storage's, not the input's: fail the task (see packing.read_audio)
            raise packing.SourceDenied(str(e)) from None
        except OSError as e:
            raise packing.SourceUnreadable(f"cannot list {printable(base + folder)}: {failure_cause(e)}") \
                from None
        yield from sources.tree_entries(fs, files, base)


# ---- resolve duplicates: one shuffle of metadata by key

def resolve(entries: DataFrame) -> DataFrame:
    """Returns CANDIDATE, REJECT and TRANS_FILE entries: every key's entries resolved in input order."""
    passed = entries.filter(sf.col(KIND).isin(sources.REJECT, sources.TRANS_FILE))
    keyed = entries.filter(~sf.col(KIND).isin(sources.REJECT, sources.TRANS_FILE))
    grouped = keyed.repartition(F.KEY).sortWithinPartitions(F.KEY, ORDER)
    return map_rows(grouped, resolve_task, ENTRY).unionByName(passed)


def resolve_task(rows: Iterable[dict], partition: int) -> Iterator[dict]:
    return sources.resolve(rows)


# ---- stats sample: the `sample` keys with the smallest seeded hash

def with_stats_sample(candidates: DataFrame, count: int, sample: int | None, seed: int) -> DataFrame:
    """Returns the candidates with IN_SAMPLE set on `sample` of them (all if None), chosen by a seeded hash."""
    if sample is None or sample >= count:
        return candidates.withColumn(packing.IN_SAMPLE, sf.lit(True))
    hashed = sf.xxhash64(sf.lit(seed), sf.col(F.KEY))
    if sample == 0:
        return candidates.withColumn(packing.IN_SAMPLE, sf.lit(False))
    top = candidates.select(hashed.alias("h")).orderBy("h").limit(sample).agg(sf.max("h")).first()[0]
    return candidates.withColumn(packing.IN_SAMPLE, hashed <= sf.lit(top))


# ---- probe

def probe(candidates: DataFrame, count: int, parallelism: int, feature_config: dict) -> DataFrame:
    """Returns every candidate probed (PROBED rows), in tasks of about PROBE_FILES_PER_TASK files in input order."""
    tasks = max(2 * parallelism, math.ceil(count / PROBE_FILES_PER_TASK), 1)
    spread = candidates.select(*CANDIDATE.names).repartitionByRange(tasks, ORDER)
    return map_rows(spread, partial(probe_task, feature_config=feature_config), PROBED)


def probe_task(rows: Iterable[dict], partition: int, *, feature_config: dict) -> Iterator[dict]:
    for row in rows:
        yield packing.probe_one(row, feature_config)


def moments(probed: DataFrame, num_bins: int, parallelism: int):
    """Returns the summed feature moments of the sampled utterances and their count (one row per task)."""
    sampled = probed.select(packing.MOMENTS).filter(sf.col(packing.MOMENTS).isNotNull()).coalesce(parallelism)
    parts = map_rows(sampled, partial(moments_task, num_bins=num_bins), MOMENTS).collect()
    total, _ = packing.merge_moments([r[packing.MOMENTS] for r in parts], num_bins)
    return total, sum(r["count"] for r in parts)


def moments_task(rows: Iterable[dict], partition: int, *, num_bins: int) -> Iterator[dict]:
    total, count = packing.merge_moments((r[packing.MOMENTS] for r in rows), num_bins)
    yield {"count": count, packing.MOMENTS: packing.moments_bytes(total)}


# ---- quarantine parts, written by executors

def write_rejects(rejects: DataFrame, dataset_uri: str, stage: str, parallelism: int) -> int:
    """Writes the rejects as quarantine parts `<stage>-NNNNN.jsonl` in `parallelism` tasks; returns how many."""
    counts = map_rows(rejects.select(F.SOURCE, F.REASON).coalesce(parallelism),
                      partial(rejects_task, dataset_uri=dataset_uri, stage=stage), COUNT).collect()
    return sum(r["count"] for r in counts)


def rejects_task(rows: Iterable[dict], partition: int, *, dataset_uri: str, stage: str) -> Iterator[dict]:
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        yield {"partition": partition, "count": 0}
        return
    uri = join_uri(dataset_uri, packing.QUARANTINE_PARTS, f"{stage}-{partition:05d}.jsonl")
    yield {"partition": partition, "count": packing.write_quarantine(uri, [first, *rows])}


# ---- lay out: sort, cut by bytes from per-partition totals

@dataclass(frozen=True)
class Layout:
    placed: DataFrame  # PLACED rows
    shards: int
    rows: int


def lay_out(valid: DataFrame, layout: str, count: int, shard_bytes: int, seed: int) -> Layout:
    """Returns the utterances placed in shards: sorted by (duration, key), or by a seeded hash of the key
    for `shuffled`, and cut where the running byte total crosses a multiple of `shard_bytes`."""
    if layout == "duration":
        sort = [sf.col(F.DURATION_S), sf.col(F.KEY)]
    elif layout == "shuffled":
        sort = [sf.xxhash64(sf.lit(seed), sf.col(F.KEY)), sf.col(F.KEY)]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    columns = [n for n in PLACED.names if n not in (F.SHARD, packing.POS)]
    partitions = max(1, math.ceil(count / LAYOUT_ROWS_PER_PARTITION))
    ordered = valid.select(*columns).repartitionByRange(partitions, *sort).sortWithinPartitions(*sort)
    ordered = ordered.persist(StorageLevel.MEMORY_AND_DISK)  # read twice: the totals, then the shard numbers
    totals = sorted((r.asDict() for r in map_rows(ordered, partial(totals_task, shard_bytes=shard_bytes),
                                                  TOTALS).collect()), key=lambda t: t["partition"])
    for t in totals:
        t["big"] = list(zip(t["big_starts"], t["big_sizes"]))
    byte_starts, row_starts, unused, shards = packing.layout_offsets(totals, shard_bytes)
    place = partial(place_task, byte_starts=byte_starts, row_starts=row_starts, unused=unused,
                    shard_bytes=shard_bytes)
    return Layout(map_rows(ordered, place, PLACED), shards, count)


def totals_task(rows: Iterable[dict], partition: int, *, shard_bytes: int) -> Iterator[dict]:
    sizes = np.fromiter((r[F.NUM_BYTES] for r in rows), np.int64)
    t = packing.partition_totals(sizes, shard_bytes)
    yield {"partition": partition, "rows": t["rows"], "bytes": t["bytes"],
           "last_size": int(sizes[-1]) if len(sizes) else 0,
           "big_starts": [s for s, _ in t["big"]], "big_sizes": [z for _, z in t["big"]]}


def place_task(rows: Iterable[dict], partition: int, *, byte_starts: list[int], row_starts: list[int],
               unused: list[tuple[int, int]], shard_bytes: int) -> Iterator[dict]:
    byte_start, pos, rows = byte_starts[partition], row_starts[partition], iter(rows)
    while chunk := list(itertools.islice(rows, 4096)):
        sizes = np.fromiter((r[F.NUM_BYTES] for r in chunk), np.int64, len(chunk))
        shards = packing.shard_numbers(sizes, byte_start, shard_bytes, unused)
        for row, shard in zip(chunk, shards.tolist()):
            yield dict(row, **{F.SHARD: shard, packing.POS: pos})
            pos += 1
        byte_start += int(sizes.sum())


# ---- write

def write(layout: Layout, dataset_uri: str, fmt: str, row_group_bytes: int, parallelism: int) -> list[dict]:
    """Writes every shard with its index part (write_tasks tasks of whole shards); returns the shards' summaries."""
    if not layout.shards:
        return []
    tasks = write_tasks(layout.shards, layout.rows, parallelism)
    task = partial(write_task, dataset_uri=dataset_uri, fmt=fmt, row_group_bytes=row_group_bytes)
    return [r.asDict() for r in map_rows(by_write_task(layout.placed, tasks), task, SUMMARY).collect()]


def write_tasks(shards: int, rows: int, parallelism: int) -> int:
    """Returns how many tasks write `shards` shards of `rows` rows in all: about WRITE_ROWS_PER_TASK rows
    each, at least two per core, never more than one per shard."""
    return max(1, min(shards, max(2 * parallelism, math.ceil(rows / WRITE_ROWS_PER_TASK))))


def by_write_task(placed: DataFrame, tasks: int) -> DataFrame:
    """Returns the PLACED rows in `tasks` partitions, each a run of whole shards, sorted by shard and position.

    Ranges of shard numbers, not a hash of them: hashing a few shard numbers into as
    many partitions left some tasks empty, at Spark's cost of a task each, and gave
    others several shards. The range bounds come from a sample of the rows, so the
    tasks are about equal in rows.
    """
    return placed.repartitionByRange(tasks, F.SHARD).sortWithinPartitions(F.SHARD, packing.POS)


def write_task(rows: Iterable[dict], partition: int, *, dataset_uri: str, fmt: str,
               row_group_bytes: int) -> Iterator[dict]:
    return packing.write_shards(rows, dataset_uri=dataset_uri, fmt=fmt, row_group_bytes=row_group_bytes)


def consolidate(spark: SparkSession, dataset_uri: str, shards: int) -> tuple[int, int]:
    """Writes index.parquet and quarantine.jsonl from their parts, in two tasks; returns their lengths."""
    jobs = spark.sparkContext.parallelize([F.INDEX, F.QUARANTINE], 2)
    done = dict(jobs.map(partial(consolidate_task, dataset_uri=dataset_uri, shards=shards)).collect())
    return done[F.INDEX], done[F.QUARANTINE]


def consolidate_task(name: str, *, dataset_uri: str, shards: int) -> tuple[str, int]:
    if name == F.INDEX:
        return name, packing.concat_index(dataset_uri, shards)
    return name, packing.concat_quarantine(dataset_uri)


# ---- progress

class Progress:
    """Prints the running stage and its tasks done on stderr every `every_s` seconds, until closed."""

    def __init__(self, spark: SparkSession, every_s: float, enabled: bool = True):
        self.tracker, self.every_s, self.stage = spark.sparkContext.statusTracker(), every_s, "starting"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True) if enabled else None
        if self.thread:
            self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            tasks = [self.tracker.getStageInfo(s) for s in self.tracker.getActiveStageIds()]
            tasks = [t for t in tasks if t is not None]
            done = sum(t.numCompletedTasks for t in tasks)
            total = sum(t.numTasks for t in tasks)
            if total:
                print(f"pack: {self.stage}: {done}/{total} tasks of the running Spark stages done", file=sys.stderr,
                      flush=True)

    def close(self) -> None:
        self.done.set()
