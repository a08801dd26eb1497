"""What the pack job's tasks do, on plain rows: probe audio, cut shards by bytes, write shards and their index parts.

The functions take plain dicts, lists, numpy arrays and iterators, so they run in
tests without a JVM; spark_jobs.pack_stages runs them as Spark tasks. Nothing
here sees more than one task's share of the utterances, except the summaries of
whole shards that the driver merges (`merge_summaries`, `build_manifest`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import posixpath
import zlib
from dataclasses import asdict
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from hdfs_io.format import dataset_format as F
from hdfs_io.format.sequencefile import SequenceFileWriter
from hdfs_io.fs.filesystem import failure_cause, first_line, hdfs_user, join_uri, open_filesystem, refuse_if_denied
from hdfs_io.speech.audio import BadAudio, probe
from hdfs_io.speech.features import FeatureConfig, FeatureMoments, features_from_bytes
from spark_jobs.sources import URI

HISTOGRAM_BIN_S = 1.0
# Probe fields besides the format's own.
ERROR = "error"
IN_SAMPLE = "in_stats_sample"
MOMENTS = "moments"  # float64 bytes: frames, per-bin sums, per-bin sums of squares (sampled utterances only)
# Layout fields.
POS = "pos"  # position in the layout's global order
WORK_DIR = "_work"  # inside the temporary output folder; removed before it is published
QUARANTINE_PARTS = f"{WORK_DIR}/quarantine"


# ---- probe

# Seconds at the start of each sampled utterance that the statistics see: a sample's features cost about
# 100 MB a minute of audio, so an hour-long recording whole would take some 6 GB in one task.
STATS_SECONDS = 30.0


class SourceUnreadable(Exception):
    """The storage did not serve a source file: an outage, a refused permission, an expired token.

    Not the file's fault, so it is never quarantined: it fails the task, Spark retries
    it, and the job ends with this one-line message (`pack.source_failure`).
    """


class SourceDenied(SourceUnreadable):
    """The storage refused this user a source file: the user's to mend (exit 2)."""


class UnsupportedPath(ValueError):
    """No filesystem serves this path (an unknown scheme): the entry's own fault, quarantined."""


def read_audio(uri: str) -> bytes:
    """Returns the bytes of the file at `uri` (any filesystem open_filesystem knows).

    Raises:
        FileNotFoundError: no such file, and the storage answered to say so (the file's own fault).
        UnsupportedPath: no filesystem serves the path.
        SourceUnreadable: the storage did not serve it (SourceDenied where it refused this user).
    """
    try:
        fs, path = open_filesystem(uri)
    except pa.ArrowInvalid as e:
        raise UnsupportedPath(first_line(e)) from None
    except OSError as e:
        raise SourceUnreadable(f"cannot read {uri}: {failure_cause(e)}") from None
    try:
        return confirmed(read_file, fs, path, uri)
    except FileNotFoundError:
        raise
    except PermissionError as e:
        raise SourceDenied(f"permission denied: user {hdfs_user()} may not read {uri}") from None
    except OSError as e:
        raise SourceUnreadable(f"cannot read {uri}: {failure_cause(e)}") from None


def read_file(fs: pafs.FileSystem, path: str) -> bytes:
    """Returns the bytes of the file at `path`, stat first: libhdfs prints a Java trace for every failed open,
    but not for a failed stat."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(path)
    with fs.open_input_file(path) as f:
        return f.read()


def confirmed(call, fs: pafs.FileSystem, path: str, uri: str):
    """Returns `call(fs, path)`, letting its FileNotFoundError through only once `confirm_missing` agrees."""
    try:
        return call(fs, path)
    except FileNotFoundError:
        confirm_missing(fs, path, uri)
        raise


def confirm_missing(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """Returns if `path` (a file or a folder) is missing for the input's own sake; raises if the storage only
    seemed to say so.

    libhdfs answers a stat with "not found" when no NameNode answers, and for a path
    under a folder this user may not enter; the root always exists, and a listing
    tells a refusal apart. Costs two calls, for missing files only.

    Raises:
        OSError: the storage did not answer.
        PermissionError: it refused this user the path.
    """
    if fs.get_file_info("/").type != pafs.FileType.Directory:
        raise OSError("the storage did not answer (for HDFS: is the NameNode up?)")
    refuse_if_denied(fs, path, uri)


def probe_one(candidate: dict, feature_config: dict | None = None) -> dict:
    """Returns the candidate with its audio probed: size, checksum, codec, rate, length, or `error`.

    `error` holds the quarantine reason: a file that is missing or not usable audio.
    A candidate marked `in_stats_sample` also gets `moments`: the per-bin sums of
    the features of its first STATS_SECONDS under `feature_config`, for the dataset statistics.

    Raises:
        SourceUnreadable: the storage did not serve the file (see read_audio).
    """
    out = dict(candidate, **{ERROR: None, MOMENTS: None})
    try:
        data = read_audio(candidate[URI])
    except FileNotFoundError:
        out[ERROR] = "transcript line with no audio: file not found"
        return out
    except UnsupportedPath as e:
        out[ERROR] = f"unsupported path: {e}"
        return out
    try:
        info = probe(data)
        if candidate.get(IN_SAMPLE) and feature_config is not None:
            cfg = FeatureConfig(**feature_config)
            moments = FeatureMoments.empty(cfg.num_bins)
            moments.add(features_from_bytes(data, cfg, max_seconds=STATS_SECONDS))
            out[MOMENTS] = moments_bytes(moments)
    except BadAudio as e:
        out[ERROR] = str(e)
        return out
    out.update({F.NUM_BYTES: len(data), F.CHECKSUM: zlib.crc32(data), F.CODEC: info.codec,
                F.SAMPLE_RATE: info.sample_rate, F.CHANNELS: info.channels,
                F.NUM_SAMPLES: info.num_samples, F.DURATION_S: info.duration_s})
    return out


def moments_bytes(m: FeatureMoments) -> bytes:
    return np.concatenate([[m.frames], m.total, m.total_sq]).astype("<f8").tobytes()


def moments_from_bytes(data: bytes) -> FeatureMoments:
    values = np.frombuffer(data, "<f8")
    bins = (len(values) - 1) // 2
    return FeatureMoments(int(values[0]), values[1:1 + bins].copy(), values[1 + bins:].copy())


def merge_moments(blobs: Iterable[bytes | None], num_bins: int) -> tuple[FeatureMoments, int]:
    """Returns the sum of the moments given as `moments_bytes` (None for none), and how many there were."""
    total, count = FeatureMoments.empty(num_bins), 0
    for blob in blobs:
        if blob is not None:
            total, count = total.merge(moments_from_bytes(blob)), count + 1
    return total, count


# ---- layout: shards cut by bytes along a global order that Spark sorted into partitions

def partition_totals(sizes: np.ndarray, shard_bytes: int) -> dict:
    """Returns one sorted partition's facts: rows, bytes, and `big`: (start within it, size) of each
    utterance larger than a shard, the only ones that can leave a shard number unused."""
    starts = np.cumsum(sizes) - sizes
    big = np.nonzero(sizes > shard_bytes)[0]
    return {"rows": int(len(sizes)), "bytes": int(sizes.sum()),
            "big": [(int(starts[i]), int(sizes[i])) for i in big]}


def layout_offsets(totals: list[dict], shard_bytes: int) -> tuple[list[int], list[int], list[tuple[int, int]], int]:
    """Returns, from each partition's `partition_totals` in order: the first byte and first row of each
    partition, the unused shard numbers as [lo, hi) ranges, and the number of shards."""
    byte_starts = np.concatenate([[0], np.cumsum([t["bytes"] for t in totals])]).astype(np.int64)
    row_starts = np.concatenate([[0], np.cumsum([t["rows"] for t in totals])]).astype(np.int64)
    unused = []
    for start, t in zip(byte_starts.tolist(), totals):
        for local, size in t["big"]:
            lo, hi = (start + local) // shard_bytes + 1, (start + local + size) // shard_bytes
            if hi > lo:
                unused.append((lo, hi))
    total_rows = int(row_starts[-1])
    if not total_rows:
        return byte_starts[:-1].tolist(), row_starts[:-1].tolist(), unused, 0
    last_start = int(byte_starts[-1]) - last_size(totals)
    shards = int(dense_shards(np.array([last_start // shard_bytes]), unused)[0]) + 1
    return byte_starts[:-1].tolist(), row_starts[:-1].tolist(), unused, shards


def last_size(totals: list[dict]) -> int:
    for t in reversed(totals):
        if t["rows"]:
            return t["last_size"]
    return 0


def dense_shards(shard_of: np.ndarray, unused: list[tuple[int, int]]) -> np.ndarray:
    """Returns shard numbers with the unused ones squeezed out, so shards are numbered 0, 1, 2, ..."""
    if not unused:
        return shard_of
    ends = np.array([hi for _, hi in sorted(unused)], np.int64)
    lengths = np.cumsum([hi - lo for lo, hi in sorted(unused)])
    below = np.searchsorted(ends, shard_of, side="right")  # unused ranges that end at or before the number
    return shard_of - np.where(below > 0, lengths[np.maximum(below - 1, 0)], 0)


def shard_numbers(sizes: np.ndarray, byte_start: int, shard_bytes: int, unused: list[tuple[int, int]]) -> np.ndarray:
    """Returns the shard of each utterance of a partition: the one where its first byte falls."""
    starts = byte_start + np.cumsum(sizes) - sizes
    return dense_shards(starts // max(shard_bytes, 1), unused)


def cut_shards(sizes: list[int], shard_bytes: int, partitions: list[int] | None = None) -> list[int]:
    """Returns each utterance's shard for sizes in layout order, computed partition by partition as
    Spark does (`partitions`: lengths of the partitions; one partition if None)."""
    arr = np.asarray(sizes, np.int64)
    bounds = np.cumsum([0, *(partitions or [len(arr)])])
    parts = [arr[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    totals = [dict(partition_totals(p, shard_bytes), last_size=int(p[-1]) if len(p) else 0) for p in parts]
    byte_starts, _, unused, _ = layout_offsets(totals, shard_bytes)
    return [int(s) for p, b in zip(parts, byte_starts) for s in shard_numbers(p, b, shard_bytes, unused)]


# ---- write

class ChecksummingSink:
    """A write-only file object that forwards to a pyarrow stream and keeps a CRC32 of all bytes."""

    def __init__(self, stream):
        self.stream, self.crc, self.size, self.closed = stream, 0, 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.stream.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
            self.closed = True

    def writable(self) -> bool:
        return True


def write_shards(rows: Iterable[dict], *, dataset_uri: str, fmt: str, row_group_bytes: int) -> Iterator[dict]:
    """Writes every shard whose rows come in `rows` (sorted by shard, then layout order); yields their summaries."""
    for shard, group in itertools.groupby(rows, key=lambda r: r[F.SHARD]):
        yield write_shard(shard, group, dataset_uri=dataset_uri, fmt=fmt, row_group_bytes=row_group_bytes)


def write_shard(shard: int, rows: Iterable[dict], *, dataset_uri: str, fmt: str, row_group_bytes: int) -> dict:
    """Writes one shard, its index part and its quarantine part; returns the shard's summary.

    Each row's audio is read again and checked against the probe's checksum; a
    file that changed or vanished since is quarantined, not written. The summary
    holds the shard's facts for dataset.json and its share of the statistics.
    """
    rel_path = F.shard_path(shard, fmt)
    fs, root = open_filesystem(dataset_uri)
    path = posixpath.join(root, rel_path)
    written, failed, locations = [], [], []
    sink = ChecksummingSink(fs.open_output_stream(path))
    if fmt == "parquet":
        writer = pq.ParquetWriter(sink, F.SHARD_SCHEMA, compression=F.PARQUET_COMPRESSION,
                                  use_dictionary=[F.CODEC, F.SPEAKER],
                                  write_statistics=[f.name for f in F.SHARD_SCHEMA if f.name != F.AUDIO])
        pending, pending_bytes, row_group = [], 0, 0
    else:
        seq = SequenceFileWriter(sink, name=rel_path)
    try:
        for row in rows:
            try:
                data = read_audio(row[URI])
            except FileNotFoundError as e:
                failed.append({F.SOURCE: row[URI], F.REASON: f"audio vanished during packing: {first_line(e)}"})
                continue
            if zlib.crc32(data) != row[F.CHECKSUM] or len(data) != row[F.NUM_BYTES]:
                failed.append({F.SOURCE: row[URI], F.REASON: "audio changed between probing and packing"})
                continue
            written.append(row)
            if fmt == "parquet":
                pending.append(dict({f.name: row[f.name] for f in F.SHARD_SCHEMA if f.name != F.AUDIO},
                                    **{F.AUDIO: data}))
                locations.append(row_group)
                pending_bytes += len(data)
                if pending_bytes >= row_group_bytes:
                    writer.write_table(pa.Table.from_pylist(pending, F.SHARD_SCHEMA), row_group_size=len(pending))
                    pending, pending_bytes, row_group = [], 0, row_group + 1
            else:
                locations.append(seq.append(row[F.KEY], data))
        if fmt == "parquet":
            if pending:
                writer.write_table(pa.Table.from_pylist(pending, F.SHARD_SCHEMA), row_group_size=len(pending))
            writer.close()
    except BaseException:
        if fmt == "parquet":  # closed now, into the open stream: left open, it writes its footer when collected
            with contextlib.suppress(Exception):
                writer.close()
        raise
    finally:
        sink.close()
    pq.write_table(index_part(shard, written, locations, fmt), posixpath.join(root, F.index_part_path(shard)),
                   filesystem=fs, write_page_checksum=True)
    # Written or removed: a part left by a failed attempt of this task would be counted with this one's.
    quarantine_part = join_uri(dataset_uri, QUARANTINE_PARTS, f"write-{shard:05d}.jsonl")
    if failed:
        write_quarantine(quarantine_part, failed)
    else:
        remove_if_present(quarantine_part)
    durations = np.array([r[F.DURATION_S] for r in written], np.float64)
    return {
        F.SHARD: shard, "path": rel_path, "rows": len(written), "bytes": sink.size,
        "checksum": f"{F.CHECKSUM_ALGORITHM}:{sink.crc:08x}",
        "min_duration_s": float(durations.min()) if len(durations) else 0.0,
        "max_duration_s": float(durations.max()) if len(durations) else 0.0,
        "audio_seconds": float(durations.sum()), "histogram": histogram_counts(durations).tolist(),
        "vocabulary": "".join(sorted(set("".join(r[F.TRANSCRIPT] for r in written)))), "failed": len(failed),
    }


def remove_if_present(uri: str) -> None:
    """Deletes the file at `uri` if there is one."""
    fs, path = open_filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def index_part(shard: int, written: list[dict], locations: list[int], fmt: str) -> pa.Table:
    """Returns one shard's index part: a row per written utterance, in row order."""
    columns = {f.name: [r.get(f.name) for r in written] for f in F.INDEX_SCHEMA}
    columns[F.SOURCE] = [r[URI] for r in written]
    columns[F.SHARD] = [shard] * len(written)
    columns[F.ROW] = list(range(len(written)))
    columns[F.ROW_GROUP] = locations if fmt == "parquet" else [-1] * len(written)
    columns[F.OFFSET] = locations if fmt != "parquet" else [-1] * len(written)
    return pa.Table.from_pydict(columns, F.INDEX_SCHEMA)


def write_quarantine(uri: str, rejects: Iterable[dict]) -> int:
    """Writes {"source", "reason"} lines to `uri`; returns how many."""
    fs, path = open_filesystem(uri)
    count = 0
    with fs.open_output_stream(path) as f:
        for r in rejects:
            f.write((json.dumps({F.SOURCE: r[F.SOURCE], F.REASON: r[F.REASON]}, ensure_ascii=False) + "\n")
                    .encode("utf-8"))
            count += 1
    return count


# ---- consolidate (one task each) and summarize (the driver, O(shards))

def concat_index(dataset_uri: str, shards: int, rows_per_group: int = 1 << 18) -> int:
    """Writes index.parquet from the shards' index parts, in shard order; returns its rows.

    Runs as one task, holding at most a row group: readers open one file, not one per shard.
    """
    fs, root = open_filesystem(dataset_uri)
    count, pending, pending_rows = 0, [], 0
    with fs.open_output_stream(posixpath.join(root, F.INDEX)) as sink:
        writer = pq.ParquetWriter(sink, F.INDEX_SCHEMA, write_page_checksum=True)
        for shard in range(shards):
            part = pq.read_table(posixpath.join(root, F.index_part_path(shard)), filesystem=fs)
            pending.append(part)
            pending_rows += part.num_rows
            if pending_rows >= rows_per_group:
                writer.write_table(pa.concat_tables(pending), row_group_size=pending_rows)
                count, pending, pending_rows = count + pending_rows, [], 0
        if pending_rows or not count:
            writer.write_table(pa.concat_tables(pending) if pending else F.INDEX_SCHEMA.empty_table())
            count += pending_rows
        writer.close()
    return count


def concat_quarantine(dataset_uri: str) -> int:
    """Writes quarantine.jsonl from the quarantine parts in name order; returns its lines."""
    fs, root = open_filesystem(dataset_uri)
    parts = posixpath.join(root, QUARANTINE_PARTS)
    names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(parts, allow_not_found=True))
                   if i.type == pafs.FileType.File)
    count = 0
    with fs.open_output_stream(posixpath.join(root, F.QUARANTINE)) as out:
        for name in names:
            with fs.open_input_stream(name) as f:
                while block := f.read(1 << 22):
                    count += block.count(b"\n")
                    out.write(block)
    return count


def histogram_counts(durations: np.ndarray, bin_s: float = HISTOGRAM_BIN_S) -> np.ndarray:
    """Returns utterance counts per duration bin [i * bin_s, (i + 1) * bin_s), up to the longest."""
    if not len(durations):
        return np.zeros(0, np.int64)
    return np.bincount(np.floor(np.asarray(durations) / bin_s).astype(np.int64))


def add_counts(a: np.ndarray, b: Iterable[int]) -> np.ndarray:
    b = np.asarray(list(b), np.int64)
    out = np.zeros(max(len(a), len(b)), np.int64)
    out[:len(a)] += a
    out[:len(b)] += b
    return out


def duration_histogram_from_counts(counts: np.ndarray, bin_s: float = HISTOGRAM_BIN_S) -> dict:
    """Returns {"bin_s", "edges_s", "counts"} for per-bin counts (at least one bin)."""
    counts = counts if len(counts) else np.zeros(1, np.int64)
    return {"bin_s": bin_s, "edges_s": [round(i * bin_s, 6) for i in range(len(counts) + 1)],
            "counts": [int(c) for c in counts]}


def duration_histogram(durations: list[float], bin_s: float = HISTOGRAM_BIN_S) -> dict:
    """Returns {"bin_s", "edges_s", "counts"}: counts of utterances per `bin_s`-wide duration bin."""
    return duration_histogram_from_counts(histogram_counts(np.asarray(durations, np.float64), bin_s), bin_s)


def merge_summaries(summaries: list[dict]) -> dict:
    """Returns the dataset's totals from its shards' summaries (O(shards) memory)."""
    summaries = sorted(summaries, key=lambda s: s[F.SHARD])
    if [s[F.SHARD] for s in summaries] != list(range(len(summaries))):
        raise RuntimeError("pack: the write stage did not report every shard once")  # a bug, not a user error
    counts = np.zeros(0, np.int64)
    for s in summaries:
        counts = add_counts(counts, s["histogram"])
    return {
        "shards": [{k: s[k] for k in ("path", "rows", "bytes", "min_duration_s", "max_duration_s", "checksum")}
                   for s in summaries],
        "utterances": sum(s["rows"] for s in summaries),
        "hours": sum(s["audio_seconds"] for s in summaries) / 3600.0,
        "vocabulary": sorted(set("".join(s["vocabulary"] for s in summaries))),
        "duration_histogram": duration_histogram_from_counts(counts),
        "failed": sum(s["failed"] for s in summaries),
    }


def build_manifest(*, fmt: str, totals: dict, quarantined: int, feature_config: FeatureConfig,
                   moments: FeatureMoments, stats_utterances: int, exact_stats: bool, command: list[str],
                   config: dict, timing_s: dict) -> dict:
    """Returns dataset.json's content; `timing_s` is how long the job's phases took (JVM start excluded)."""
    mean, std = moments.mean_std()
    return {
        "format_name": F.FORMAT_NAME,
        "format_version": F.FORMAT_VERSION,
        "format": fmt,
        "utterances": totals["utterances"],
        "hours": totals["hours"],
        "quarantined": quarantined,
        "checksum_algorithm": F.CHECKSUM_ALGORITHM,
        "shards": totals["shards"],
        "vocabulary": totals["vocabulary"],
        "stats": {
            "duration_histogram": totals["duration_histogram"],
            "features": {
                "config": asdict(feature_config),
                "utterances": stats_utterances,
                "frames": moments.frames,
                "exact": exact_stats,
                "mean": [float(x) for x in mean],
                "std": [float(x) for x in std],
            },
        },
        "command": command,
        "config": config,
        "timing_s": timing_s,
    }
