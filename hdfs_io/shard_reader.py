"""The per-rank shard reader: a torch IterableDataset streaming planned, decoded, padded batches.

    ds = ShardDataset("hdfs://nn:8020/datasets/train", rank=r, world_size=w)
    loader = ShardLoader(ds, num_workers=2)      # a DataLoader(ds, batch_size=None, ...) that tracks position
    for epoch in range(n):
        loader.set_epoch(epoch)
        for batch in loader: ...                 # batch["features"]: (B, T, F), batch["lengths"], ...
        state = loader.state_dict()              # exactly where this rank is; load_state_dict() resumes

The pipeline, per DataLoader worker: plan (hdfs_io.plan, from the index alone)
-> this worker's batches (every k-th position, so the output order does not depend
on k) -> chunks to read, in order of first use (Parquet row groups; byte ranges
of about 16 MB in SequenceFiles) -> a background thread prefetching a
bounded number of chunks -> verify each record's CRC32 -> decode -> down-mix and
resample -> features -> collate. Errors follow one policy: "fail" raises
CorruptRecord naming shard and row, "skip" drops the record and counts it.

A read that fails with an I/O error (a NameNode restarting, a DataNode gone
with no replica left yet) is retried with exponential backoff for
`retry_seconds`, then raises StorageUnavailable naming the filesystem,
whatever the policy: skipping would silently drop every record behind it.
A read that never returns (a NameNode that accepts connections but does not
answer) fails the same way once nothing has arrived for `retry_seconds +
stall_seconds`, so a reader never hangs.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
from pyarrow.fs import FileType
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hdfs_io import dataset_format as F
from hdfs_io.audio import BadAudio, decode, resample, to_mono
from hdfs_io.dataset import open_dataset
from hdfs_io.features import FeatureConfig, log_features
from hdfs_io.filesystem import FilesystemRef, first_line, worker_start_method
from hdfs_io.plan import PlanConfig, index_columns, plan_epoch
from hdfs_io.sequencefile import OffsetBytes, SequenceFileReader, writable_bytes


class CorruptRecord(RuntimeError):
    """A record failed its checksum or could not be decoded; the message names shard and row."""


class StorageUnavailable(RuntimeError):
    """A shard could not be read within the retry budget; the message names the filesystem and shard."""


def error_message(error: BaseException) -> str:
    """Returns the one-line message of a reader error, also when a DataLoader worker re-raised it.

    DataLoader re-raises a worker's exception in the trainer with the worker's
    traceback folded into the message; the user needs its last line only.
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    for cls in (CorruptRecord, StorageUnavailable):
        prefix = f"{cls.__module__}.{cls.__name__}: "
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


@dataclass(frozen=True)
class ReaderConfig:
    plan: PlanConfig = field(default_factory=PlanConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    output: str = "features"  # "features": normalized features on the CPU; "waveform": for on-device features
    on_error: str = "fail"  # or "skip"
    prefetch_chunks: int = 4
    retry_seconds: float = 60.0  # how long a failing read is retried, with backoff, before StorageUnavailable
    stall_seconds: float = 120.0  # how long a read may hang (beyond retry_seconds) before StorageUnavailable
    use_feature_cache: bool = True  # read features-<digest>/ instead of decoding, when it matches `feature`

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")
        if self.output not in ("features", "waveform"):
            raise ValueError(f"output must be 'features' or 'waveform', not {self.output!r}")
        if self.retry_seconds < 0 or self.stall_seconds <= 0:
            raise ValueError("retry_seconds must be >= 0 and stall_seconds > 0")


class ShardDataset(IterableDataset):
    """Rank `rank` of `world_size`'s share of a packed dataset, one epoch at a time."""

    def __init__(self, uri: str, rank: int, world_size: int, config: ReaderConfig = ReaderConfig()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.ref, self.rank, self.world_size, self.config = FilesystemRef(uri), rank, world_size, config
        ds = open_dataset(uri)
        self.manifest = ds.manifest
        index = ds.index()
        self.keys = index.column(F.KEY).to_pylist()
        self.durations, self.shards, self.rows = index_columns(index)
        self.transcripts = index.column(F.TRANSCRIPT).to_pylist()
        self.checksums = index.column(F.CHECKSUM).to_numpy()
        self.row_groups = index.column(F.ROW_GROUP).to_numpy()
        self.offsets = index.column(F.OFFSET).to_numpy()
        self.num_bytes = index.column(F.NUM_BYTES).to_numpy()
        self.chunks = F.chunk_ids(self.manifest["format"], self.row_groups, self.offsets)
        stats = self.manifest["stats"]["features"]
        try:
            same = FeatureConfig(**stats["config"]) == config.feature
        except (TypeError, ValueError) as e:
            raise F.DatasetError(f"dataset.json: bad 'stats.features.config': {e}") from None
        self.mean = np.asarray(stats["mean"], np.float32) if same else None
        self.std = np.maximum(np.asarray(stats["std"], np.float32), 1e-5) if same else None
        self.cache_dir = self._feature_cache(ds) if config.output == "features" and config.use_feature_cache else None
        self.epoch, self.start_position = 0, 0
        self._plans: dict[int, object] = {}
        self._by_key: dict[str, int] | None = None
        self._members: dict[tuple[int, int], np.ndarray] | None = None

    def _feature_cache(self, ds) -> str | None:
        """Returns the feature cache folder for this reader's feature config, if a complete one exists."""
        folder = F.feature_cache_dir(self.config.feature.digest())
        try:
            with ds.fs.open_input_stream(f"{ds.path}/{folder}/{F.FEATURE_CACHE_MANIFEST}") as f:
                cache = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        return folder if cache.get("utterances") == len(self.keys) else None

    def chunk_members(self, shard: int, chunk: int) -> np.ndarray:
        """Returns the utterance ids in one chunk, from a grouping of the index built once per process."""
        if self._members is None:
            order = np.lexsort((self.chunks, self.shards))
            keys = np.stack([self.shards[order], self.chunks[order]], axis=1)
            starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
            self._members = {(int(keys[a, 0]), int(keys[a, 1])): order[a:b]
                             for a, b in zip(starts, np.r_[starts[1:], len(order)])}
        return self._members.get((shard, chunk), np.empty(0, np.int64))

    def chunk_row_group(self, shard: int, chunk: int) -> int:
        """Returns the feature-cache row group of a chunk: its rank among the shard's chunk ids."""
        self.chunk_members(shard, chunk)
        return sorted(c for s, c in self._members if s == shard).index(chunk)

    # -- planning and position ------------------------------------------------

    def plan(self, epoch: int):
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.durations, self.shards, self.rows, self.world_size, epoch,
                                             self.config.plan)}
        return self._plans[epoch]

    def __len__(self) -> int:
        return len(self.plan(self.epoch).ranks[self.rank].batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_position = epoch, 0

    def state_dict(self, next_position: int | None = None) -> dict:
        return {"epoch": self.epoch, "position": self.start_position if next_position is None else next_position,
                "rank": self.rank, "world_size": self.world_size, "seed": self.config.plan.seed,
                "utterances": len(self.keys)}

    def load_state_dict(self, state: dict) -> None:
        expected = {"rank": self.rank, "world_size": self.world_size, "seed": self.config.plan.seed,
                    "utterances": len(self.keys)}
        got = {k: state.get(k) for k in expected}
        if got != expected:
            raise ValueError(f"reader state is for {got}, this reader is {expected}")
        self.epoch, self.start_position = state["epoch"], state["position"]

    # -- iteration ----------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.plan(self.epoch).ranks[self.rank]
        positions = list(range(self.start_position + worker, len(mine.batches), workers))
        if info is None:  # in-process iteration tracks its own position
            for batch in self._batches(positions, mine):
                self.start_position = batch["position"] + 1
                yield batch
        else:
            yield from self._batches(positions, mine)

    def _batches(self, positions: list[int], mine) -> Iterator[dict]:
        fs, root = self.ref.open()
        order = []
        for p in positions:
            for u in mine.batches[p]:
                chunk = (int(self.shards[u]), int(self.chunks[u]))
                order.append(chunk)
        fetcher = ChunkFetcher(self, fs, root, order)
        try:
            for p in positions:
                yield self._collate(p, mine.batches[p], mine.repeated[p], fetcher)
        finally:
            fetcher.close()

    def _collate(self, position: int, ids: np.ndarray, repeated: bool, fetcher: "ChunkFetcher") -> dict:
        items, skipped = [], []
        for u in ids:
            u = int(u)
            record = fetcher.get((int(self.shards[u]), int(self.chunks[u])), u)
            try:
                items.append((u, self._prepare(u, record)))
            except CorruptRecord as e:
                if self.config.on_error == "fail":
                    raise
                skipped.append(str(e))
        return collate(position, self.epoch, [(self.keys[u], self.transcripts[u], float(self.durations[u]), x)
                                              for u, x in items], repeated, skipped, self.config.output)

    def _prepare(self, u: int, data: bytes | tuple[bytes, int] | None) -> np.ndarray:
        where = f"shard {self.manifest['shards'][self.shards[u]]['path']} row {self.rows[u]}"
        if data is None:
            raise CorruptRecord(f"{where}: record missing from its chunk")
        if isinstance(data, tuple):  # from the feature cache: float16 features and their CRC32
            feats, crc = data
            if zlib.crc32(feats) != crc:
                raise CorruptRecord(f"{self.cache_dir}/ {where}: feature checksum mismatch (key {self.keys[u]})")
            feats = np.frombuffer(feats, "<f2").reshape(-1, self.config.feature.num_bins).astype(np.float32)
            return (feats - self.mean) / self.std if self.mean is not None else feats
        if zlib.crc32(data) != self.checksums[u]:
            raise CorruptRecord(f"{where}: checksum mismatch (key {self.keys[u]})")
        try:
            samples, rate = decode(data)
        except BadAudio as e:
            raise CorruptRecord(f"{where}: {e}") from None
        signal = resample(to_mono(samples), rate, self.config.feature.sample_rate)
        if self.config.output == "waveform":
            return signal
        feats = log_features(signal, self.config.feature)
        if self.mean is not None:
            feats = (feats - self.mean) / self.std
        return feats

    # -- random access ------------------------------------------------------------

    def get(self, key: str) -> dict:
        """Returns one utterance by key through the index: bytes, decoded samples, transcript.

        Reads only the one row group (Parquet) or record (SequenceFile) that holds it.
        """
        if self._by_key is None:
            self._by_key = {k: i for i, k in enumerate(self.keys)}
        if key not in self._by_key:
            raise KeyError(key)
        u = self._by_key[key]
        fs, root = self.ref.open()
        path = f"{root}/{self.manifest['shards'][self.shards[u]]['path']}"
        if self.manifest["format"] == "parquet":
            parquet = pq.ParquetFile(fs.open_input_file(path))
            group = parquet.read_row_group(int(self.row_groups[u]), columns=[F.KEY, F.AUDIO])
            data = group.column(F.AUDIO)[group.column(F.KEY).to_pylist().index(key)].as_py()
        else:
            with fs.open_input_file(path) as f:
                reader = SequenceFileReader(f, name=path)
                data = writable_bytes(reader.value_class, reader.read_at(int(self.offsets[u]))[1])
        samples, rate = decode(data)
        return {"key": key, "audio": data, "samples": samples, "sample_rate": rate,
                "transcript": self.transcripts[u], "duration_s": float(self.durations[u])}


def collate(position: int, epoch: int, items: list[tuple[str, str, float, np.ndarray]], repeated: bool,
            skipped: list[str], output: str) -> dict:
    """Returns a padded batch: features (B, T, F) or waveforms (B, S), with lengths and transcripts."""
    lengths = [len(x) for *_, x in items]
    longest = max(lengths, default=0)
    if output == "features":
        bins = items[0][3].shape[1] if items else 0
        padded = np.zeros((len(items), longest, bins), np.float32)
    else:
        padded = np.zeros((len(items), longest), np.float32)
    for i, (*_, x) in enumerate(items):
        padded[i, :len(x)] = x
    return {"position": position, "epoch": epoch, "keys": [k for k, *_ in items],
            "transcripts": [t for _, t, *_ in items], "durations": [d for _, _, d, _ in items],
            output: torch.from_numpy(padded), "lengths": torch.tensor(lengths, dtype=torch.int64),
            "repeated": repeated, "skipped": skipped}


class ChunkFetcher:
    """Reads the chunks a worker needs, in order, on a background thread; keeps at most `depth` ahead.

    A chunk stays in memory from its read until its last use, then is dropped.
    """

    def __init__(self, ds: ShardDataset, fs, root: str, uses: list[tuple[int, int]]):
        self.ds, self.fs, self.root = ds, fs, root
        self.order = list(dict.fromkeys(uses))
        remaining = defaultdict(int)
        for c in uses:
            remaining[c] += 1
        self.remaining = remaining
        self.ready: dict[tuple[int, int], dict[int, bytes] | BaseException] = {}
        self.files: dict[str, pq.ParquetFile] = {}  # used by the prefetch thread only
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, ds.config.prefetch_chunks))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for chunk in self.order:
            if self.stop.is_set():
                return
            try:
                result = self._read_retrying(chunk)
            except BaseException as e:  # handed to the consumer, which applies the policy
                result = e
            self.queue.put((chunk, result))

    def _where(self, chunk: tuple[int, int]) -> str:
        return f"shard {self.ds.manifest['shards'][chunk[0]]['path']} chunk {chunk[1]}"

    def _read_retrying(self, chunk: tuple[int, int]) -> dict[int, bytes]:
        """Returns `_read(chunk)`, retrying I/O errors with exponential backoff for `retry_seconds`.

        Raises:
            StorageUnavailable: the read still failed when the retry budget ran out.
        """
        deadline = time.monotonic() + self.ds.config.retry_seconds
        delay, attempts = 0.5, 0
        while True:
            attempts += 1
            try:
                return self._read(chunk)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and self._root_answers():
                    raise  # the filesystem answers, so the shard really is missing: no use retrying
                if self.stop.is_set() or time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"{self._where(chunk)}: {self.ds.ref.uri} did not serve it after {attempts} attempt(s) "
                        f"in {self.ds.config.retry_seconds:g} s: {first_line(e)}") from e
                self.files.clear()  # handles may be bound to a dead connection
                self.stop.wait(delay)
                delay = min(delay * 2, 8.0)

    def _root_answers(self) -> bool:
        try:
            return self.fs.get_file_info("/").type == FileType.Directory
        except OSError:
            return False

    def _parquet(self, path: str) -> pq.ParquetFile:
        """Returns the shard's ParquetFile, opened once per fetcher so its footer is read once."""
        if path not in self.files:
            self.files[path] = pq.ParquetFile(self.fs.open_input_file(path))
        return self.files[path]

    def _read(self, chunk: tuple[int, int]) -> dict[int, bytes]:
        """Returns {utterance id: audio bytes} for one chunk."""
        shard, chunk_id = chunk
        ds = self.ds
        path = f"{self.root}/{ds.manifest['shards'][shard]['path']}"
        members = ds.chunk_members(shard, chunk_id)
        by_row = {int(ds.rows[u]): int(u) for u in members}
        if ds.cache_dir:
            name = ds.manifest["shards"][shard]["path"].rsplit("/", 1)[1].rsplit(".", 1)[0]
            cached = self._parquet(f"{self.root}/{ds.cache_dir}/{name}.parquet")
            group = cached.read_row_group(ds.chunk_row_group(shard, chunk_id), columns=[F.FEATURES, F.CHECKSUM])
            feats, crcs = group.column(F.FEATURES), group.column(F.CHECKSUM).to_pylist()
            return {u: (feats[i].as_py(), crcs[i]) for i, (_, u) in enumerate(sorted(by_row.items()))}
        if ds.manifest["format"] == "parquet":
            parquet = self._parquet(path)
            group_start = sum(parquet.metadata.row_group(i).num_rows for i in range(chunk_id))
            audio = parquet.read_row_group(chunk_id, columns=[F.AUDIO]).column(F.AUDIO)
            return {u: audio[row - group_start].as_py() for row, u in by_row.items()}
        by_offset = {int(ds.offsets[u]): int(u) for u in members}
        start, last = min(by_offset), max(by_offset)
        # a record is its lengths, key and value, perhaps after a 20-byte sync marker
        end = last + 64 + len(ds.keys[by_offset[last]].encode()) + int(ds.num_bytes[by_offset[last]])
        with self.fs.open_input_file(path) as f:
            header = SequenceFileReader(f, name=path)
            blob = f.read_at(min(end, f.size()) - start, start)
        reader = header.over(OffsetBytes(blob, start))
        return {by_offset[offset]: writable_bytes(reader.value_class, value)
                for _, value, offset in reader.iter_range(start, last) if offset in by_offset}

    def get(self, chunk: tuple[int, int], u: int) -> bytes | None:
        """Returns the bytes of utterance `u` from `chunk`, waiting for the prefetch thread if needed.

        Raises:
            StorageUnavailable: the chunk could not be read, or nothing arrived for too long.
            CorruptRecord: the chunk was read but could not be parsed.
        """
        patience = self.ds.config.retry_seconds + self.ds.config.stall_seconds
        while chunk not in self.ready:
            try:
                got, result = self.queue.get(timeout=patience)
            except queue.Empty:
                raise StorageUnavailable(f"{self._where(chunk)}: no data from {self.ds.ref.uri} for "
                                         f"{patience:g} s; a read is hanging (is the NameNode or a DataNode "
                                         "stopped?)") from None
            self.ready[got] = result
        result = self.ready[chunk]
        self.remaining[chunk] -= 1
        if self.remaining[chunk] == 0:
            del self.ready[chunk]
        if isinstance(result, StorageUnavailable):
            raise result
        if isinstance(result, BaseException):
            raise CorruptRecord(f"{self._where(chunk)}: cannot read: {first_line(result)}") from result
        return result.get(u)

    def close(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + 1.0
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    return  # stuck in a read that hangs; it is a daemon thread, so leave it behind


def process_alive(pid: int) -> bool:
    """Returns False once `pid` has exited, zombie included (its parent may not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def exit_with_parent(parent_pid: int, _worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: exits this worker when the training process is gone.

    Workers started by a forkserver see the forkserver as their parent, so
    DataLoader's own check never notices that the trainer died; this does.
    """
    def watch() -> None:
        while process_alive(parent_pid):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class ShardLoader:
    """A DataLoader over a ShardDataset that records how far the consumer got, for exact resume."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 2, **kwargs):
        self.dataset, self.num_workers, self.kwargs = dataset, num_workers, kwargs
        self.next_position = dataset.start_position

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.next_position = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        self.dataset.start_position = self.next_position
        context = worker_start_method() if self.num_workers else None
        init = partial(exit_with_parent, os.getpid()) if self.num_workers else None
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            multiprocessing_context=context, persistent_workers=False, worker_init_fn=init,
                            **self.kwargs)
        for batch in loader:
            self.next_position = batch["position"] + 1
            yield batch

    def state_dict(self) -> dict:
        return self.dataset.state_dict(self.next_position)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.next_position = state["position"]
