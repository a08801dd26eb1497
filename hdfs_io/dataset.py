"""An opened packed dataset: its manifest, index and quarantine, and whole-shard reads."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from hdfs_io import dataset_format as F
from hdfs_io.filesystem import first_line, open_filesystem
from hdfs_io.sequencefile import SequenceFileReader


@dataclass
class Dataset:
    uri: str
    fs: pafs.FileSystem
    path: str
    manifest: dict

    def _file(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def index(self, columns: list[str] | None = None) -> pa.Table:
        """Returns index.parquet (optionally only `columns`), checked against dataset.json.

        Raises:
            hdfs_io.dataset_format.DatasetError: the index is missing, unreadable
                (a Parquet page checksum included) or disagrees with the manifest.
        """
        table = self._parquet(F.INDEX, columns)
        return F.validate_index(table, self.manifest)

    def index_part(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """Returns the index rows of one shard, in row order: its own part from format version 2 on.

        Raises:
            hdfs_io.dataset_format.DatasetError: the part is missing or unreadable.
        """
        if self.manifest["format_version"] < 2:
            index = self.index(sorted({*(columns or F.INDEX_SCHEMA.names), F.SHARD, F.ROW}))
            mine = index.filter(pa.compute.equal(index.column(F.SHARD), shard)).sort_by(F.ROW)
            return mine.select(columns) if columns else mine
        return self._parquet(F.index_part_path(shard), columns)

    def _parquet(self, name: str, columns: list[str] | None) -> pa.Table:
        try:
            with self.fs.open_input_stream(self._file(name)) as f:
                data = f.read()  # read first, so an error below is about the bytes, not the filesystem
        except FileNotFoundError:
            raise F.DatasetError(f"{self.uri} has no {name}") from None
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns, page_checksum_verification=True)
        except Exception as e:  # any failure to parse bytes already in memory: pyarrow raises several kinds
            raise F.DatasetError(f"{self.uri}/{name} is unreadable: {first_line(e)}") from None

    def quarantine(self) -> list[dict]:
        """Returns quarantine.jsonl's records.

        Raises:
            hdfs_io.dataset_format.DatasetError: the file is missing or a line is not a record.
        """
        # asked first rather than a failed open, which libhdfs reports with a Java trace on stderr
        if self.fs.get_file_info(self._file(F.QUARANTINE)).type != pafs.FileType.File:
            raise F.DatasetError(f"{self.uri} has no {F.QUARANTINE}")
        with self.fs.open_input_stream(self._file(F.QUARANTINE)) as f:
            data = f.read()
        records = []
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not {F.SOURCE, F.REASON} <= record.keys():
                raise F.DatasetError(f"{self.uri}/{F.QUARANTINE}:{lineno} is not a quarantine record")
            records.append(record)
        return records

    def shard_file(self, shard: int) -> str:
        return self._file(self.manifest["shards"][shard]["path"])

    def shard_records(self, shard: int) -> Iterator[tuple[str, bytes]]:
        """Yields `(key, audio bytes)` for every record of a shard, in row order."""
        path = self.shard_file(shard)
        if self.manifest["format"] == "parquet":
            parquet = pq.ParquetFile(self.fs.open_input_file(path))
            for batch in parquet.iter_batches(columns=[F.KEY, F.AUDIO]):
                yield from zip(batch.column(F.KEY).to_pylist(), batch.column(F.AUDIO).to_pylist())
        else:
            with self.fs.open_input_file(path) as f:
                reader = SequenceFileReader(f, name=path)
                for key, value in reader.records():
                    yield key.decode("utf-8"), value


def open_dataset(uri: str) -> Dataset:
    """Returns the dataset at `uri` after checking that dataset.json is there and valid.

    Raises:
        hdfs_io.dataset_format.DatasetError: incomplete (no dataset.json) or malformed.
        hdfs_io.filesystem.FilesystemUnavailable: the filesystem cannot be reached.
    """
    fs, path = open_filesystem(uri)
    manifest_path = posixpath.join(path, F.MANIFEST)
    try:
        with fs.open_input_stream(manifest_path) as f:
            text = f.read()
    except FileNotFoundError:
        leftovers = F.replaced_leftovers(fs, path) if fs.get_file_info(path).type == pafs.FileType.NotFound else []
        if leftovers:
            raise F.DatasetError(f"{uri} does not exist: a `pack --overwrite` stopped while replacing it, and the "
                                 f"dataset it replaced is at {leftovers[0]} (the next pack to {uri} puts it back; "
                                 "or move it back yourself)") from None
        raise F.DatasetError(f"{uri} has no {F.MANIFEST}: not a dataset, or its packing did not finish") from None
    return Dataset(uri, fs, path, F.parse_manifest(text))
