"""Packing logic: probe audio, plan byte-sized shards, write shards, assemble index and manifest.

The functions here take plain lists, dicts and pyarrow tables, so they run in
tests without a JVM; spark_jobs/pack.py distributes `probe_partition` and
`write_shard` as Spark tasks (both are top-level and picklable).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from hdfs_io import dataset_format as F
from hdfs_io.audio import BadAudio, probe
from hdfs_io.features import FeatureConfig, FeatureMoments, features_from_bytes
from hdfs_io.filesystem import first_line, join_uri, open_filesystem
from hdfs_io.sequencefile import SequenceFileWriter

HISTOGRAM_BIN_S = 1.0


def read_audio(uri: str) -> bytes:
    """Returns the bytes of the file at `uri` (any filesystem open_filesystem knows).

    Raises:
        FileNotFoundError: no such file (checked first: libhdfs prints a Java trace
            for every failed open, but not for a failed stat).
    """
    fs, path = open_filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(path)
    with fs.open_input_file(path) as f:
        return f.read()


def probe_one(candidate: dict, feature_config: dict | None = None) -> dict:
    """Returns the candidate with its audio probed: size, checksum, codec, rate, length, or `error`.

    A candidate marked `in_stats_sample` also gets `moments`: the per-bin sums of
    its features under `feature_config`, for the dataset statistics.
    """
    out = dict(candidate, error=None, moments=None)
    try:
        data = read_audio(candidate["uri"])
    except FileNotFoundError:
        out["error"] = "transcript line with no audio: file not found"
        return out
    except OSError as e:
        out["error"] = f"cannot read audio: {first_line(e)}"
        return out
    try:
        info = probe(data)
        if candidate.get("in_stats_sample") and feature_config is not None:
            cfg = FeatureConfig(**feature_config)
            moments = FeatureMoments.empty(cfg.num_bins)
            moments.add(features_from_bytes(data, cfg))
            out["moments"] = (moments.frames, moments.total.tolist(), moments.total_sq.tolist())
    except BadAudio as e:
        out["error"] = str(e)
        return out
    out.update({F.NUM_BYTES: len(data), F.CHECKSUM: zlib.crc32(data), F.CODEC: info.codec,
                F.SAMPLE_RATE: info.sample_rate, F.CHANNELS: info.channels,
                F.NUM_SAMPLES: info.num_samples, F.DURATION_S: info.duration_s})
    return out


def probe_partition(candidates: Iterable[dict], feature_config: dict | None = None) -> Iterator[dict]:
    """Spark task: probes each candidate of a partition."""
    for candidate in candidates:
        yield probe_one(candidate, feature_config)


def choose_stats_sample(count: int, sample: int | None, seed: int) -> set[int]:
    """Returns the positions of `sample` candidates picked at random (all of them if None)."""
    if sample is None or sample >= count:
        return set(range(count))
    return set(np.random.default_rng(seed + 1).choice(count, sample, replace=False).tolist())


def plan_shards(probed: list[dict], layout: str, shard_bytes: int, seed: int) -> list[list[dict]]:
    """Returns the utterances grouped into shards, each in row order, ready for `write_shard`.

    `duration` layout sorts by (duration, key) and cuts runs of about `shard_bytes`,
    so shard i holds shorter utterances than shard i+1 and each shard is sorted.
    `shuffled` cuts the same way through a seeded random permutation.
    """
    if layout == "duration":
        ordered = sorted(probed, key=lambda r: (r[F.DURATION_S], r[F.KEY]))
    elif layout == "shuffled":
        by_key = sorted(probed, key=lambda r: r[F.KEY])
        ordered = [by_key[i] for i in np.random.default_rng(seed).permutation(len(by_key))]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    sizes = np.array([r[F.NUM_BYTES] for r in ordered], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    shard_of = starts // max(shard_bytes, 1)
    shards: list[list[dict]] = []
    previous = None
    for row, shard in zip(ordered, shard_of.tolist()):
        if shard != previous:
            shards.append([])
            previous = shard
        shards[-1].append({k: v for k, v in row.items() if k != "moments"})
    return shards


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


def write_shard(job: tuple[int, list[dict]], *, dataset_uri: str, fmt: str, row_group_bytes: int) -> dict:
    """Spark task: writes one shard from its planned rows and returns what was written.

    Each row's audio is read again and checked against the probe's checksum; a
    file that changed or vanished since is reported in `failed`, not written.
    Returns shard facts: path, rows, bytes, checksum, durations, and the row
    group (Parquet) or byte offset (SequenceFile) of each written key.
    """
    shard, rows = job
    rel_path = F.shard_path(shard, fmt)
    fs, path = open_filesystem(join_uri(dataset_uri, rel_path))
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
                data = read_audio(row["uri"])
            except OSError as e:
                failed.append({F.SOURCE: row["uri"], F.REASON: f"audio vanished during packing: {first_line(e)}"})
                continue
            if zlib.crc32(data) != row[F.CHECKSUM] or len(data) != row[F.NUM_BYTES]:
                failed.append({F.SOURCE: row["uri"], F.REASON: "audio changed between probing and packing"})
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
    finally:
        sink.close()
    durations = [r[F.DURATION_S] for r in written]
    return {
        "shard": shard, "path": rel_path, "rows": len(written), "bytes": sink.size,
        "checksum": f"{F.CHECKSUM_ALGORITHM}:{sink.crc:08x}",
        "min_duration_s": min(durations, default=0.0), "max_duration_s": max(durations, default=0.0),
        "audio_seconds": float(sum(durations)),
        "keys": [r[F.KEY] for r in written], "locations": locations, "failed": failed,
    }


def build_index(planned: list[list[dict]], results: list[dict], fmt: str) -> pa.Table:
    """Returns index.parquet's table: one row per written utterance, in (shard, row) order."""
    by_key = {row[F.KEY]: row for rows in planned for row in rows}
    columns: dict[str, list] = {f.name: [] for f in F.INDEX_SCHEMA}
    for result in sorted(results, key=lambda r: r["shard"]):
        for row_number, (key, location) in enumerate(zip(result["keys"], result["locations"])):
            row = by_key[key]
            for name in columns:
                columns[name].append(row.get(name))
            columns[F.SOURCE][-1] = row["uri"]
            columns[F.SHARD][-1] = result["shard"]
            columns[F.ROW][-1] = row_number
            columns[F.ROW_GROUP][-1] = location if fmt == "parquet" else -1
            columns[F.OFFSET][-1] = location if fmt != "parquet" else -1
    return pa.Table.from_pydict(columns, F.INDEX_SCHEMA)


def duration_histogram(durations: list[float], bin_s: float = HISTOGRAM_BIN_S) -> dict:
    """Returns {"bin_s", "edges_s", "counts"}: counts of utterances per `bin_s`-wide duration bin."""
    top = max(durations, default=0.0)
    n_bins = max(1, math.ceil(top / bin_s + 1e-9)) if top else 1
    edges = [round(i * bin_s, 6) for i in range(n_bins + 1)]
    counts, _ = np.histogram(durations, bins=edges) if durations else (np.zeros(n_bins, int), None)
    return {"bin_s": bin_s, "edges_s": edges, "counts": [int(c) for c in counts]}


def merge_moments(probed: list[dict], num_bins: int) -> tuple[FeatureMoments, int]:
    """Returns the summed feature moments of the probed utterances that carry them, and their count."""
    total, count = FeatureMoments.empty(num_bins), 0
    for r in probed:
        if r.get("moments"):
            frames, s, sq = r["moments"]
            total = total.merge(FeatureMoments(frames, np.asarray(s), np.asarray(sq)))
            count += 1
    return total, count


def build_manifest(*, fmt: str, index: pa.Table, results: list[dict], quarantined: int,
                   feature_config: FeatureConfig, moments: FeatureMoments, stats_utterances: int,
                   exact_stats: bool, command: list[str], config: dict, timing_s: dict) -> dict:
    """Returns dataset.json's content; `timing_s` is how long the job's phases took (JVM start excluded)."""
    durations = index.column(F.DURATION_S).to_pylist()
    transcripts = index.column(F.TRANSCRIPT).to_pylist()
    mean, std = moments.mean_std()
    shards = [{k: r[k] for k in ("path", "rows", "bytes", "min_duration_s", "max_duration_s", "checksum")}
              for r in sorted(results, key=lambda r: r["shard"])]
    return {
        "format_name": F.FORMAT_NAME,
        "format_version": F.FORMAT_VERSION,
        "format": fmt,
        "utterances": index.num_rows,
        "hours": sum(durations) / 3600.0,
        "quarantined": quarantined,
        "checksum_algorithm": F.CHECKSUM_ALGORITHM,
        "shards": shards,
        "vocabulary": sorted(set("".join(transcripts))),
        "stats": {
            "duration_histogram": duration_histogram(durations),
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


def quarantine_lines(rejects: list[dict]) -> bytes:
    """Returns quarantine.jsonl's bytes: one {"source", "reason"} object per line."""
    return "".join(json.dumps({F.SOURCE: r[F.SOURCE], F.REASON: r[F.REASON]}, ensure_ascii=False) + "\n"
                   for r in rejects).encode("utf-8")
