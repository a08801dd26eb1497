"""An opened packed dataset: its manifest, index and quarantine, and whole-shard reads."""

from __future__ import annotations

import contextlib
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from hdfs_io.format import dataset_format as F
from hdfs_io.format.sequencefile import SequenceFileReader
from hdfs_io.fs.filesystem import first_line, open_filesystem


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
            hdfs_io.format.dataset_format.DatasetError: the index is missing, unreadable
                (a Parquet page checksum included) or disagrees with the manifest.
        """
        with _named_if_missing(self.uri, F.INDEX):
            table = read_parquet(self.fs, self._file(F.INDEX), self.uri, F.INDEX, columns)
        return F.validate_index(table, self.manifest)

    def index_part(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """Returns the index rows of one shard, in row order: its own part from format version 2 on.

        Raises:
            hdfs_io.format.dataset_format.DatasetError: the part is missing or unreadable.
        """
        version = self.manifest["format_version"]
        with _named_if_missing(self.uri, F.index_part_path(shard) if version >= 2 else F.INDEX):
            return read_index_part(self.fs, self.path, self.uri, version, shard, columns)

    def index_file(self) -> pq.ParquetFile:
        """Returns index.parquet opened for random access: its footer read, no column yet.

        Raises:
            hdfs_io.format.dataset_format.DatasetError: the file is missing or its footer does not parse.
        """
        with _named_if_missing(self.uri, F.INDEX):
            return open_parquet(self.fs, self._file(F.INDEX), self.uri, F.INDEX)

    def quarantine(self) -> list[dict]:
        """Returns quarantine.jsonl's records.

        Raises:
            hdfs_io.format.dataset_format.DatasetError: the file is missing or a line is not a record.
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


def open_parquet(fs: pafs.FileSystem, path: str, uri: str, name: str) -> pq.ParquetFile:
    """Returns the Parquet file at `path` opened for random access, with page checksums verified on read.

    Only its footer is read here; each later read fetches the column chunks it asks for, so a
    process reads what it uses and not the file (index.parquet is 2.2 GB at 30M utterances).

    Raises:
        hdfs_io.format.dataset_format.DatasetError: its footer does not parse; the message names it as `name`
            in the dataset at `uri`.
        FileNotFoundError: there is no such file (libhdfs says so too when no NameNode answers).
        OSError: the filesystem did not serve it.
    """
    return parsed(fs, path, f"{uri}/{name}", lambda: pq.ParquetFile(fs.open_input_file(path),
                                                                     page_checksum_verification=True))


def read_parquet(fs: pafs.FileSystem, path: str, uri: str, name: str, columns: list[str] | None = None) -> pa.Table:
    """Returns `columns` (all by default) of the Parquet file at `path`, reading only their column chunks.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: its bytes do not parse.
        FileNotFoundError: there is no such file.
        OSError: the filesystem did not serve it.
    """
    parquet = open_parquet(fs, path, uri, name)
    return parsed(fs, path, f"{uri}/{name}", lambda: parquet.read(columns=columns))


def parsed(fs: pafs.FileSystem, path: str, where: str, parse):
    """Returns `parse()`, a read of the Parquet file at `path`; a failure that is about its bytes is DatasetError
    naming `where`.

    pyarrow raises OSError both for a filesystem that fails and for a page that fails its checksum;
    the two are told apart by reading the file's raw bytes again: served whole, the bytes are bad.
    """
    try:
        return parse()
    except FileNotFoundError:
        raise
    except OSError as e:
        if not _served(fs, path):
            raise
        raise F.DatasetError(f"{where} is unreadable: {first_line(e)}") from None
    except Exception as e:  # any other failure to parse: pyarrow raises several kinds
        raise F.DatasetError(f"{where} is unreadable: {first_line(e)}") from None


def _served(fs: pafs.FileSystem, path: str, piece: int = 16 * 2**20) -> bool:
    """Returns True if the filesystem serves every byte of the file at `path` now (read and dropped, piece by piece)."""
    try:
        with fs.open_input_stream(path) as f:
            while f.read(piece):
                pass
        return True
    except OSError:
        return False


def read_index_part(fs: pafs.FileSystem, root: str, uri: str, format_version: int, shard: int,
                    columns: list[str] | None = None) -> pa.Table:
    """Returns the index rows of one shard of the dataset at `root`, in row order.

    Format version 2 on, that is the shard's own index part. A version 1 index is read for
    that shard's rows only: its row groups whose statistics cannot hold the shard are skipped.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: the part (or the index) is unreadable.
        FileNotFoundError: it is missing.
        OSError: the filesystem did not serve it.
    """
    if format_version >= 2:
        name = F.index_part_path(shard)
        return read_parquet(fs, posixpath.join(root, name), uri, name, columns)
    index = open_parquet(fs, posixpath.join(root, F.INDEX), uri, F.INDEX)
    wanted = sorted({*(columns or F.INDEX_SCHEMA.names), F.SHARD, F.ROW})
    at = index.schema_arrow.get_field_index(F.SHARD)
    groups = []
    for g in range(index.metadata.num_row_groups):
        stats = index.metadata.row_group(g).column(at).statistics
        if stats is None or not stats.has_min_max or stats.min <= shard <= stats.max:
            groups.append(g)
    table = parsed(fs, posixpath.join(root, F.INDEX), f"{uri}/{F.INDEX}",
                    lambda: index.read_row_groups(groups, columns=wanted))
    mine = table.filter(pa.compute.equal(table.column(F.SHARD), shard)).sort_by(F.ROW)
    return mine.select(columns) if columns else mine


@contextlib.contextmanager
def _named_if_missing(uri: str, name: str):
    """Turns a FileNotFoundError inside into a DatasetError saying that the dataset at `uri` has no `name`."""
    try:
        yield
    except FileNotFoundError:
        raise F.DatasetError(f"{uri} has no {name}") from None


def open_dataset(uri: str) -> Dataset:
    """Returns the dataset at `uri` after checking that dataset.json is there and valid.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: incomplete (no dataset.json) or malformed.
        hdfs_io.fs.filesystem.FilesystemUnavailable: the filesystem cannot be reached.
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
