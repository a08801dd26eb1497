"""A rank opening a dataset reads three columns of its index, not the file, and holds no key, transcript or checksum.

The datasets here are written as pack writes their metadata (dataset.json, index.parquet in (shard, row)
order), with realistic keys, transcripts and sources, and no shard files: opening and planning never read them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.reader.planner import plan_durations
from hdfs_io.reader.rank_index import read_rank_index
from hdfs_io.speech.features import FeatureConfig
from scripts.devcluster import ROOT


def metadata_only_dataset(root: Path, fmt: str, utterances: int, shard_rows: int = 1000, seed: int = 0,
                          order=None) -> Path:
    """Writes dataset.json and index.parquet of a duration-layout dataset; returns `root`.

    `order` (a permutation of the index rows) writes the index in another order than (shard, row).
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(utterances)
    shards, rows = (ids // shard_rows).astype(np.int32), ids % shard_rows
    durations = np.sort(np.round(np.clip(rng.gamma(4.0, 3.0, utterances), 1.0, 35.0) * 16000) / 16000)
    lengths = rng.integers(60, 300, utterances)
    text = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", np.uint8)[rng.integers(0, 27, lengths.sum())].tobytes().decode()
    ends = np.cumsum(lengths)
    transcripts = [text[end - n:end] for n, end in zip(lengths.tolist(), ends.tolist())]
    keys = [f"{s:04d}-{c:06d}-{n:04d}" for s, c, n in zip(ids // 10**6, ids // 100 % 10**6, ids % 10**4)]
    num_bytes = (durations * 20000).astype(np.int64)
    parquet = fmt == "parquet"
    offsets = np.cumsum(num_bytes) - num_bytes  # per shard below
    offsets -= offsets[shards * shard_rows]
    columns = {
        F.KEY: keys, F.SHARD: shards, F.ROW: rows.astype(np.int64),
        F.ROW_GROUP: (rows // 64).astype(np.int32) if parquet else np.full(utterances, -1, np.int32),
        F.OFFSET: np.full(utterances, -1, np.int64) if parquet else offsets,
        F.NUM_BYTES: num_bytes, F.CODEC: ["flac"] * utterances, F.SAMPLE_RATE: np.full(utterances, 16000, np.int32),
        F.CHANNELS: np.ones(utterances, np.int16), F.NUM_SAMPLES: (durations * 16000).astype(np.int64),
        F.DURATION_S: durations, F.TRANSCRIPT: transcripts, F.SPEAKER: [k[:4] for k in keys],
        F.CHECKSUM: rng.integers(0, 2**32, utterances), F.SOURCE: [f"hdfs://nn:8020/corpora/{k}.flac" for k in keys],
    }
    index = pa.table(columns, schema=F.INDEX_SCHEMA)
    if order is not None:
        index = index.take(order)
    root.mkdir(parents=True)
    pq.write_table(index, root / F.INDEX, row_group_size=1 << 15, write_page_checksum=True)
    shard_count = int(shards[-1]) + 1
    counts = np.bincount(shards, minlength=shard_count)
    manifest = {
        "format_name": F.FORMAT_NAME, "format_version": F.FORMAT_VERSION, "format": fmt, "utterances": utterances,
        "hours": float(durations.sum() / 3600), "quarantined": 0,
        "shards": [{"path": F.shard_path(i, fmt), "rows": int(counts[i]), "bytes": 1, "min_duration_s": 1.0,
                    "max_duration_s": 35.0, "checksum": i} for i in range(shard_count)],
        "vocabulary": sorted(set("abcdefghijklmnopqrstuvwxyz ")),
        "stats": {"duration_histogram": {"edges_s": [0.0, 40.0], "counts": [utterances]},
                  "features": {"config": asdict(FeatureConfig()), "mean": [0.0], "std": [1.0]}},
    }
    (root / F.MANIFEST).write_text(json.dumps(manifest))
    return root


OPEN_AND_PLAN = """
import sys
from hdfs_io.reader.shard_reader import ShardDataset
def rchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
ShardDataset(sys.argv[2], rank=0, world_size=8).plan(0)  # what a first open imports and reads once
before = rchar()
ShardDataset(sys.argv[1], rank=0, world_size=8).plan(0)
print(rchar() - before)
"""


@pytest.mark.parametrize("fmt", ["parquet", "sequencefile"])
def test_a_rank_opening_a_dataset_reads_three_columns_of_its_index_and_not_the_file(tmp_path, fmt):
    utterances = 100_000
    root = metadata_only_dataset(tmp_path / "ds", fmt, utterances)
    tiny = metadata_only_dataset(tmp_path / "tiny", fmt, 100)
    index_bytes = (root / F.INDEX).stat().st_size
    manifest_bytes = (root / F.MANIFEST).stat().st_size

    run = subprocess.run([sys.executable, "-c", OPEN_AND_PLAN, f"file://{root}", f"file://{tiny}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)

    assert run.returncode == 0, run.stderr[-3000:]
    read = int(run.stdout.split()[-1])
    assert index_bytes > 60 * utterances  # keys, transcripts and sources: a rank that reads the file fails below
    footer = 64 * 2**10
    # issue 28's goal is 10; a SequenceFile rank also reads `offset` (its chunks), 8 bytes more at most
    budget = {"parquet": 10, "sequencefile": 18}[fmt]
    assert read - manifest_bytes - footer <= budget * utterances, f"{read} bytes, {read / utterances:.1f} an utterance"


@pytest.mark.parametrize("fmt", ["parquet", "sequencefile"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_a_rank_holds_each_utterances_planned_duration_shard_row_and_chunk_whatever_the_index_order(
        tmp_path, fmt, shuffled):
    utterances = 5000
    order = np.random.default_rng(1).permutation(utterances) if shuffled else None
    root = metadata_only_dataset(tmp_path / "ds", fmt, utterances, shard_rows=700, order=order)
    index = pq.read_table(root / F.INDEX)

    held = read_rank_index(open_dataset(str(root)))

    expected_chunks = F.chunk_ids(fmt, index.column(F.ROW_GROUP).to_numpy(), index.column(F.OFFSET).to_numpy())
    assert held.durations.tolist() == plan_durations(index.column(F.DURATION_S).to_numpy()).tolist()
    assert held.shards.tolist() == index.column(F.SHARD).to_pylist()
    assert held.rows.tolist() == index.column(F.ROW).to_pylist()
    assert held.chunks.tolist() == expected_chunks.tolist()
    assert {a.dtype.itemsize for a in (held.durations, held.shards, held.rows, held.chunks)} == {4}


@pytest.mark.parametrize("damage, message", [
    ("rows", "index.parquet has 4999 rows, dataset.json says 5000"),
    ("duration", "index.parquet: column 'duration_s' holds values out of range"),
    ("shard", "index.parquet: column 'shard' holds values out of range"),
    ("row", "index.parquet: column 'row' points past the end of its shard"),  # read when not in (shard, row) order
    ("type", "index.parquet: column 'duration_s' is float, not double"),
])
def test_an_index_that_disagrees_with_its_manifest_is_refused_in_one_line(tmp_path, damage, message):
    order = np.random.default_rng(2).permutation(5000) if damage == "row" else None
    root = metadata_only_dataset(tmp_path / "ds", "parquet", 5000, shard_rows=700, order=order)
    index = pq.read_table(root / F.INDEX)
    if damage == "rows":
        index = index.slice(1)
    elif damage == "type":
        index = index.set_column(index.schema.get_field_index(F.DURATION_S), F.DURATION_S,
                                 index.column(F.DURATION_S).cast(pa.float32()))
    else:
        column = {"duration": F.DURATION_S, "shard": F.SHARD, "row": F.ROW}[damage]
        values = index.column(column).to_numpy().copy()
        values[4000] = {"duration": np.nan, "shard": 99, "row": 700}[damage]
        index = index.set_column(index.schema.get_field_index(column), column, pa.array(values,
                                                                                      index.schema.field(column).type))
    pq.write_table(index, root / F.INDEX)

    with pytest.raises(F.DatasetError) as refused:
        read_rank_index(open_dataset(str(root)))

    assert str(refused.value) == message
