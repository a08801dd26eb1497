"""Cache extracted features beside a packed dataset, so later epochs do not decode audio again.

    spark-submit spark_jobs/cache_features.py --dataset URI [--feature log_mel|log_spectrogram] [--overwrite]

Writes DATASET/features-<digest>/part-NNNNN.parquet (digest: a hash of the
feature config), row i holding the key, transcript and features of row i of audio shard NNNNN,
one row group per reader chunk, then cache.json last. ShardDataset uses the cache
when its feature config hashes the same, and decodes audio otherwise.
Exit codes: 0 done, 2 a user error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import uuid
import zlib
from dataclasses import asdict
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pyarrow import fs as pafs  # noqa: E402

from hdfs_io.format import dataset_format as F  # noqa: E402
from hdfs_io.format.dataset import open_dataset  # noqa: E402
from hdfs_io.fs.filesystem import (FilesystemUnavailable, captured_stderr, hdfs_user, join_uri,  # noqa: E402
                                   probe_uri)
from hdfs_io.speech.features import FeatureConfig, features_from_bytes  # noqa: E402


def write_feature_shard(shard: int, *, dataset_uri: str, cache_rel: str, feature_config: dict) -> dict:
    """Spark task: computes and writes the features of one audio shard; returns {path, rows, bytes}."""
    cfg = FeatureConfig(**feature_config)
    ds = open_dataset(dataset_uri)
    part = ds.index_part(shard, [F.ROW, F.ROW_GROUP, F.OFFSET, F.TRANSCRIPT])  # this shard's rows only
    rows = part.column(F.ROW).to_numpy()
    chunks = F.chunk_ids(ds.manifest["format"], part.column(F.ROW_GROUP).to_numpy(), part.column(F.OFFSET).to_numpy())
    transcripts = part.column(F.TRANSCRIPT).to_pylist()
    rel = posixpath.join(cache_rel, posixpath.basename(ds.manifest["shards"][shard]["path"]).rsplit(".", 1)[0]
                         + ".parquet")
    fs, path = ds.fs, posixpath.join(ds.path, rel)
    with fs.open_output_stream(path) as sink:
        writer = pq.ParquetWriter(sink, F.FEATURE_SCHEMA, compression="zstd")
        pending, current = [], None
        for (key, audio), chunk, transcript in zip(ds.shard_records(shard), chunks.tolist(), transcripts):
            if current is not None and chunk != current:
                writer.write_table(pa.Table.from_pylist(pending, F.FEATURE_SCHEMA), row_group_size=len(pending))
                pending = []
            current = chunk
            feats = features_from_bytes(audio, cfg).astype("<f2").tobytes()
            pending.append({F.KEY: key, F.TRANSCRIPT: transcript, F.FRAMES: len(feats) // (2 * cfg.num_bins),
                            F.FEATURES: feats, F.CHECKSUM: zlib.crc32(feats)})
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, F.FEATURE_SCHEMA), row_group_size=len(pending))
        writer.close()
    return {"path": rel.split("/", 1)[1], "rows": len(rows), "bytes": fs.get_file_info(path).size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cache_features.py", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="packed dataset URI")
    p.add_argument("--feature", choices=["log_mel", "log_spectrogram"], default="log_mel")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache for this config")
    p.add_argument("--master", default=None, help="Spark master when run without spark-submit")
    args = p.parse_args(argv)
    cfg = FeatureConfig(kind=args.feature)
    final_rel = F.feature_cache_dir(cfg.digest())
    try:
        probe_uri(args.dataset)
        ds = open_dataset(args.dataset)
        if ds.fs.get_file_info(posixpath.join(ds.path, final_rel)).type != pafs.FileType.NotFound and not args.overwrite:
            raise F.DatasetError(f"a feature cache for this config exists: {join_uri(args.dataset, final_rel)} "
                                 "(pass --overwrite to replace it)")
        tmp_rel = f".{final_rel}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with captured_stderr():  # libhdfs prints a Java trace for a refused write
                ds.fs.create_dir(posixpath.join(ds.path, tmp_rel))
        except PermissionError:
            raise PermissionError(f"permission denied: user {hdfs_user()} may not write a feature cache into "
                                  f"{args.dataset}") from None
    except (F.DatasetError, FilesystemUnavailable, PermissionError) as e:
        print(f"cache_features: error: {e}", file=sys.stderr)
        return 2
    from spark_jobs.pack import ship_code, spark_session

    spark = spark_session(args.master)
    try:
        ship_code(spark.sparkContext)
        shards = list(range(len(ds.manifest["shards"])))
        write = partial(write_feature_shard, dataset_uri=args.dataset, cache_rel=tmp_rel, feature_config=asdict(cfg))
        results = spark.sparkContext.parallelize(shards, max(len(shards), 1)).map(write).collect() if shards else []
        manifest = {"feature_config": asdict(cfg), "digest": cfg.digest(), "columns": F.FEATURE_SCHEMA.names,
                    "shards": results,
                    "utterances": sum(r["rows"] for r in results)}
        with ds.fs.open_output_stream(posixpath.join(ds.path, tmp_rel, F.FEATURE_CACHE_MANIFEST)) as f:
            f.write(json.dumps(manifest, indent=1).encode())
        final = posixpath.join(ds.path, final_rel)
        if ds.fs.get_file_info(final).type != pafs.FileType.NotFound:
            ds.fs.delete_dir(final)
        ds.fs.move(posixpath.join(ds.path, tmp_rel), final)
    except BaseException:
        ds.fs.delete_dir(posixpath.join(ds.path, tmp_rel))
        raise
    finally:
        spark.stop()
    print(f"cache_features: {manifest['utterances']} utterances in {len(results)} shards -> "
          f"{join_uri(args.dataset, final_rel)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
