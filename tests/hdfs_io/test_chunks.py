"""hdfs_io.reader.chunks on its own: a Work's chunks read from tiny shards on a local filesystem that can stall or fail.

The filesystem is the local one behind pyarrow's PyFileSystem, with a hook on every
read of a file: a real filesystem whose reads can be made to wait (as on a SIGSTOPped
NameNode) or to raise (as hdfs-native does for what it does not support), without
touching the shared cluster.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from hdfs_io.format import dataset_format as F
from hdfs_io.format.sequencefile import SequenceFileWriter
from hdfs_io.reader.batches import form_batches
from hdfs_io.reader.chunks import ChunkFetcher, CorruptRecord, Record, Shards, StorageUnavailable
from hdfs_io.reader.reader_config import ReaderConfig
from hdfs_io.reader.work import Work

ROWS_PER_GROUP = 4


class HookedFile(io.FileIO):
    """A local file opened for reading whose every read first asks its filesystem's `before_read`."""

    def __init__(self, path: str, storage: "FaultyLocal"):
        super().__init__(path, "rb")
        self.storage = storage

    def read(self, size: int = -1) -> bytes:
        self.storage.before_read()
        return super().read(size)


class FaultyLocal(pafs.FileSystemHandler):
    """The local filesystem, whose reads can be made to stall or to raise.

    `stall(seconds)`: every read waits that long, or until `resume()`, as against a NameNode
    that accepts connections and does not answer. `fail_with(error)`: every read raises it.
    """

    def __init__(self):
        self.local = pafs.LocalFileSystem()
        self.stall_s: float | None = None
        self.error: BaseException | None = None
        self.resumed = threading.Event()

    def stall(self, seconds: float) -> None:
        self.stall_s = seconds

    def resume(self) -> None:
        self.stall_s = None
        self.resumed.set()

    def fail_with(self, error: BaseException) -> None:
        self.error = error

    def before_read(self) -> None:
        if self.stall_s is not None:
            self.resumed.wait(self.stall_s)
        if self.error is not None:
            raise self.error

    def open_input_file(self, path):
        return pa.PythonFile(HookedFile(path, self), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def get_type_name(self):
        return "faulty-local"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise PermissionError("a test filesystem does not empty /")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)


def audio_of(row: int) -> bytes:
    return bytes([row % 251]) * (200 + row)


def parquet_dataset(root: Path, groups: int = 2) -> Shards:
    """Writes one Parquet shard of `groups` row groups of ROWS_PER_GROUP rows, as the packer lays it out."""
    rows = [{F.KEY: f"utt-{r:04d}", F.AUDIO: audio_of(r), F.CODEC: "flac", F.SAMPLE_RATE: 16000, F.CHANNELS: 1,
             F.NUM_SAMPLES: 16000, F.DURATION_S: 1.0, F.TRANSCRIPT: f"words of {r}", F.SPEAKER: "s",
             F.CHECKSUM: zlib.crc32(audio_of(r))} for r in range(groups * ROWS_PER_GROUP)]
    (root / F.SHARD_DIR).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=F.SHARD_SCHEMA), root / F.shard_path(0, "parquet"),
                   row_group_size=ROWS_PER_GROUP, compression=F.PARQUET_COMPRESSION)
    return Shards(f"file://{root}", (F.shard_path(0, "parquet"),), sequencefile=False)


def work_of(rows: list[int], batch_size: int = 2, **fields) -> Work:
    """Returns a Work reading shard 0's `rows` in this order, `batch_size` to a batch, chunk = row group."""
    rows_array = np.asarray(rows, np.int64)
    bounds = np.arange(0, len(rows) + 1, batch_size, dtype=np.int64)
    batches = len(bounds) - 1
    return Work(0, np.arange(batches, dtype=np.int64), np.zeros(batches, bool), bounds,
                shards=np.zeros(len(rows), np.int32),
                chunks=fields.pop("chunks", rows_array // ROWS_PER_GROUP),
                rows=rows_array, durations=np.ones(len(rows), np.float32), **fields)


def audio_length(record: Record, where: str, uid: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """A model input that needs nothing but the record: its audio's bytes as samples, no masks, speed 1."""
    return np.frombuffer(record.data, np.uint8).astype(np.float32), np.zeros((0, 3), np.int64), 1.0


def read_batches(fetcher: ChunkFetcher, on_error: str) -> list[dict]:
    """Returns the Work's batches as the reader forms them, under the error policy `on_error`."""
    return list(form_batches(fetcher.work, fetcher.get, audio_length, fetcher.shards.where, on_error, "waveform"))


# Row group 0, then 1, then 0 again: with one chunk held, row group 0 is dropped and read again.
AGAIN = [0, 1, 4, 5, 2, 3]


@pytest.mark.parametrize("stalled", ["first read", "read again"])
def test_a_chunk_read_that_stalls_fails_within_retry_and_stall_seconds_instead_of_blocking(tmp_path, stalled):
    shards = parquet_dataset(tmp_path)
    storage = FaultyLocal()
    config = ReaderConfig(prefetch_chunks=1, max_held_chunks=1, retry_seconds=0.5, stall_seconds=1.0)
    patience = config.retry_seconds + config.stall_seconds
    if stalled == "first read":
        storage.stall(6.0)
    fetcher = ChunkFetcher(shards, config, pafs.PyFileSystem(storage), str(tmp_path), work_of(AGAIN))
    try:
        if stalled == "read again":
            served = [fetcher.get(item).key for item in range(4)]  # row groups 0 and 1; 0 is dropped for 1
            assert served == ["utt-0000", "utt-0001", "utt-0004", "utt-0005"]
            storage.stall(6.0)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as failed:
            fetcher.get(4 if stalled == "read again" else 0)
        waited = time.monotonic() - started
    finally:
        storage.resume()
        fetcher.close()

    assert waited < patience + 1.0, f"waited {waited:.1f} s against a patience of {patience:g} s"
    assert "shard shards/part-00000.parquet row group 0" in str(failed.value) and shards.uri in str(failed.value)
    if stalled == "read again":
        assert fetcher.rereads == 1


def test_a_thread_waiting_for_a_stalled_chunk_is_let_go_when_the_fetcher_closes(tmp_path):
    # decode_ahead's thread waits in get(); closing the Work early used to leave it waiting, the chunks it held with
    # it, for all of retry_seconds + stall_seconds (180 s by default)
    storage = FaultyLocal()
    storage.stall(30.0)
    fetcher = ChunkFetcher(parquet_dataset(tmp_path), ReaderConfig(), pafs.PyFileSystem(storage), str(tmp_path),
                           work_of([0, 1]))
    outcome = []
    waiting = threading.Thread(target=lambda: outcome.append(pytest.raises(StorageUnavailable, fetcher.get, 0)))
    waiting.start()
    time.sleep(0.5)

    started = time.monotonic()
    fetcher.stop.set()  # as close() begins; close() itself waits for the stalled read's thread
    waiting.join(timeout=5)
    let_go = time.monotonic() - started
    storage.resume()
    fetcher.close()

    assert not waiting.is_alive() and let_go < 2.0
    assert "the reader was closed" in str(outcome[0].value)


def test_chunks_read_again_to_bound_memory_serve_the_same_records(tmp_path):
    shards = parquet_dataset(tmp_path)
    config = ReaderConfig(prefetch_chunks=1, max_held_chunks=1)
    fetcher = ChunkFetcher(shards, config, pafs.PyFileSystem(FaultyLocal()), str(tmp_path), work_of(AGAIN))
    try:
        batches = read_batches(fetcher, "fail")
    finally:
        fetcher.close()

    assert [b["keys"] for b in batches] == [[f"utt-{r:04d}" for r in AGAIN[i:i + 2]] for i in (0, 2, 4)]
    assert [b["transcripts"][0] for b in batches] == ["words of 0", "words of 4", "words of 2"]
    assert fetcher.rereads == 1 and fetcher.reads == 3


def test_the_fetcher_counts_the_stored_bytes_of_every_read_re_reads_included(tmp_path):
    shards = parquet_dataset(tmp_path)
    meta = pq.ParquetFile(tmp_path / shards.paths[0]).metadata
    read = {F.KEY, F.TRANSCRIPT, F.AUDIO, F.CHECKSUM}
    group = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns)
                 if meta.row_group(g).column(c).path_in_schema in read) for g in range(meta.num_row_groups)]
    fetcher = ChunkFetcher(shards, ReaderConfig(prefetch_chunks=1, max_held_chunks=1),
                           pafs.PyFileSystem(FaultyLocal()), str(tmp_path), work_of(AGAIN))
    try:
        batches = read_batches(fetcher, "fail")
    finally:
        fetcher.close()

    assert fetcher.bytes_read == 2 * group[0] + group[1]  # row group 0 read again after 1 dropped it
    assert group[0] > len(b"".join(audio_of(r) for r in range(4)))  # the audio and the rest of the rows
    assert len(batches) == 3


def test_the_fetcher_counts_a_sequencefile_range_from_the_first_record_to_the_end_of_the_last(tmp_path):
    shards, work, offsets = sequencefile_dataset(tmp_path)
    fetcher = ChunkFetcher(shards, ReaderConfig(), pafs.PyFileSystem(FaultyLocal()), str(tmp_path), work)
    try:
        read_batches(fetcher, "fail")
    finally:
        fetcher.close()

    assert fetcher.bytes_read == (tmp_path / shards.paths[0]).stat().st_size - offsets[0]


@pytest.mark.parametrize("error", [NotImplementedError("erasure coding policy RS-10-4-1024k is not supported"),
                                   MemoryError("cannot allocate a read buffer"),
                                   KeyError("a reader bug")], ids=lambda e: type(e).__name__)
def test_a_read_that_fails_for_a_reason_other_than_its_bytes_raises_as_itself_and_skips_nothing(tmp_path, error):
    shards = parquet_dataset(tmp_path)
    storage = FaultyLocal()
    storage.fail_with(error)
    fetcher = ChunkFetcher(shards, ReaderConfig(on_error="skip"), pafs.PyFileSystem(storage), str(tmp_path),
                           work_of(AGAIN))
    batches = []
    try:
        with pytest.raises(type(error)) as raised:
            for batch in form_batches(fetcher.work, fetcher.get, audio_length, shards.where, "skip", "waveform"):
                batches.append(batch)
    finally:
        fetcher.close()

    assert not isinstance(raised.value, CorruptRecord)
    assert batches == [], "records were dropped and counted as damaged"
    assert any("shards/part-00000.parquet row group 0" in note for note in getattr(raised.value, "__notes__", []))


def test_a_parquet_shard_cut_short_is_damage_named_with_fail_and_counted_with_skip(tmp_path):
    shards = parquet_dataset(tmp_path)
    shard = tmp_path / shards.paths[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # no footer: the bytes prove it
    fs = pafs.PyFileSystem(FaultyLocal())

    fetcher = ChunkFetcher(shards, ReaderConfig(), fs, str(tmp_path), work_of(AGAIN))
    with pytest.raises(CorruptRecord, match=r"shards/part-00000.parquet row group 0: damaged: .*magic bytes"):
        read_batches(fetcher, "fail")
    fetcher.close()
    fetcher = ChunkFetcher(shards, ReaderConfig(), fs, str(tmp_path), work_of(AGAIN))
    skipped = read_batches(fetcher, "skip")
    fetcher.close()

    assert [b["keys"] for b in skipped] == [[], [], []]
    assert sum(len(b["skipped"]) for b in skipped) == len(AGAIN)


def sequencefile_dataset(root: Path, rows: int = 4) -> tuple[Shards, Work, list[int]]:
    """Writes one SequenceFile shard of `rows` records and its index part, as pack writes them; returns the
    shard, a Work that reads them all in order, and the records' offsets."""
    (root / F.SHARD_DIR).mkdir(parents=True)
    sink = io.BytesIO()
    writer = SequenceFileWriter(sink, name="part-00000")
    offsets = [writer.append(f"utt-{r:04d}", audio_of(r)) for r in range(rows)]
    (root / F.shard_path(0, "sequencefile")).write_bytes(sink.getvalue())
    (root / F.INDEX_DIR).mkdir()
    part = {F.OFFSET: offsets, F.NUM_BYTES: [len(audio_of(r)) for r in range(rows)],
            F.KEY: [f"utt-{r:04d}" for r in range(rows)], F.TRANSCRIPT: [f"words of {r}" for r in range(rows)],
            F.CHECKSUM: [zlib.crc32(audio_of(r)) for r in range(rows)]}
    pq.write_table(pa.table(part, schema=pa.schema([F.INDEX_SCHEMA.field(c) for c in part])),
                   root / F.index_part_path(0))
    work = work_of(list(range(rows)), chunks=np.zeros(rows, np.int64))
    return Shards(str(root), (F.shard_path(0, "sequencefile"),), sequencefile=True), work, offsets


def test_a_sequencefile_record_with_a_damaged_header_is_damage_counted_with_skip(tmp_path):
    shards, work, offsets = sequencefile_dataset(tmp_path)
    shard = tmp_path / shards.paths[0]
    data = bytearray(shard.read_bytes())
    at = offsets[0] + 4  # the first record's key length
    data[at:at + 4] = struct.pack(">i", 10**6)
    shard.write_bytes(bytes(data))

    fetcher = ChunkFetcher(shards, ReaderConfig(), pafs.PyFileSystem(FaultyLocal()), str(tmp_path), work)
    batches = read_batches(fetcher, "skip")
    fetcher.close()

    assert sum(len(b["skipped"]) for b in batches) == len(work.rows)
    assert "shards/part-00000.seq byte range 0: damaged: " in batches[0]["skipped"][0]
    assert "bad key length" in batches[0]["skipped"][0]


def test_a_missing_shard_is_damage_named_with_fail_not_an_outage(tmp_path):
    shards = parquet_dataset(tmp_path)
    (tmp_path / shards.paths[0]).unlink()
    fetcher = ChunkFetcher(shards, ReaderConfig(), pafs.PyFileSystem(FaultyLocal()), str(tmp_path), work_of(AGAIN))

    started = time.monotonic()
    with pytest.raises(CorruptRecord, match=r"shards/part-00000.parquet row group 0: missing: "):
        read_batches(fetcher, "fail")
    fetcher.close()

    assert time.monotonic() - started < ReaderConfig.retry_seconds / 2, "it was retried as if the storage were down"


@pytest.mark.parametrize("kept", [ROWS_PER_GROUP, ROWS_PER_GROUP + 1])  # group 1 gone; group 1 short of a row
def test_a_shard_whose_valid_footer_lacks_the_indexed_rows_is_damage_counted_with_skip(tmp_path, kept):
    shards = parquet_dataset(tmp_path)
    fewer = pq.read_table(tmp_path / shards.paths[0]).slice(0, kept)
    pq.write_table(fewer, tmp_path / shards.paths[0], row_group_size=ROWS_PER_GROUP)  # parses fine
    fs = pafs.PyFileSystem(FaultyLocal())

    fetcher = ChunkFetcher(shards, ReaderConfig(), fs, str(tmp_path), work_of(AGAIN))
    skipped = read_batches(fetcher, "skip")
    fetcher.close()

    assert [b["keys"] for b in skipped] == [["utt-0000", "utt-0001"], [], ["utt-0002", "utt-0003"]]
    assert sum(len(b["skipped"]) for b in skipped) == 2
