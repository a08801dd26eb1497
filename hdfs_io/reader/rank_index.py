"""What a rank holds of a dataset's index: each utterance's planned duration and where it is, and nothing else.

Every rank opens the index, and at 30M utterances index.parquet is 2.2 GB: 1.1 TB read when 512
ranks start. A rank reads three of its columns only, through a random-access file and one index
row group at a time: duration_s, shard, and the column that names the utterance's chunk
(row_group in Parquet shards, offset in SequenceFiles), 3 to 13 bytes an utterance. It holds 16
bytes an utterance (the row in its shard follows from the manifest's row counts, since the index is
in (shard, row) order). Keys, transcripts and checksums stay out: a worker reads them with the
chunk (hdfs_io.reader.chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import Dataset, parsed
from hdfs_io.reader.planner import plan_durations


@dataclass(frozen=True)
class RankIndex:
    """Per utterance (an index row): what the planner and the chunk reads need."""
    durations: np.ndarray  # float32, each rounded up (hdfs_io.reader.planner.plan_durations)
    shards: np.ndarray  # int32
    rows: np.ndarray  # int32: its row in its shard
    chunks: np.ndarray  # int32: its read unit in its shard (hdfs_io.format.dataset_format.chunk_ids)

    def __len__(self) -> int:
        return len(self.durations)


def read_rank_index(ds: Dataset) -> RankIndex:
    """Returns what a rank holds of `ds`'s index, reading only the column chunks of three columns.

    An index that is not in (shard, row) order (written before pack sorted it so) costs a
    fourth column, `row`.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: index.parquet is missing or unreadable, or disagrees
            with dataset.json (row count, a column's type, a value out of range).
        OSError: the filesystem did not serve it.
    """
    index = ds.index_file()
    name = f"{ds.uri}/{F.INDEX}"
    chunk_column = F.ROW_GROUP if ds.manifest["format"] == "parquet" else F.OFFSET
    columns = [F.DURATION_S, F.SHARD, chunk_column]
    for column in columns:
        _check_type(index, column)
    n = ds.manifest["utterances"]
    if index.metadata.num_rows != n:
        raise F.DatasetError(f"index.parquet has {index.metadata.num_rows} rows, dataset.json says {n}")
    shard_rows = np.array([s["rows"] for s in ds.manifest["shards"]], np.int64)
    starts = np.r_[0, np.cumsum(shard_rows)]  # the index row of each shard's first utterance
    durations, shards = np.empty(n, np.float32), np.empty(n, np.int32)
    rows, chunks = np.empty(n, np.int32), np.empty(n, np.int32)
    in_order, a = True, 0
    for g in range(index.metadata.num_row_groups):
        group = parsed(ds.fs, f"{ds.path}/{F.INDEX}", name, partial(index.read_row_group, g, columns=columns))
        b = a + group.num_rows
        if any(group.column(c).null_count for c in columns):
            raise F.DatasetError(f"index.parquet: a row of row group {g} has no {', '.join(columns)}")
        d, s, c = (group.column(column).to_numpy() for column in columns)
        if not (np.isfinite(d) & (d > 0)).all():
            raise F.DatasetError(f"index.parquet: column {F.DURATION_S!r} holds values out of range")
        if not ((s >= 0) & (s < len(shard_rows))).all():
            raise F.DatasetError(f"index.parquet: column {F.SHARD!r} holds values out of range")
        if (c < 0).any():
            raise F.DatasetError(f"index.parquet: column {chunk_column!r} holds values out of range")
        durations[a:b], shards[a:b] = plan_durations(d), s
        chunks[a:b] = F.chunk_ids(ds.manifest["format"], c, c)  # c is the row group or the offset
        # in (shard, row) order, each shard's rows are the manifest's count of consecutive index rows: index row
        # i of shard s is row i - starts[s], which lies in [0, rows of s) exactly when starts[s] <= i < starts[s + 1]
        if in_order:
            r = np.arange(a, b, dtype=np.int64) - starts[s]
            in_order = bool(((r >= 0) & (r < shard_rows[s])).all())
            rows[a:b] = r
        a = b
    if not in_order:
        rows[:] = _rows_from_column(ds, index, name, shard_rows, shards)
    return RankIndex(durations, shards, rows, chunks)


def _rows_from_column(ds: Dataset, index, name: str, shard_rows: np.ndarray, shards: np.ndarray) -> np.ndarray:
    """Returns the `row` column of an index that is not in (shard, row) order, checked against its shards."""
    _check_type(index, F.ROW)
    rows = np.empty(len(shards), np.int32)
    a = 0
    for g in range(index.metadata.num_row_groups):
        column = parsed(ds.fs, f"{ds.path}/{F.INDEX}", name,
                        partial(index.read_row_group, g, columns=[F.ROW])).column(0)
        b = a + len(column)
        r = column.to_numpy(zero_copy_only=False)
        if column.null_count or not ((r >= 0) & (r < shard_rows[shards[a:b]])).all():
            raise F.DatasetError("index.parquet: column 'row' points past the end of its shard")
        rows[a:b], a = r, b
    return rows


def _check_type(index, column: str) -> None:
    """Raises DatasetError if index.parquet lacks `column` or holds it in another type than F.INDEX_SCHEMA's."""
    kind = index.schema_arrow.field(column).type if column in index.schema_arrow.names else None
    if kind != F.INDEX_SCHEMA.field(column).type:
        raise F.DatasetError(f"index.parquet: column {column!r} is {kind or 'missing'}, "
                             f"not {F.INDEX_SCHEMA.field(column).type}")
