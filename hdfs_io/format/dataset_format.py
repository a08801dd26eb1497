"""The packed dataset format, defined once: file names, schemas, the manifest and its validation.

A dataset folder holds:
    shards/part-NNNNN.parquet | shards/part-NNNNN.seq   the audio, original encoded bytes
    index.parquet        one row per packed utterance: key -> (shard, row, duration, ...), in (shard, row) order
    index/part-NNNNN.parquet  the same rows, one file per shard (format version 2 on)
    quarantine.jsonl     one JSON object per rejected input: {"source", "reason"}
    dataset.json         written last; its presence means the dataset is complete
    features-<digest>/   optional feature cache (spark_jobs/cache_features.py), cache.json written last

Writers (spark_jobs) and readers (hdfs_io) import the names and schemas from here.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs

FORMAT_NAME = "speechpack"
FORMAT_VERSION = 2  # 2 added index/part-NNNNN.parquet; version 1 datasets are still read
READABLE_VERSIONS = (1, 2)
MANIFEST = "dataset.json"
INDEX = "index.parquet"
QUARANTINE = "quarantine.jsonl"
SHARD_DIR = "shards"
INDEX_DIR = "index"
FORMATS = {"parquet": "parquet", "sequencefile": "seq"}  # --format -> shard file extension
CHECKSUM_ALGORITHM = "crc32"  # zlib.crc32 of the audio bytes, stored as int64

# Column names. Nothing else spells them as string literals.
KEY = "key"
AUDIO = "audio"
CODEC = "codec"
SAMPLE_RATE = "sample_rate"
CHANNELS = "channels"
NUM_SAMPLES = "num_samples"
DURATION_S = "duration_s"
TRANSCRIPT = "transcript"
SPEAKER = "speaker"
CHECKSUM = "checksum"
SHARD = "shard"
ROW = "row"
ROW_GROUP = "row_group"
OFFSET = "offset"
NUM_BYTES = "num_bytes"
SOURCE = "source"
REASON = "reason"

# Per-utterance metadata, shared by the shard and the index.
_META_FIELDS = [
    pa.field(CODEC, pa.string()),
    pa.field(SAMPLE_RATE, pa.int32()),
    pa.field(CHANNELS, pa.int16()),
    pa.field(NUM_SAMPLES, pa.int64()),
    pa.field(DURATION_S, pa.float64()),
    pa.field(TRANSCRIPT, pa.string()),
    pa.field(SPEAKER, pa.string()),
    pa.field(CHECKSUM, pa.int64()),
]

SHARD_SCHEMA = pa.schema([pa.field(KEY, pa.string()), pa.field(AUDIO, pa.binary()), *_META_FIELDS])

INDEX_SCHEMA = pa.schema([
    pa.field(KEY, pa.string()),
    pa.field(SHARD, pa.int32()),
    pa.field(ROW, pa.int64()),
    pa.field(ROW_GROUP, pa.int32()),  # Parquet shards: the row group holding the row; else -1
    pa.field(OFFSET, pa.int64()),  # SequenceFile shards: byte offset of the record; else -1
    pa.field(NUM_BYTES, pa.int64()),
    *_META_FIELDS,
    pa.field(SOURCE, pa.string()),  # where the audio came from, for audits
])

# Parquet: the audio column is stored uncompressed (FLAC does not compress
# further and it would cost CPU on every read); the small columns use zstd.
PARQUET_COMPRESSION = {f.name: ("NONE" if f.name == AUDIO else "ZSTD") for f in SHARD_SCHEMA}

# SequenceFile shards: key Text = utterance key, value BytesWritable = audio bytes.
SEQ_KEY_CLASS = "org.apache.hadoop.io.Text"
SEQ_VALUE_CLASS = "org.apache.hadoop.io.BytesWritable"


# Feature cache: features-<FeatureConfig.digest()>/part-NNNNN.parquet beside the audio shards, row i of
# part-NNNNN holding the key, transcript and features of row i of the audio shard, one row group per reader chunk; cache.json last.
FEATURE_CACHE_PREFIX = "features-"
FEATURE_CACHE_MANIFEST = "cache.json"
FEATURES = "features"  # float16 little-endian, frames x bins, un-normalized
FRAMES = "frames"
FEATURE_SCHEMA = pa.schema([pa.field(KEY, pa.string()), pa.field(TRANSCRIPT, pa.string()),
                            pa.field(FRAMES, pa.int32()), pa.field(FEATURES, pa.binary()),
                            pa.field(CHECKSUM, pa.int64())])


SEQ_CHUNK_BYTES = 16 * 2**20  # readers fetch SequenceFile shards in byte ranges of about this size


def chunk_ids(fmt: str, row_groups, offsets):
    """Returns each utterance's read unit within its shard: the Parquet row group, or offset // 16 MB."""
    return row_groups.astype("int64") if fmt == "parquet" else (offsets // SEQ_CHUNK_BYTES).astype("int64")


def feature_cache_dir(digest: str) -> str:
    """Returns the feature cache folder for a feature config digest, relative to the dataset folder."""
    return f"{FEATURE_CACHE_PREFIX}{digest}"


# Feature statistics for a feature config other than the one dataset.json holds them for: computed by
# the first reader that needs them from a seeded sample, stored here, read by every later one.
FEATURE_STATS_PREFIX = "feature-stats-"


def feature_stats_file(digest: str) -> str:
    """Returns the statistics file for a feature config digest, relative to the dataset folder."""
    return f"{FEATURE_STATS_PREFIX}{digest}.json"


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or malformed; the message says which part."""


class CorruptRecord(RuntimeError):
    """A record failed its checksum or could not be decoded; the message names shard and row."""


class StorageUnavailable(RuntimeError):
    """A shard could not be read within the retry budget; the message names the filesystem and shard."""


def staging_name(name: str, token: str) -> str:
    """Returns the hidden name beside `name` under which pack writes a dataset before renaming it into place."""
    return f".{name}.pack-{token}"


def replaced_name(staging: str) -> str:
    """Returns where `pack --overwrite` keeps the dataset it replaces while the staged one is renamed in."""
    return f"{staging}.old"


def replaced_leftovers(fs, path: str) -> list[str]:
    """Returns the datasets that an interrupted `pack --overwrite` left beside `path`, newest first.

    A driver that dies between the swap's two renames leaves the old dataset at
    `replaced_name(...)` and nothing at `path`. Lists the parent folder once.
    """
    parent, name = posixpath.split(path.rstrip("/"))
    prefix, suffix = staging_name(name, ""), replaced_name("")
    found = [i for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
             if i.base_name.startswith(prefix) and i.base_name.endswith(suffix)
             and fs.get_file_info(posixpath.join(i.path, MANIFEST)).type == pafs.FileType.File]
    return [i.path for i in sorted(found, key=lambda i: i.mtime_ns or 0, reverse=True)]


def shard_path(shard: int, fmt: str) -> str:
    """Returns the shard's path relative to the dataset folder."""
    return f"{SHARD_DIR}/part-{shard:05d}.{FORMATS[fmt]}"


def index_part_path(shard: int) -> str:
    """Returns the path of a shard's index part relative to the dataset folder (format version 2 on)."""
    return f"{INDEX_DIR}/part-{shard:05d}.parquet"


def validate_manifest(manifest: Any) -> dict:
    """Returns `manifest` if it is a complete dataset.json of this format version.

    Raises:
        DatasetError: naming the first missing or malformed field.
    """
    if not isinstance(manifest, dict):
        raise DatasetError("dataset.json is not a JSON object")
    if manifest.get("format_name") != FORMAT_NAME or manifest.get("format_version") not in READABLE_VERSIONS:
        raise DatasetError(f"dataset.json is not {FORMAT_NAME} format version "
                           f"{' or '.join(map(str, READABLE_VERSIONS))}")
    required = {"format": str, "utterances": int, "hours": (int, float), "quarantined": int,
                "shards": list, "vocabulary": list, "stats": dict}
    for name, kind in required.items():
        if not isinstance(manifest.get(name), kind):
            raise DatasetError(f"dataset.json: field {name!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    if manifest["format"] not in FORMATS:
        raise DatasetError(f"dataset.json: unknown shard format {manifest['format']!r}")
    for i, shard in enumerate(manifest["shards"]):
        for name in ("path", "rows", "bytes", "min_duration_s", "max_duration_s", "checksum"):
            if not isinstance(shard, dict) or name not in shard:
                raise DatasetError(f"dataset.json: shard {i} has no {name!r}")
        # the reader opens these paths: they may not point anywhere but this dataset's own shards
        if shard["path"] != shard_path(i, manifest["format"]):
            raise DatasetError(f"dataset.json: shard {i} path is {shard['path']!r}, "
                               f"not {shard_path(i, manifest['format'])!r}")
        if not isinstance(shard["rows"], int) or shard["rows"] < 0:
            raise DatasetError(f"dataset.json: shard {i} has a bad 'rows'")
    if sum(s["rows"] for s in manifest["shards"]) != manifest["utterances"]:
        raise DatasetError("dataset.json: shard rows do not add up to 'utterances'")
    features = manifest["stats"].get("features")
    if not (isinstance(features, dict) and isinstance(features.get("config"), dict)
            and _numbers(features.get("mean")) and _numbers(features.get("std"))
            and len(features["mean"]) == len(features["std"])):
        raise DatasetError("dataset.json: 'stats.features' needs a 'config' object and 'mean' and 'std' "
                           "lists of numbers of equal length")
    histogram = manifest["stats"].get("duration_histogram")
    if not (isinstance(histogram, dict) and _numbers(histogram.get("edges_s")) and _numbers(histogram.get("counts"))):
        raise DatasetError("dataset.json: 'stats.duration_histogram' needs 'edges_s' and 'counts' lists")
    return manifest


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def validate_index(index: pa.Table, manifest: dict) -> pa.Table:
    """Returns `index` (all of INDEX_SCHEMA's columns, or some) if it agrees with its manifest.

    Raises:
        DatasetError: a column has the wrong type, the row count differs from the
            manifest's, or a shard, row, size or duration is out of range.
    """
    for name in index.column_names:
        if name in INDEX_SCHEMA.names and index.schema.field(name).type != INDEX_SCHEMA.field(name).type:
            raise DatasetError(f"index.parquet: column {name!r} is {index.schema.field(name).type}, "
                               f"not {INDEX_SCHEMA.field(name).type}")
    missing = [n for n in (KEY, SHARD, ROW, DURATION_S) if n not in index.column_names]
    if index.num_columns == len(INDEX_SCHEMA) and missing:
        raise DatasetError(f"index.parquet: missing columns {missing}")
    if index.num_rows != manifest["utterances"]:
        raise DatasetError(f"index.parquet has {index.num_rows} rows, dataset.json says {manifest['utterances']}")
    shard_rows = np.array([s["rows"] for s in manifest["shards"]], np.int64)
    checks = {
        SHARD: lambda c: (c >= 0) & (c < len(shard_rows)),
        DURATION_S: lambda c: np.isfinite(c) & (c > 0),
        NUM_BYTES: lambda c: c > 0,
    }
    for name, ok in checks.items():
        if name in index.column_names:
            column = index.column(name).to_numpy(zero_copy_only=False)
            if index.column(name).null_count or not ok(column).all():
                raise DatasetError(f"index.parquet: column {name!r} holds values out of range")
    if SHARD in index.column_names and ROW in index.column_names:
        shards = index.column(SHARD).to_numpy(zero_copy_only=False)
        rows = index.column(ROW).to_numpy(zero_copy_only=False)
        if index.column(ROW).null_count or not ((rows >= 0) & (rows < shard_rows[shards])).all():
            raise DatasetError("index.parquet: column 'row' points past the end of its shard")
    if KEY in index.column_names and (index.column(KEY).null_count
                                      or pa.compute.count_distinct(index.column(KEY)).as_py() != index.num_rows):
        raise DatasetError("index.parquet: keys are missing or not unique")
    return index


def parse_manifest(text: str | bytes) -> dict:
    """Returns the validated manifest parsed from dataset.json's text.

    Raises:
        DatasetError: the text is not JSON or not a valid manifest.
    """
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"dataset.json is not valid JSON: {e}") from None
    return validate_manifest(manifest)
