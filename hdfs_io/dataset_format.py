"""The packed dataset format, defined once: file names, schemas, the manifest and its validation.

A dataset folder holds:
    shards/part-NNNNN.parquet | shards/part-NNNNN.seq   the audio, original encoded bytes
    index.parquet        one row per packed utterance: key -> (shard, row, duration, ...)
    quarantine.jsonl     one JSON object per rejected input: {"source", "reason"}
    dataset.json         written last; its presence means the dataset is complete
    features-<digest>/   optional feature cache (spark_jobs/cache_features.py), cache.json written last

Writers (spark_jobs) and readers (hdfs_io) import the names and schemas from here.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

FORMAT_NAME = "speechpack"
FORMAT_VERSION = 1
MANIFEST = "dataset.json"
INDEX = "index.parquet"
QUARANTINE = "quarantine.jsonl"
SHARD_DIR = "shards"
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
# part-NNNNN holding the features of row i of the audio shard, one row group per reader chunk; cache.json last.
FEATURE_CACHE_PREFIX = "features-"
FEATURE_CACHE_MANIFEST = "cache.json"
FEATURES = "features"  # float16 little-endian, frames x bins, un-normalized
FRAMES = "frames"
FEATURE_SCHEMA = pa.schema([pa.field(KEY, pa.string()), pa.field(FRAMES, pa.int32()),
                            pa.field(FEATURES, pa.binary()), pa.field(CHECKSUM, pa.int64())])


SEQ_CHUNK_BYTES = 16 * 2**20  # readers fetch SequenceFile shards in byte ranges of about this size


def chunk_ids(fmt: str, row_groups, offsets):
    """Returns each utterance's read unit within its shard: the Parquet row group, or offset // 16 MB."""
    return row_groups.astype("int64") if fmt == "parquet" else (offsets // SEQ_CHUNK_BYTES).astype("int64")


def feature_cache_dir(digest: str) -> str:
    """Returns the feature cache folder for a feature config digest, relative to the dataset folder."""
    return f"{FEATURE_CACHE_PREFIX}{digest}"


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or malformed; the message says which part."""


def shard_path(shard: int, fmt: str) -> str:
    """Returns the shard's path relative to the dataset folder."""
    return f"{SHARD_DIR}/part-{shard:05d}.{FORMATS[fmt]}"


def validate_manifest(manifest: Any) -> dict:
    """Returns `manifest` if it is a complete dataset.json of this format version.

    Raises:
        DatasetError: naming the first missing or malformed field.
    """
    if not isinstance(manifest, dict):
        raise DatasetError("dataset.json is not a JSON object")
    if manifest.get("format_name") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"dataset.json is not {FORMAT_NAME} format version {FORMAT_VERSION}")
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
    if sum(s["rows"] for s in manifest["shards"]) != manifest["utterances"]:
        raise DatasetError("dataset.json: shard rows do not add up to 'utterances'")
    return manifest


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
