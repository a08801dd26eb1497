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

import hashlib
import json
import multiprocessing
import os
import posixpath
import queue
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.fs import FileType
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hdfs_io import dataset_format as F
from hdfs_io.audio import BadAudio, decode, resample, to_mono
from hdfs_io.dataset import open_dataset
from hdfs_io.feature_stats import feature_stats, packed_config
from hdfs_io.features import FeatureConfig, log_features
from hdfs_io.filesystem import FilesystemRef, first_line, worker_start_method
from hdfs_io.plan import PLANNER_VERSION, PlanConfig, RankPlan, index_columns, plan_durations, plan_rank_resumed
from hdfs_io.sequencefile import OffsetBytes, SequenceFileReader, writable_bytes


class CorruptRecord(RuntimeError):
    """A record failed its checksum or could not be decoded; the message names shard and row."""


class StorageUnavailable(RuntimeError):
    """A shard could not be read within the retry budget; the message names the filesystem and shard."""


class Record(NamedTuple):
    """One utterance as read from its chunk."""
    key: str
    transcript: str
    data: bytes | tuple[bytes, int]  # audio bytes, or (float16 features, CRC32) from the feature cache


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
    max_held_chunks: int = 32  # chunks kept between uses; past it one is dropped and read again when needed
    retry_seconds: float = 60.0  # how long a failing read is retried, with backoff, before StorageUnavailable
    stall_seconds: float = 120.0  # how long a read may hang (beyond retry_seconds) before StorageUnavailable
    use_feature_cache: bool = True  # read features-<digest>/ instead of decoding, when it matches `feature`

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")
        if self.output not in ("features", "waveform"):
            raise ValueError(f"output must be 'features' or 'waveform', not {self.output!r}")
        if self.prefetch_chunks < 1 or self.max_held_chunks < 1:
            raise ValueError("prefetch_chunks and max_held_chunks must be at least 1")
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
        self.sequencefile = ds.manifest["format"] != "parquet"
        # Held for the whole dataset: the numeric columns a global plan and the chunk reads need, about
        # 40 bytes an utterance. Keys and transcripts come with the audio, chunk by chunk, except a
        # SequenceFile's transcripts: its records hold only key and audio.
        text = [F.KEY, F.TRANSCRIPT] if self.sequencefile else []
        index = ds.index([F.DURATION_S, F.SHARD, F.ROW, F.ROW_GROUP, F.OFFSET, F.NUM_BYTES, F.CHECKSUM, *text])
        self.utterances = index.num_rows
        durations, self.shards, self.rows = index_columns(index)
        self.durations = plan_durations(durations)  # float32, rounded up: what the planner works with
        self.checksums = index.column(F.CHECKSUM).to_numpy()
        self.chunks = F.chunk_ids(self.manifest["format"], index.column(F.ROW_GROUP).to_numpy(),
                                  index.column(F.OFFSET).to_numpy())
        if self.sequencefile:
            self.offsets = index.column(F.OFFSET).to_numpy()
            self.record_bytes = (index.column(F.NUM_BYTES).to_numpy()
                                 + pc.binary_length(index.column(F.KEY)).to_numpy())
            self.transcripts = index.column(F.TRANSCRIPT).combine_chunks()
        del index
        packed_config(self.manifest)  # checked now; the statistics themselves are read when first needed
        self._stats: tuple[np.ndarray, np.ndarray, str] | None = None
        self.cache_dir = self._feature_cache(ds) if config.output == "features" and config.use_feature_cache else None
        self.epoch, self.start_position = 0, 0
        self.history: list[tuple[int, list[int]]] = []  # earlier runs of the resumed epoch: (world size, positions)
        self._history_epoch: int | None = None
        self._shared_position = None  # (epoch, start position) for persistent workers: see share_position
        self._plan: tuple[int, RankPlan] | None = None
        self._members: dict[tuple[int, int], np.ndarray] | None = None
        self._cache_row_groups: dict[tuple[int, int], int] | None = None
        self._keys: tuple[np.ndarray, np.ndarray] | None = None  # for get(): sorted key hashes, index rows

    def _feature_cache(self, ds) -> str | None:
        """Returns the feature cache folder for this reader's feature config, if a complete one exists."""
        folder = F.feature_cache_dir(self.config.feature.digest())
        path = f"{ds.path}/{folder}/{F.FEATURE_CACHE_MANIFEST}"
        if ds.fs.get_file_info(path).type == FileType.NotFound:  # asked first: libhdfs prints a failed open's trace
            return None
        try:
            with ds.fs.open_input_stream(path) as f:
                cache = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        # a cache written before it held transcripts lacks "columns": decode instead
        complete = cache.get("utterances") == self.utterances and cache.get("columns") == F.FEATURE_SCHEMA.names
        return folder if complete else None

    def normalization(self) -> tuple[np.ndarray, np.ndarray, str]:
        """Returns the per-bin feature (mean, std) for this reader's feature config, and where they came from.

        dataset.json's, or those stored beside the dataset for this config, or computed once
        from a seeded sample and stored (hdfs_io.feature_stats). ShardLoader asks before it
        starts workers, so they receive them instead of each computing them.
        """
        if self._stats is None:
            stats = feature_stats(open_dataset(self.ref.uri), self.config.feature,
                                  self.shards.astype(np.int64) << 32 | self.chunks, self.read_audio)
            self._stats = (stats.mean, np.maximum(stats.std, 1e-5), stats.source)
        return self._stats

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
        if self._cache_row_groups is None:
            self.chunk_members(shard, chunk)
            self._cache_row_groups, previous, rank = {}, None, 0
            for s, c in sorted(self._members):
                rank = rank + 1 if s == previous else 0
                self._cache_row_groups[(s, c)], previous = rank, s
        return self._cache_row_groups[(shard, chunk)]

    # -- planning and position ------------------------------------------------

    def plan(self, epoch: int) -> RankPlan:
        """Returns this rank's batches for `epoch`; the other ranks' are not kept.

        For the epoch a resume on another world size began in, these are the batches the
        earlier runs left (see hdfs_io.plan, step 5).
        """
        if self._plan is None or self._plan[0] != epoch:
            self._plan = None  # free the previous epoch's plan before making the next
            history = self.history if epoch == self._history_epoch else []
            self._plan = (epoch, plan_rank_resumed(self.durations, self.shards, self.rows, epoch, self.config.plan,
                                                   history, self.world_size, self.rank))
        return self._plan[1]

    def __len__(self) -> int:
        return len(self.plan(self.epoch).batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_position = epoch, 0
        self.history, self._history_epoch = [], None

    def _fit(self) -> dict:
        """Returns what a saved position is only valid for: the rank, the plan config and the dataset."""
        shards = hashlib.sha256(" ".join(str(s["checksum"]) for s in self.manifest["shards"]).encode())
        return {"rank": self.rank, "world_size": self.world_size, **asdict(self.config.plan),
                "planner": PLANNER_VERSION, "utterances": self.utterances, "shard_checksums": shards.hexdigest()[:16]}

    def state_dict(self, next_position: int | None = None) -> dict:
        history = self.history if self._history_epoch == self.epoch else []
        return {"epoch": self.epoch, "position": self.start_position if next_position is None else next_position,
                "history": [[w, list(p)] for w, p in history], **self._fit()}

    def _changed(self, state: dict, ignore: tuple[str, ...] = ()) -> list[str]:
        # a key the state lacks came with a later version; only the planner's own version must be there
        return [f"{k} {state.get(k)!r} -> {v!r}" for k, v in self._fit().items()
                if k not in ignore and (k in state or k == "planner") and state.get(k) != v]

    def load_state_dict(self, state: dict) -> None:
        """Resumes at a position this rank saved, in a run of the same world size.

        Raises:
            ValueError: the state was saved by a reader with another rank, world size, plan
                config (batch_seconds, batch_size, window, segments, seed) or dataset; the
                message names what changed, since its position would pick other batches.
        """
        changed = self._changed(state)
        if changed:
            raise ValueError(f"the saved reader position does not fit this reader: {', '.join(changed)}")
        self.epoch, self.start_position = state["epoch"], state["position"]
        self.history = [(int(w), [int(x) for x in p]) for w, p in state.get("history", [])]
        self._history_epoch = self.epoch if self.history else None
        self._plan = None

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resumes from the positions every rank of a run saved, on this run's world size.

        On the same world size each rank goes on from its own position. On another, the
        batches of the epoch that no rank had read are dealt afresh to this run's ranks,
        so the epoch is read once over both runs and every rank gets the same count.

        Raises:
            ValueError: the states disagree with each other, or were saved with another plan
                config or dataset (named in the message).
        """
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        changed = self._changed(dict(states[0], world_size=len(states)), ignore=("rank", "world_size"))
        epochs = {(s["epoch"], json.dumps(s.get("history", []))) for s in states}
        if changed or len(epochs) != 1:
            what = ", ".join(changed) or "the saved ranks are at different epochs"
            raise ValueError(f"the saved reader positions do not fit this reader: {what}")
        history = [(int(w), [int(x) for x in p]) for w, p in states[0].get("history", [])]
        self.epoch, self.start_position = states[0]["epoch"], 0
        self.history = history + [(len(states), [int(s["position"]) for s in states])]
        self._history_epoch = self.epoch
        self._plan = None

    # -- iteration ----------------------------------------------------------------

    def share_position(self, context) -> None:
        """Makes the epoch and start position reach DataLoader workers that persist across epochs.

        A persistent worker keeps the copy of this dataset it was started with, so what
        set_epoch and load_state_dict change in the parent travels through a small
        shared array, written by `publish_position` before each iteration.
        """
        self._shared_position = context.Array("q", 2, lock=False)

    def publish_position(self) -> None:
        self._shared_position[0], self._shared_position[1] = self.epoch, self.start_position

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = ((int(self._shared_position[0]), int(self._shared_position[1]))
                        if info is not None and self._shared_position is not None else (self.epoch, self.start_position))
        mine = self.plan(epoch)
        positions = list(range(start + worker, len(mine.batches), workers))
        if info is None:  # in-process iteration tracks its own position
            for batch in self._batches(epoch, positions, mine):
                self.start_position = batch["position"] + 1
                yield batch
        else:
            yield from self._batches(epoch, positions, mine)

    def _batches(self, epoch: int, positions: list[int], mine: RankPlan) -> Iterator[dict]:
        fs, root = self.ref.open()
        ids = np.concatenate([mine.batches[p] for p in positions]) if positions else np.empty(0, np.int64)
        fetcher = ChunkFetcher(self, fs, root, self.shards[ids].astype(np.int64) << 32 | self.chunks[ids])
        try:
            for p in positions:
                rereads, reads = fetcher.rereads, fetcher.reads
                batch = self._collate(epoch, p, mine.batches[p], mine.repeated[p], fetcher)
                batch["chunk_reads"] = fetcher.reads - reads  # chunks this batch waited for, re-reads included
                batch["chunk_rereads"] = fetcher.rereads - rereads  # chunks read again to bound memory
                yield batch
        finally:
            fetcher.close()

    def _collate(self, epoch: int, position: int, ids: np.ndarray, repeated: bool, fetcher: "ChunkFetcher") -> dict:
        items, skipped = [], []
        for u in ids:
            u = int(u)
            try:  # one policy for a damaged chunk and a damaged record alike
                record = fetcher.get((int(self.shards[u]), int(self.chunks[u])), u)
                items.append((record.key, record.transcript, float(self.durations[u]), self._prepare(u, record)))
            except CorruptRecord as e:
                if self.config.on_error == "fail":
                    raise
                skipped.append(str(e))
        batch = collate(position, epoch, items, repeated, skipped, self.config.output)
        batch["worker_pid"] = os.getpid()
        return batch

    def _prepare(self, u: int, record: Record | None) -> np.ndarray:
        where = f"shard {self.manifest['shards'][self.shards[u]]['path']} row {self.rows[u]}"
        if record is None:
            raise CorruptRecord(f"{where}: record missing from its chunk")
        data = record.data
        if isinstance(data, tuple):  # from the feature cache: float16 features and their CRC32
            feats, crc = data
            if zlib.crc32(feats) != crc:
                raise CorruptRecord(f"{self.cache_dir}/ {where}: feature checksum mismatch (key {record.key})")
            feats = np.frombuffer(feats, "<f2").reshape(-1, self.config.feature.num_bins).astype(np.float32)
            mean, std, _ = self.normalization()
            return (feats - mean) / std
        samples, rate = verified_decode(data, int(self.checksums[u]), where, record.key)
        signal = resample(to_mono(samples), rate, self.config.feature.sample_rate)
        if self.config.output == "waveform":
            return signal
        mean, std, _ = self.normalization()
        return (log_features(signal, self.config.feature) - mean) / std

    # -- random access ------------------------------------------------------------

    def get(self, key: str) -> dict:
        """Returns one utterance by key through the index: bytes, decoded samples, transcript.

        Finds the key's index row by a stable hash of its bytes (a table of 16 bytes an
        utterance, built on the first call from the index's key column, the same in every
        process it is pickled into), then reads only the one row group (Parquet) or record
        (SequenceFile) that holds it, and checks its CRC32.

        Raises:
            KeyError: no utterance has this key.
            CorruptRecord: its bytes fail their checksum or do not decode.
        """
        fs, root = self.ref.open()
        hashes, rows = self._key_hashes(fs, root)
        wanted = key_hash(key)
        first, last = np.searchsorted(hashes, wanted, "left"), np.searchsorted(hashes, wanted, "right")
        # almost always one candidate; more only when 64-bit hashes collide
        for u, found, data, transcript in self._read_rows(fs, root, rows[first:last]):
            if found == key:
                where = f"shard {self.manifest['shards'][self.shards[u]]['path']} row {self.rows[u]}"
                samples, rate = verified_decode(data, int(self.checksums[u]), where, key)
                return {"key": key, "audio": data, "samples": samples, "sample_rate": rate,
                        "transcript": transcript, "duration_s": float(self.durations[u])}
        raise KeyError(key)

    def _key_hashes(self, fs, root: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns (the hashes of all keys, sorted; the index row of each), built once per process."""
        if self._keys is None:
            hashes = np.empty(self.utterances, np.int64)
            start = 0
            for batch in pq.ParquetFile(fs.open_input_file(f"{root}/{F.INDEX}")).iter_batches(columns=[F.KEY]):
                hashes[start:start + batch.num_rows] = np.fromiter(map(key_hash, batch.column(0).to_pylist()),
                                                                   np.int64, batch.num_rows)
                start += batch.num_rows
            order = np.argsort(hashes, kind="stable")
            self._keys = (hashes[order], order)
        return self._keys

    def read_audio(self, ids: np.ndarray) -> Iterator[bytes]:
        """Yields the audio bytes of utterances `ids` that pass their CRC32 check, one read per chunk."""
        fs, root = self.ref.open()
        for u, _, data, _ in self._read_rows(fs, root, ids):
            if zlib.crc32(data) == self.checksums[u]:
                yield data

    def _read_rows(self, fs, root: str, ids: np.ndarray) -> Iterator[tuple[int, str, bytes, str]]:
        """Yields (id, key, audio bytes, transcript) of utterances `ids`, reading each Parquet row group once
        (a SequenceFile: each record alone)."""
        ids = np.asarray(ids, np.int64)
        if self.sequencefile:
            for u in ids.tolist():
                path = f"{root}/{self.manifest['shards'][self.shards[u]]['path']}"
                with fs.open_input_file(path) as f:
                    reader = SequenceFileReader(f, name=path)
                    key, value = reader.read_at(int(self.offsets[u]))
                yield (u, writable_bytes(reader.key_class, key).decode("utf-8"),
                       writable_bytes(reader.value_class, value), self.transcripts[u].as_py())
            return
        codes = self.shards[ids].astype(np.int64) << 32 | self.chunks[ids]
        for code in np.unique(codes).tolist():
            members = ids[codes == code]
            shard, group = code >> 32, code & 0xFFFFFFFF
            path = f"{root}/{self.manifest['shards'][shard]['path']}"
            rows = parquet_rows(pq.ParquetFile(fs.open_input_file(path)), group, self.rows[members].tolist(),
                                [F.KEY, F.AUDIO, F.TRANSCRIPT])
            yield from zip(members.tolist(), rows[F.KEY], rows[F.AUDIO], rows[F.TRANSCRIPT])


def verified_decode(data: bytes, crc: int, where: str, key: str) -> tuple[np.ndarray, int]:
    """Returns the decoded (samples, rate) of audio bytes that match their CRC32.

    Raises:
        CorruptRecord: naming `where` and the key, if the bytes fail their checksum or do not decode.
    """
    if zlib.crc32(data) != crc:
        raise CorruptRecord(f"{where}: checksum mismatch (key {key})")
    try:
        return decode(data)
    except BadAudio as e:
        raise CorruptRecord(f"{where}: {e}") from None


def key_hash(key: str) -> int:
    """Returns a 64-bit hash of a key's UTF-8 bytes that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def parquet_rows(parquet: pq.ParquetFile, group: int, rows: list[int], columns: list[str]) -> dict[str, list]:
    """Returns `columns` of the given shard rows, all in row group `group`, as lists in `rows` order."""
    group_start = sum(parquet.metadata.row_group(i).num_rows for i in range(group))
    table = parquet.read_row_group(group, columns=columns)
    return table.take(np.asarray(rows, np.int64) - group_start).to_pydict()


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
    At most `max_held_chunks` are held: past that, the one needed again last is
    dropped and read again when needed (a plan that reads chunks far out of
    order, such as SortaGrad over a shuffled layout, costs reads, not memory).
    A shard's file is closed after its last chunk is read, since an open
    Parquet file keeps the buffers of its last read.
    """

    def __init__(self, ds: ShardDataset, fs, root: str, uses: np.ndarray):
        """`uses`: the chunk of every utterance the worker will read, in order, as shard << 32 | chunk id."""
        self.ds, self.fs, self.root = ds, fs, root
        codes, first, inverse, counts = np.unique(uses, return_index=True, return_inverse=True, return_counts=True)
        chunks = [(int(c >> 32), int(c & 0xFFFFFFFF)) for c in codes]
        self.order = [chunks[i] for i in np.argsort(first)]
        self.remaining = dict(zip(chunks, counts.tolist()))
        by_chunk, ends = np.argsort(inverse, kind="stable"), np.cumsum(counts)
        self.use_positions = {c: by_chunk[end - n:end] for c, n, end in zip(chunks, counts, ends)}
        self.used = 0  # uses served so far: the position in `uses`
        self.last_of_shard = {shard: i for i, (shard, _) in enumerate(self.order)}
        self.ready: dict[tuple[int, int], dict[int, Record] | BaseException] = {}
        self.dropped: set[tuple[int, int]] = set()
        self.rereads = 0
        self.reads = 0  # chunks handed over by the prefetch thread or read again, so far
        self.local = threading.local()  # open files, per thread: the prefetch thread's and re-reads'
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, ds.config.prefetch_chunks))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _files(self) -> dict[str, pq.ParquetFile]:
        return self.local.__dict__.setdefault("files", {})

    def _run(self) -> None:
        for i, chunk in enumerate(self.order):
            if self.stop.is_set():
                return
            result = self._read_or_error(chunk)
            if self.last_of_shard[chunk[0]] == i:
                for path in self._paths(chunk[0]):
                    self._files().pop(path, None)
            self.queue.put((chunk, result))

    def _read_or_error(self, chunk: tuple[int, int]) -> dict[int, Record] | BaseException:
        try:
            return self._read_retrying(chunk)
        except BaseException as e:  # handed to the consumer, which applies the policy
            return e

    def _where(self, chunk: tuple[int, int]) -> str:
        unit = "byte range" if self.ds.sequencefile else "row group"
        return f"shard {self.ds.manifest['shards'][chunk[0]]['path']} {unit} {chunk[1]}"

    def _read_retrying(self, chunk: tuple[int, int]) -> dict[int, bytes]:
        """Returns `_read(chunk)`, retrying I/O errors with exponential backoff for `retry_seconds`.

        A failed read whose raw bytes the filesystem does serve (a damaged Parquet page
        or footer) is damage, not an outage: it is not retried.

        Raises:
            StorageUnavailable: the read still failed when the retry budget ran out.
            CorruptRecord: the chunk's bytes were served but could not be parsed.
        """
        deadline = time.monotonic() + self.ds.config.retry_seconds
        delay, attempts, damaged = 0.5, 0, False
        while True:
            attempts += 1
            try:
                return self._read(chunk)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and self._root_answers():
                    raise  # the filesystem answers, so the shard really is missing: no use retrying
                # Parquet only: a SequenceFile's parse errors are not OSErrors. Twice in a row, so that a
                # read that failed and recovered just before the probe is not taken for damage.
                if not isinstance(e, FileNotFoundError) and not self.ds.sequencefile and self._bytes_served(chunk):
                    served_twice = damaged
                    damaged = True
                    if served_twice:
                        raise CorruptRecord(f"{self._where(chunk)}: damaged: {first_line(e)}") from e
                    self._files().clear()
                    continue
                damaged = False
                if self.stop.is_set() or time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"{self._where(chunk)}: {self.ds.ref.uri} did not serve it after {attempts} attempt(s) "
                        f"in {self.ds.config.retry_seconds:g} s: {first_line(e)}") from e
                self._files().clear()  # handles may be bound to a dead connection
                self.stop.wait(delay)
                delay = min(delay * 2, 8.0)

    def _bytes_served(self, chunk: tuple[int, int]) -> bool:
        """Returns True if the filesystem serves the raw bytes of `chunk` now.

        Those are its row group's column chunks when the shard's footer was parsed,
        else the footer itself; a Parquet read that failed on bytes that are served
        failed on their content.
        """
        path, cache_path = self._paths(chunk[0])
        path = cache_path or path
        parsed = self._files().get(path)
        try:
            with self.fs.open_input_file(path) as f:
                size = f.size()
                if parsed is None or self.ds.sequencefile:
                    start, length = max(0, size - 2**16), min(size, 2**16)
                else:
                    group = self.ds.chunk_row_group(*chunk) if cache_path else chunk[1]
                    columns = [parsed.metadata.row_group(group).column(i)
                               for i in range(parsed.metadata.num_columns)]
                    start = min(c.dictionary_page_offset or c.data_page_offset for c in columns)
                    length = min(sum(c.total_compressed_size for c in columns), size - start)
                return len(f.read_at(length, start)) == length
        except OSError:
            return False
        except Exception:  # the parsed footer does not describe this chunk: the shard is damaged
            return True

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

    def _paths(self, shard: int) -> tuple[str, str | None]:
        """Returns the shard's file and its feature cache file (None without a cache)."""
        name = self.ds.manifest["shards"][shard]["path"]
        if not self.ds.cache_dir:
            return f"{self.root}/{name}", None
        stem = posixpath.splitext(posixpath.basename(name))[0]
        return f"{self.root}/{name}", f"{self.root}/{self.ds.cache_dir}/{stem}.parquet"

    def _read(self, chunk: tuple[int, int]) -> dict[int, Record]:
        """Returns {utterance id: its record} for one chunk."""
        shard, chunk_id = chunk
        ds = self.ds
        path, cache_path = self._paths(shard)
        members = ds.chunk_members(shard, chunk_id)
        if cache_path:  # the cache's row group holds the chunk's rows in row order; the audio is not read
            ids = sorted((int(u) for u in members), key=lambda u: ds.rows[u])
            columns = [F.KEY, F.TRANSCRIPT, F.FEATURES, F.CHECKSUM]
            cached = self._parquet(cache_path).read_row_group(ds.chunk_row_group(shard, chunk_id), columns=columns)
            return {u: Record(key, text, (feats, crc)) for u, (key, text, feats, crc)
                    in zip(ids, zip(*(cached.column(c).to_pylist() for c in columns)))}
        if not ds.sequencefile:
            ids = [int(u) for u in members]
            group = parquet_rows(self._parquet(path), chunk_id, [ds.rows[u] for u in ids],
                                 [F.KEY, F.TRANSCRIPT, F.AUDIO])
            return {u: Record(*fields) for u, *fields in zip(ids, group[F.KEY], group[F.TRANSCRIPT], group[F.AUDIO])}
        by_offset = {int(ds.offsets[u]): int(u) for u in members}
        start, last = min(by_offset), max(by_offset)
        # a record is its lengths, key and value, perhaps after a 20-byte sync marker
        end = last + 64 + int(ds.record_bytes[by_offset[last]])
        with self.fs.open_input_file(path) as f:
            header = SequenceFileReader(f, name=path)
            blob = f.read_at(min(end, f.size()) - start, start)
        reader = header.over(OffsetBytes(blob, start))
        return {by_offset[offset]: Record(writable_bytes(reader.key_class, key).decode("utf-8"),
                                          ds.transcripts[by_offset[offset]].as_py(),
                                          writable_bytes(reader.value_class, value))
                for key, value, offset in reader.iter_range(start, last) if offset in by_offset}

    def get(self, chunk: tuple[int, int], u: int) -> Record | None:
        """Returns the record of utterance `u` from `chunk`, waiting for the prefetch thread if needed.

        Raises:
            StorageUnavailable: the chunk could not be read, or nothing arrived for too long.
            CorruptRecord: the chunk was read but could not be parsed.
        """
        if chunk in self.dropped:  # dropped to bound memory: read it again, here
            self.dropped.discard(chunk)
            self.rereads += 1
            self.reads += 1
            self.ready[chunk] = self._read_or_error(chunk)
            self._files().clear()
        patience = self.ds.config.retry_seconds + self.ds.config.stall_seconds
        while chunk not in self.ready:
            try:
                got, result = self.queue.get(timeout=patience)
            except queue.Empty:
                raise StorageUnavailable(f"{self._where(chunk)}: no data from {self.ds.ref.uri} for "
                                         f"{patience:g} s; a read is hanging (is the NameNode or a DataNode "
                                         "stopped?)") from None
            self.ready[got] = result
            self.reads += 1
        self._drop_beyond_limit(keep=chunk)
        result = self.ready[chunk]
        self.used += 1
        self.remaining[chunk] -= 1
        if self.remaining[chunk] == 0:
            del self.ready[chunk]
        if isinstance(result, StorageUnavailable):
            raise result
        if isinstance(result, CorruptRecord):
            raise CorruptRecord(str(result)) from result  # once for each of the chunk's records
        if isinstance(result, BaseException):
            raise CorruptRecord(f"{self._where(chunk)}: cannot read: {first_line(result)}") from result
        return result.get(u)

    def _drop_beyond_limit(self, keep: tuple[int, int]) -> None:
        """Drops held chunks, the one needed again last first, until at most `max_held_chunks` are held."""
        def next_use(c: tuple[int, int]) -> int:
            positions = self.use_positions[c]
            return int(positions[np.searchsorted(positions, self.used)])

        while len(self.ready) > max(1, self.ds.config.max_held_chunks):
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
    """A DataLoader over a ShardDataset that records how far the consumer got, for exact resume.

    Its worker processes start once, at the first iteration, and serve every epoch
    after it (persistent_workers): set_epoch and load_state_dict reach them through
    ShardDataset.share_position, so an epoch start costs no process start (and, on
    HDFS, no JVM start per worker).
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 2, **kwargs):
        self.dataset, self.num_workers, self.kwargs = dataset, num_workers, kwargs
        self.next_position = dataset.start_position
        self._loader: DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.next_position = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        self.dataset.start_position = self.next_position
        if self.dataset.config.output == "features":
            self.dataset.normalization()  # here, once, not in every worker
        if self._loader is None:
            if self.num_workers:
                context = multiprocessing.get_context(worker_start_method())
                self.dataset.share_position(context)
                self._loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                          multiprocessing_context=context, persistent_workers=True,
                                          worker_init_fn=partial(exit_with_parent, os.getpid()), **self.kwargs)
            else:
                self._loader = DataLoader(self.dataset, batch_size=None, num_workers=0, **self.kwargs)
        if self.num_workers:
            self.dataset.publish_position()
        for batch in self._loader:
            self.next_position = batch["position"] + 1
            yield batch

    def state_dict(self) -> dict:
        return self.dataset.state_dict(self.next_position)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.next_position = state["position"]

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resumes from every rank's saved state, on this world size or another (ShardDataset.load_state_dicts).

        Call it before the first iteration: persistent workers keep the dataset they started with, and
        after that only the epoch and position reach them, not the history of a re-dealt epoch.
        """
        self.dataset.load_state_dicts(states)
        self.next_position = self.dataset.start_position
