"""Chunk reads for one worker's Work: Parquet row groups or SequenceFile byte ranges, prefetched and bounded.

A chunk is read once for all the items of the Work that need it, on a background
thread that keeps at most `prefetch_chunks` ahead, and is held until its last use.
I/O errors are retried with backoff for `retry_seconds`, then raise
StorageUnavailable; bytes that are served but do not parse raise CorruptRecord.
Any other error (a MemoryError, a client's NotImplementedError, a bug) is not
damage: it raises as itself. A read that hangs raises StorageUnavailable once
nothing has arrived for `retry_seconds + stall_seconds`, whichever thread reads.
"""

from __future__ import annotations

import posixpath
import queue
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import read_index_part
from hdfs_io.format.dataset_format import CorruptRecord, StorageUnavailable  # what a chunk read raises
from hdfs_io.format.sequencefile import (OffsetBytes, SequenceFileError, SequenceFileReader, UnsupportedCodec,
                                         writable_bytes)
from hdfs_io.fs import client_log
from hdfs_io.fs.filesystem import failure_cause, first_line
from hdfs_io.reader.reader_config import ReaderConfig
from hdfs_io.reader.work import Work


class Record(NamedTuple):
    """One utterance as read from its chunk."""
    key: str
    transcript: str
    data: bytes | tuple  # audio bytes, (float16 features, CRC32) from the feature cache, or batches.Decoded audio
    checksum: int | None = None  # the CRC32 of the audio bytes as packed (None for the feature cache's)


@dataclass(frozen=True)
class Shards:
    """Where a dataset's bytes are: all a chunk read needs besides the Work."""
    uri: str
    paths: tuple[str, ...]  # shard files, relative to the dataset root, by shard number
    sequencefile: bool
    cache_dir: str | None = None  # features-<digest>/ to read instead of the audio
    backend: str | None = None  # the HDFS backend (hdfs_io.fs.filesystem.hdfs_backend) the reader chose
    format_version: int = F.FORMAT_VERSION  # SequenceFile shards: where their index rows are (read_index_part)

    def where(self, shard: int, row: int) -> str:
        return f"shard {self.paths[shard]} row {row}"

    def index_rows(self, fs, root: str, shard: int) -> "SequenceRows":
        """Returns what reading a SequenceFile shard's records needs, from its index rows (read_index_part).

        Raises:
            hdfs_io.format.dataset_format.DatasetError: they do not parse.
            OSError: the filesystem did not serve them (FileNotFoundError: not there).
        """
        part = read_index_part(fs, root, self.uri, self.format_version, shard,
                               [F.OFFSET, F.NUM_BYTES, F.KEY, F.TRANSCRIPT, F.CHECKSUM])
        return SequenceRows(part.column(F.OFFSET).to_numpy(),
                            part.column(F.NUM_BYTES).to_numpy() + pa.compute.binary_length(part.column(F.KEY)).to_numpy(),
                            part.column(F.TRANSCRIPT).to_pylist(), part.column(F.CHECKSUM).to_numpy())

    def files(self, root: str, shard: int) -> tuple[str, str | None]:
        """Returns the shard's file and its feature cache file (None without a cache)."""
        name = self.paths[shard]
        if not self.cache_dir:
            return f"{root}/{name}", None
        stem = posixpath.splitext(posixpath.basename(name))[0]
        return f"{root}/{name}", f"{root}/{self.cache_dir}/{stem}.parquet"


@dataclass(frozen=True)
class SequenceRows:
    """A SequenceFile shard's index rows, by row: where each record is and what its record lacks."""
    offsets: np.ndarray  # the record's byte offset in the shard
    record_bytes: np.ndarray  # its key's and value's bytes
    transcripts: list[str]
    checksums: np.ndarray  # the CRC32 of its audio

    def records(self, fs, path: str, rows: list[int]) -> tuple[dict[int, Record], int]:
        """Returns ({row: its Record} for `rows` of the shard at `path`, the bytes read), read in one byte range.

        Raises:
            ShardDisagrees: a row is past the shard's index rows.
        """
        if max(rows) >= len(self.offsets):
            raise ShardDisagrees(f"the shard's index rows end at row {len(self.offsets) - 1}, "
                                 f"the index places row {max(rows)} in it")
        by_offset = {int(self.offsets[r]): r for r in rows}
        start, last = min(by_offset), max(by_offset)
        # a record is its lengths, key and value, perhaps after a 20-byte sync marker
        end = last + 64 + int(self.record_bytes[by_offset[last]])
        with fs.open_input_file(path) as f:
            header = SequenceFileReader(f, name=path)
            blob = f.read_at(min(end, f.size()) - start, start)
        reader = header.over(OffsetBytes(blob, start))
        return {by_offset[offset]: Record(writable_bytes(reader.key_class, key).decode("utf-8"),
                                          self.transcripts[by_offset[offset]],
                                          writable_bytes(reader.value_class, value),
                                          int(self.checksums[by_offset[offset]]))
                for key, value, offset in reader.iter_range(start, last) if offset in by_offset}, len(blob)


def proves_damage(error: BaseException) -> bool:
    """Returns True if `error` is a parser's verdict on bytes it was served: they are not a valid chunk.

    That is pyarrow's ArrowInvalid (a Parquet footer or page that does not parse), a
    footer that lacks the rows the index places in the shard, a SequenceFile format
    error, text that is not UTF-8, or a shard's index rows that do not parse. A codec this reader lacks
    is not damage, nor is anything else: a client that does not support a file (say,
    hdfs-native and an erasure-coding policy), a MemoryError, a bug.
    """
    if isinstance(error, UnsupportedCodec):
        return False
    return isinstance(error, (pa.ArrowInvalid, SequenceFileError, UnicodeDecodeError, ShardDisagrees, F.DatasetError))


class ShardDisagrees(ValueError):
    """A shard's footer parses but lacks the rows the index places in it: damage to the dataset."""


RECORD_COLUMNS = [F.KEY, F.TRANSCRIPT, F.AUDIO, F.CHECKSUM]  # what reading a Parquet shard's records reads


def parquet_rows(parquet: pq.ParquetFile, group: int, rows: list[int], columns: list[str]) -> dict[str, list]:
    """Returns `columns` of the given shard rows, all in row group `group`, as lists in `rows` order.

    Raises:
        ShardDisagrees: the shard has no such row group, or the group lacks one of the rows.
    """
    meta = parquet.metadata
    if group >= meta.num_row_groups:
        raise ShardDisagrees(f"the shard has {meta.num_row_groups} row groups, the index names group {group}")
    group_start = sum(meta.row_group(i).num_rows for i in range(group))
    offsets = np.asarray(rows, np.int64) - group_start
    if len(offsets) and (offsets.min() < 0 or offsets.max() >= meta.row_group(group).num_rows):
        held = meta.row_group(group).num_rows
        raise ShardDisagrees(f"row group {group} holds rows {group_start}-{group_start + held - 1}, the index places "
                             f"rows {group_start + int(offsets.min())}-{group_start + int(offsets.max())} in it")
    return parquet.read_row_group(group, columns=columns).take(offsets).to_pydict()


def group_bytes(parquet: pq.ParquetFile, group: int, columns: list[str]) -> int:
    """Returns the stored bytes of `columns` in row group `group`: what reading them reads, the footer aside."""
    meta = parquet.metadata.row_group(group)
    return sum(meta.column(i).total_compressed_size for i in range(meta.num_columns)
               if meta.column(i).path_in_schema in columns)


class ChunkFetcher:
    """Reads the chunks a Work needs, in order of first use, on a background thread.

    A chunk stays in memory from its read until its last use, then is dropped.
    At most `max_held_chunks` are held: past that, the one needed again last is
    dropped and read again when needed (a plan that reads chunks far out of
    order costs reads, not memory). A shard's file is closed after its last
    chunk is read, since an open Parquet file keeps the buffers of its last read.

    Every read, the first and a read again, runs on a thread of its own and is
    waited for at most `retry_seconds + stall_seconds`, so a read that hangs
    fails the Work instead of blocking the DataLoader worker for ever.
    """

    def __init__(self, shards: Shards, config: ReaderConfig, fs, root: str, work: Work):
        self.shards, self.config, self.fs, self.root, self.work = shards, config, fs, root, work
        codes, first, inverse, counts = np.unique(work.chunk_codes(), return_index=True, return_inverse=True,
                                                  return_counts=True)
        chunks = [(int(c >> 32), int(c & 0xFFFFFFFF)) for c in codes]
        self.order = [chunks[i] for i in np.argsort(first)]
        self.remaining = dict(zip(chunks, counts.tolist()))
        by_chunk, ends = np.argsort(inverse, kind="stable"), np.cumsum(counts)
        self.items_of = {c: by_chunk[end - n:end] for c, n, end in zip(chunks, counts, ends)}  # in reading order
        self.used = 0  # items served so far: the item index in reading order
        self.last_of_shard = {shard: i for i, (shard, _) in enumerate(self.order)}
        self.ready: dict[tuple[int, int], dict[int, Record] | BaseException] = {}
        self.dropped: set[tuple[int, int]] = set()
        self.rereads = 0
        self.reads = 0  # chunks handed over by the prefetch thread or read again, so far
        self.bytes_read = 0  # the stored bytes of those chunks' reads: column chunks, or a SequenceFile's byte range
        self.counting = threading.Lock()  # reads run on the prefetch thread and on re-reads' threads
        self.local = threading.local()  # open files, per thread: the prefetch thread's and re-reads'
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, config.prefetch_chunks))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _files(self) -> dict[str | int, pq.ParquetFile | SequenceRows]:
        """Returns this thread's open Parquet files by path, and SequenceFile shards' index rows by shard."""
        return self.local.__dict__.setdefault("files", {})

    def _run(self) -> None:
        for i, chunk in enumerate(self.order):
            if self.stop.is_set():
                return
            result = self._read_or_error(chunk)
            if self.last_of_shard[chunk[0]] == i:
                for path in (*self.shards.files(self.root, chunk[0]), chunk[0]):
                    self._files().pop(path, None)
            self.queue.put((chunk, result))

    def _read_or_error(self, chunk: tuple[int, int]) -> dict[int, Record] | BaseException:
        try:
            return self._read_retrying(chunk)
        except (CorruptRecord, StorageUnavailable) as e:  # handed to the consumer, which applies the policy
            return e
        except BaseException as e:  # not damage: handed to the consumer, which raises it as it is
            if isinstance(e, Exception):
                e.add_note(f"while reading {self._where(chunk)} of {self.shards.uri}")
            return e

    def _where(self, chunk: tuple[int, int]) -> str:
        unit = "byte range" if self.shards.sequencefile else "row group"
        return f"shard {self.shards.paths[chunk[0]]} {unit} {chunk[1]}"

    def _read_retrying(self, chunk: tuple[int, int]) -> dict[int, Record]:
        """Returns `_read(chunk)`, retrying I/O errors with exponential backoff for `retry_seconds`.

        A failed read whose raw bytes the filesystem does serve (a damaged Parquet page
        or footer) is damage, not an outage: it is not retried.

        Raises:
            StorageUnavailable: the read still failed when the retry budget ran out.
            CorruptRecord: the chunk's bytes were served but could not be parsed.
            Exception: anything else the read raised (`proves_damage` is False for it), as it is.
        """
        deadline = time.monotonic() + self.config.retry_seconds
        delay, attempts, damaged = 0.5, 0, False
        while True:
            attempts += 1
            try:
                return self._read(chunk)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and self._root_answers():
                    # the filesystem answers, so the shard really is missing: damage to the dataset, not an outage
                    raise CorruptRecord(f"{self._where(chunk)}: missing: {first_line(e)}") from e
                # Parquet only: a SequenceFile's parse errors are not OSErrors. Twice in a row, so that a
                # read that failed and recovered just before the probe is not taken for damage.
                if not isinstance(e, FileNotFoundError) and not self.shards.sequencefile and self._bytes_served(chunk):
                    served_twice = damaged
                    damaged = True
                    if served_twice:
                        raise CorruptRecord(f"{self._where(chunk)}: damaged: {first_line(e)}") from e
                    self._files().clear()
                    continue
                damaged = False
                if self.stop.is_set() or time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"{self._where(chunk)}: {self.shards.uri} did not serve it after {attempts} attempt(s) "
                        f"in {self.config.retry_seconds:g} s: {failure_cause(e)}{client_log.note()}") from e
                self._files().clear()  # handles may be bound to a dead connection
                self.stop.wait(delay)
                delay = min(delay * 2, 8.0)
            except Exception as e:
                if not proves_damage(e):
                    raise
                raise CorruptRecord(f"{self._where(chunk)}: damaged: {first_line(e)}") from e

    def _bytes_served(self, chunk: tuple[int, int]) -> bool:
        """Returns True if the filesystem serves the raw bytes of `chunk` now.

        Those are its row group's column chunks when the shard's footer was parsed,
        else the footer itself; a Parquet read that failed on bytes that are served
        failed on their content.
        """
        path, cache_path = self.shards.files(self.root, chunk[0])
        path = cache_path or path
        parsed = self._files().get(path)
        try:
            with self.fs.open_input_file(path) as f:
                size = f.size()
                if parsed is None or self.shards.sequencefile:
                    start, length = max(0, size - 2**16), min(size, 2**16)
                else:
                    group = self._cache_group(chunk) if cache_path else chunk[1]
                    try:
                        columns = [parsed.metadata.row_group(group).column(i)
                                   for i in range(parsed.metadata.num_columns)]
                        start = min(c.dictionary_page_offset or c.data_page_offset for c in columns)
                    except (IndexError, ValueError):  # the parsed footer does not describe this chunk: damaged
                        return True
                    length = min(sum(c.total_compressed_size for c in columns), size - start)
                return len(f.read_at(length, start)) == length
        except OSError:
            return False

    def _root_answers(self) -> bool:
        try:
            return self.fs.get_file_info("/").type == FileType.Directory
        except OSError:
            return False

    def _parquet(self, path: str) -> pq.ParquetFile:
        """Returns the shard's ParquetFile, opened once per fetcher so its footer is read once."""
        files = self._files()
        if path not in files:
            files[path] = pq.ParquetFile(self.fs.open_input_file(path))
        return files[path]

    def _cache_group(self, chunk: tuple[int, int]) -> int:
        return int(self.work.cache_groups[self.items_of[chunk][0]])

    def _read(self, chunk: tuple[int, int]) -> dict[int, Record]:
        """Returns {shard row: its record} for the rows of one chunk that the Work needs."""
        shard, chunk_id = chunk
        w = self.work
        path, cache_path = self.shards.files(self.root, shard)
        rows = {int(w.rows[j]): int(j) for j in self.items_of[chunk]}  # an item for each row needed
        if cache_path:  # the cache's row group holds the chunk's rows in row order; the audio is not read
            columns = [F.KEY, F.TRANSCRIPT, F.FEATURES, F.CHECKSUM]
            cache, group = self._parquet(cache_path), self._cache_group(chunk)
            table = cache.read_row_group(group, columns=columns)
            self._count(group_bytes(cache, group, columns))
            got = table.take(np.array([w.cache_rows[j] for j in rows.values()], np.int64)).to_pydict()
            return {row: Record(key, text, (feats, crc)) for row, key, text, feats, crc
                    in zip(rows, *(got[c] for c in columns))}
        if not self.shards.sequencefile:
            shard_file = self._parquet(path)
            got = parquet_rows(shard_file, chunk_id, list(rows), RECORD_COLUMNS)
            self._count(group_bytes(shard_file, chunk_id, RECORD_COLUMNS))
            return {row: Record(*fields) for row, *fields in zip(rows, *(got[c] for c in RECORD_COLUMNS))}
        records, read = self._sequence_rows(shard).records(self.fs, path, list(rows))
        self._count(read)
        return records

    def _count(self, read: int) -> None:
        with self.counting:
            self.bytes_read += read

    def _sequence_rows(self, shard: int) -> SequenceRows:
        """Returns a SequenceFile shard's index rows, read once per fetcher and thread, like its files."""
        files = self._files()
        if shard not in files:
            files[shard] = self.shards.index_rows(self.fs, self.root, shard)
        return files[shard]

    def get(self, item: int) -> Record | None:
        """Returns the record of the Work's item `item` (the next one in reading order), waiting if needed.

        Raises:
            StorageUnavailable: the chunk could not be read, or nothing arrived for too long.
            CorruptRecord: the chunk was read but could not be parsed.
            Exception: the read failed for a reason other than its bytes (a MemoryError, a client's
                NotImplementedError, a bug): that error as it is, with a note naming the chunk.
        """
        chunk = (int(self.work.shards[item]), int(self.work.chunks[item]))
        if chunk in self.dropped:  # dropped to bound memory: read it again
            self.dropped.discard(chunk)
            self.rereads += 1
            self._take(chunk, self._read_again(chunk))
        while chunk not in self.ready:
            self._take(chunk, self.queue)
        self._drop_beyond_limit(keep=chunk)
        result = self.ready[chunk]
        self.used = item + 1
        self.remaining[chunk] -= 1
        if self.remaining[chunk] == 0:
            del self.ready[chunk]
        if isinstance(result, CorruptRecord):
            raise CorruptRecord(str(result)) from result  # once for each of the chunk's records
        if isinstance(result, BaseException):
            raise result  # an outage (StorageUnavailable), or what is not damage, as it is
        return result.get(int(self.work.rows[item]))

    def _read_again(self, chunk: tuple[int, int]) -> queue.Queue:
        """Starts reading a dropped chunk again on a thread of its own; returns where it will arrive.

        Not in the consumer's thread, where a read that hangs would be waited for without
        end; not on the prefetch thread, which may be blocked handing over a chunk read ahead.
        The thread's open files go with it, so nothing of the read is kept.
        """
        arrival: queue.Queue = queue.Queue(maxsize=1)

        def run() -> None:
            arrival.put((chunk, self._read_or_error(chunk)))

        threading.Thread(target=run, daemon=True, name="chunk-read-again").start()
        return arrival

    def _take(self, chunk: tuple[int, int], arrivals: queue.Queue) -> None:
        """Takes the next chunk read from `arrivals` into `ready`, waiting at most `retry_seconds + stall_seconds`.

        Raises:
            StorageUnavailable: nothing arrived in that time; `chunk` names the read waited for.
        """
        patience = self.config.retry_seconds + self.config.stall_seconds
        deadline = time.monotonic() + patience
        while True:  # in short waits, so that a closed fetcher does not keep a waiting thread (decode_ahead's)
            try:
                got, result = arrivals.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                break
            except queue.Empty:
                if self.stop.is_set():
                    raise StorageUnavailable(f"{self._where(chunk)}: the reader was closed") from None
                if time.monotonic() >= deadline:
                    raise StorageUnavailable(f"{self._where(chunk)}: no data from {self.shards.uri} for "
                                             f"{patience:g} s; a read is hanging (is the NameNode or a DataNode "
                                             "stopped?)") from None
        self.ready[got] = result
        self.reads += 1

    def _drop_beyond_limit(self, keep: tuple[int, int]) -> None:
        """Drops held chunks, the one needed again last first, until at most `max_held_chunks` are held."""
        def next_use(c: tuple[int, int]) -> int:
            items = self.items_of[c]
            return int(items[np.searchsorted(items, self.used)])

        while len(self.ready) > max(1, self.config.max_held_chunks):
            victim = max((c for c in self.ready if c != keep), key=next_use)
            del self.ready[victim]
            self.dropped.add(victim)

    def close(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + 1.0
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    return  # stuck in a read that hangs; it is a daemon thread, so leave it behind
