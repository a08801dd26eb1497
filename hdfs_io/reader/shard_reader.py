"""The per-rank shard reader: a torch IterableDataset streaming planned, decoded, padded batches.

    ds = ShardDataset("hdfs://nn:8020/datasets/train", rank=r, world_size=w)
    loader = ShardLoader(ds, num_workers=2)      # a DataLoader(ds, batch_size=None, ...) that tracks position
    for epoch in range(n):
        loader.set_epoch(epoch)
        for batch in loader: ...                 # batch["features"]: (B, T, F), batch["lengths"], ...
        state = loader.state_dict()              # exactly where this rank is; load_state_dict() resumes

The pipeline, in files: hdfs_io.reader.planner deals the epoch's batches to ranks, from the
index alone -> hdfs_io.reader.work gives each DataLoader worker every k-th of the rank's
positions (so the output order does not depend on k) with just the index fields
those need -> hdfs_io.reader.chunks reads their chunks (Parquet row groups; byte ranges of
about 16 MB in SequenceFiles) in order of first use, prefetched on a thread and
bounded in number -> hdfs_io.reader.batches verifies each record's CRC32, decodes,
down-mixes and resamples, computes features and collates. Errors follow one
policy: "fail" raises CorruptRecord naming shard and row, "skip" drops the
record and counts it. This module holds the rank's side (index, plan, position)
and the loader that hands workers their Work.

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
import itertools
import json
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import sys
import threading
import time
import zlib
from dataclasses import asdict
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
from pyarrow.fs import FileType
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.fs import client_log
from hdfs_io.fs.filesystem import FilesystemRef, hdfs_backend, worker_start_method
from hdfs_io.reader.allocator import keep_freed_memory
from hdfs_io.reader.batches import form_batches, prepare, verified_decode
from hdfs_io.reader.blas_threads import one_blas_thread
from hdfs_io.reader.chunks import (RECORD_COLUMNS, ChunkFetcher, CorruptRecord, Record, Shards, StorageUnavailable,
                                   parquet_rows)
from hdfs_io.reader.decode_ahead import DecodeAhead, a_core_to_spare
from hdfs_io.reader.planner import (BLOCK_UTTERANCES, PLANNER_VERSION, RankPlan, id_dtype, plan_durations,
                                    plan_rank_resumed)
from hdfs_io.reader.rank_index import read_rank_index
from hdfs_io.reader.reader_config import ReaderConfig
from hdfs_io.reader.work import Work, work_for, worker_positions
from hdfs_io.speech.augmentation import AugmentConfig, noise_dataset, speed_drawn, speed_factors
from hdfs_io.speech.feature_stats import feature_stats, packed_config


def planned_durations(cfg: AugmentConfig, seed: int, epoch: int, durations: np.ndarray,
                      ids: np.ndarray | None = None) -> np.ndarray:
    """Returns the durations epoch `epoch` is planned with: each utterance's at its augmented speed, rounded up.

    `ids` are the utterances of `durations` (all of them, in order, when None). Speed f makes
    an utterance of d seconds last d / f. Its waveform travels at its recorded length with its speed;
    played, it lasts at most that long (hdfs_io.speech.speed.perturbed_length).
    """
    if not speed_drawn(cfg, epoch):
        return durations
    out = np.empty(len(durations), np.float32)
    for a in range(0, len(durations), BLOCK_UTTERANCES):  # bounds the hashes' temporaries at 30M utterances
        b = min(len(durations), a + BLOCK_UTTERANCES)
        block_ids = np.arange(a, b) if ids is None else ids[a:b]
        out[a:b] = plan_durations(durations[a:b].astype(np.float64) / speed_factors(cfg, seed, epoch, block_ids))
    return out


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


class ShardDataset(IterableDataset):
    """Rank `rank` of `world_size`'s share of a packed dataset, one epoch at a time."""

    def __init__(self, uri: str, rank: int, world_size: int, config: ReaderConfig = ReaderConfig()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        backend = hdfs_backend() if uri.startswith("hdfs:") else None  # chosen here, for workers too
        self.ref, self.rank, self.world_size, self.config = FilesystemRef(uri, backend), rank, world_size, config
        keep_freed_memory()  # the index's row groups and the plan's blocks: the same sizes, allocated again and again
        ds = open_dataset(uri)
        self.manifest = ds.manifest
        self.sequencefile = ds.manifest["format"] != "parquet"
        # Held for the whole dataset: what the global plan and the chunk reads need, 16 bytes an utterance,
        # read from three columns of the index (hdfs_io.reader.rank_index). Keys, transcripts and checksums
        # come with the audio, chunk by chunk, in the worker that reads it.
        index = read_rank_index(ds)
        self.utterances = len(index)
        self.durations, self.shards, self.rows, self.chunks = index.durations, index.shards, index.rows, index.chunks
        del index
        packed_config(self.manifest)  # checked now; the statistics themselves are read when first needed
        self._stats: tuple[np.ndarray, np.ndarray, str] | None = None
        if config.augment.noise:
            noise_dataset(config.augment.noise)  # checked now (dataset.json only); each worker decodes it once
        # a feature cache holds the clean audio's features: it serves SpecAugment, not a perturbed waveform
        self.cache_dir = (self._feature_cache(ds) if config.output == "features" and config.use_feature_cache
                          and not config.augment.changes_audio else None)
        self.epoch, self.start_position = 0, 0
        self.history: list[tuple[int, list[int]]] = []  # earlier runs of the resumed epoch: (world size, positions)
        self._history_epoch: int | None = None
        self._plans: dict[tuple[int, str], RankPlan] = {}  # by (epoch, history)
        self._cache_chunks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # see _cache_places
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
        from a seeded sample and stored (hdfs_io.speech.feature_stats). ShardLoader asks before it
        starts workers, so they receive them instead of each computing them.
        """
        if self._stats is None:
            stats = feature_stats(open_dataset(self.ref.uri), self.config.feature,
                                  self.shards.astype(np.int64) << 32 | self.chunks, self.read_audio)
            self._stats = (stats.mean, np.maximum(stats.std, 1e-5), stats.source)
        return self._stats

    # -- planning and position ------------------------------------------------

    def _history_of(self, epoch: int) -> list[tuple[int, list[int]]]:
        return self.history if epoch == self._history_epoch else []

    def plan(self, epoch: int) -> RankPlan:
        """Returns this rank's batches for `epoch`; the other ranks' are not kept.

        For the epoch a resume on another world size began in, these are the batches the
        earlier runs left (see hdfs_io.reader.planner, step 5). The plans of the last two epochs asked
        for are kept, so ShardLoader can plan the next epoch while this one is read.
        """
        history = self._history_of(epoch)
        key = (epoch, json.dumps(history))
        if key not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k[0] in (epoch - 1, epoch)}
            durations = planned_durations(self.config.augment, self.config.plan.seed, epoch, self.durations)
            self._plans[key] = plan_rank_resumed(durations, self.shards, self.rows, epoch, self.config.plan,
                                                 history, self.world_size, self.rank, self.chunks)
        return self._plans[key]

    def position(self) -> tuple[int, int, str]:
        """Returns where iteration starts: (epoch, position, the resumed runs it follows), as a hashable key."""
        return self.epoch, self.start_position, json.dumps(self._history_of(self.epoch))

    def __len__(self) -> int:
        return len(self.plan(self.epoch).batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_position = epoch, 0
        self.history, self._history_epoch = [], None

    def _fit(self) -> dict:
        """Returns what a saved position is only valid for: the rank, the plan config and the dataset."""
        shards = hashlib.sha256(" ".join(str(s["checksum"]) for s in self.manifest["shards"]).encode())
        return {"rank": self.rank, "world_size": self.world_size, **asdict(self.config.plan),
                "speeds": list(self.config.augment.speeds), "planner": PLANNER_VERSION,
                "utterances": self.utterances, "shard_checksums": shards.hexdigest()[:16]}

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
                config (batch_seconds, batch_size, window, segments, seed, speed factors) or dataset; the
                message names what changed, since its position would pick other batches.
        """
        changed = self._changed(state)
        if changed:
            raise ValueError(f"the saved reader position does not fit this reader: {', '.join(changed)}")
        self.epoch, self.start_position = state["epoch"], state["position"]
        self.history = [(int(w), [int(x) for x in p]) for w, p in state.get("history", [])]
        self._history_epoch = self.epoch if self.history else None

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

    # -- iteration ----------------------------------------------------------------

    def shards_spec(self) -> Shards:
        """Returns where this dataset's bytes are, for chunk reads in any process."""
        return Shards(self.ref.uri, tuple(s["path"] for s in self.manifest["shards"]), self.sequencefile,
                      self.cache_dir, self.ref.backend, self.manifest["format_version"])

    def work(self, epoch: int, start: int, worker: int, workers: int) -> Work:
        """Returns what DataLoader worker `worker` of `workers` reads of this rank's epoch from `start`."""
        plan = self.plan(epoch)
        return work_for(epoch, plan, worker_positions(len(plan.batches), start, worker, workers, plan.lanes,
                                                      plan.num_lanes),
                        partial(self._fields, epoch))

    def worker_of_last(self, workers: int) -> int:
        """Returns which of `workers` reads this epoch's last position from the start position (0 reads the start)."""
        plan = self.plan(self.epoch)
        last = len(plan.batches) - 1
        if last < self.start_position:
            return workers - 1
        return next(w for w in range(workers) if last in worker_positions(
            len(plan.batches), self.start_position, w, workers, plan.lanes, plan.num_lanes)[-1:])

    def _fields(self, epoch: int, ids: np.ndarray) -> dict:
        """Returns the per-item fields of a Work of `epoch` for index rows `ids` (see hdfs_io.reader.work.Work)."""
        durations = planned_durations(self.config.augment, self.config.plan.seed, epoch, self.durations[ids], ids)
        fields = {"shards": self.shards[ids], "chunks": self.chunks[ids], "rows": self.rows[ids],
                  "durations": durations, "ids": ids.astype(id_dtype(self.utterances))}
        if self.cache_dir:
            fields["cache_groups"], fields["cache_rows"] = self._cache_places(ids)
        return fields

    def _cache_places(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns, for index rows `ids`, their chunk's row group in the feature cache file and their row in it.

        The cache holds a chunk's rows, in row order, as one row group, and a shard's chunks
        in chunk order; the table of chunks it needs (first row, row group) is built once.
        """
        if self._cache_chunks is None:
            codes = self.shards.astype(np.int64) << 32 | self.chunks
            order = np.argsort(codes, kind="stable")
            sorted_codes = codes[order]
            del codes
            starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
            first_rows = np.minimum.reduceat(self.rows[order], starts)
            chunk_codes = sorted_codes[starts]
            del order, sorted_codes
            shard_of = chunk_codes >> 32
            shard_starts = np.flatnonzero(np.r_[True, shard_of[1:] != shard_of[:-1]])
            groups = np.arange(len(chunk_codes)) - np.repeat(shard_starts, np.diff(np.r_[shard_starts, len(shard_of)]))
            self._cache_chunks = (chunk_codes, first_rows, groups.astype(np.int32))
        chunk_codes, first_rows, groups = self._cache_chunks
        at = np.searchsorted(chunk_codes, self.shards[ids].astype(np.int64) << 32 | self.chunks[ids])
        return groups[at], (self.rows[ids] - first_rows[at]).astype(np.int64)

    def __iter__(self) -> Iterator[dict]:
        """Yields this rank's batches from the start position, in this process or a plain DataLoader's workers.

        ShardLoader's workers do not come here: they receive their Work (see WorkStream).
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stats = self.normalization()[:2] if self.config.output == "features" else None
        work = self.work(self.epoch, self.start_position, worker, workers)
        for batch in read_work(self.shards_spec(), self.config, stats, work):
            if info is None:  # in-process iteration tracks its own position
                self.start_position = batch["position"] + 1
            yield batch

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
        for u, record in self._read_rows(fs, root, rows[first:last]):
            if record.key == key:
                where = f"shard {self.manifest['shards'][self.shards[u]]['path']} row {self.rows[u]}"
                samples, rate = verified_decode(record.data, record.checksum, where, key)
                return {"key": key, "id": u, "audio": record.data, "samples": samples, "sample_rate": rate,
                        "transcript": record.transcript, "duration_s": float(self.durations[u])}
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
        for _, record in self._read_rows(fs, root, ids):
            if zlib.crc32(record.data) == record.checksum:
                yield record.data

    def _read_rows(self, fs, root: str, ids: np.ndarray) -> Iterator[tuple[int, Record]]:
        """Yields (id, Record) of utterances `ids`, reading each chunk once (a SequenceFile's: its index rows too)."""
        ids = np.asarray(ids, np.int64)
        spec = self.shards_spec()
        index_rows = {}  # a SequenceFile shard's, read once for all its chunks
        codes = self.shards[ids].astype(np.int64) << 32 | self.chunks[ids]
        for code in np.unique(codes).tolist():
            members = ids[codes == code]
            shard, group = code >> 32, code & 0xFFFFFFFF
            path = f"{root}/{self.manifest['shards'][shard]['path']}"
            rows = self.rows[members].tolist()
            if self.sequencefile:
                if shard not in index_rows:
                    index_rows[shard] = spec.index_rows(fs, root, shard)
                records, _ = index_rows[shard].records(fs, path, rows)
                yield from ((u, records[r]) for u, r in zip(members.tolist(), rows) if r in records)
                continue
            got = parquet_rows(pq.ParquetFile(fs.open_input_file(path)), group, rows, RECORD_COLUMNS)
            yield from zip(members.tolist(), (Record(*fields) for fields in zip(*(got[c] for c in RECORD_COLUMNS))))


def key_hash(key: str) -> int:
    """Returns a 64-bit hash of a key's UTF-8 bytes that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


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


def start_worker(parent_pid: int, log: str, _worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: keeps the HDFS client's Java traces off the terminal, in the training
    process's `log` (`hdfs_io.fs.client_log`), and exits this worker when that process is gone."""
    client_log.send_native_stderr(log)
    exit_with_parent(parent_pid)


def exit_with_parent(parent_pid: int) -> None:
    """Exits this worker when the training process is gone.

    Workers started by a forkserver see the forkserver as their parent, so
    DataLoader's own check never notices that the trainer died; this does.
    """
    def watch() -> None:
        while process_alive(parent_pid):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# What a worker imports: torch, pyarrow, numpy and the reader; pandas, which pyarrow imports at a worker's first
# `to_numpy()`; the JVM-free HDFS client. Once HDFS is open here, workers cannot be forked from this process; they
# fork from a forkserver that has imported these once, so each starts warm and shares its pages. What else a worker
# imports (the main module again, as `__mp_main__`: `trainer.train` adds 0.1 s) it imports on its own.
WORKER_MODULES = ("hdfs_io.reader.shard_reader", "pandas", "hdfs_native.fsspec")


def worker_context() -> multiprocessing.context.BaseContext:
    """Returns the multiprocessing context to start this process's DataLoader workers with.

    Once HDFS is open here, workers start from a forkserver (`worker_start_method`). It is started at
    once, importing WORKER_MODULES while this process goes on (plans, builds its model), so that its
    workers fork warm at the first iteration and share its pages. This sets the process's forkserver
    preload list; a forkserver that already runs keeps the one it started with.
    """
    context = multiprocessing.get_context(worker_start_method())
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(list(WORKER_MODULES))
        multiprocessing.forkserver.ensure_running()
    return context


def read_work(shards: Shards, config: ReaderConfig, stats, work: Work) -> Iterator[dict]:
    """Yields a Work's batches: its chunks read (hdfs_io.reader.chunks), then formed (hdfs_io.reader.batches).

    Each batch also says how many chunks were read while it was formed, how many of those were re-reads, and
    their stored bytes. Decoding ahead reads up to 3 records early, so a chunk may count for the batch before the
    one that needs it; the totals of a Work are exact.
    """
    keep_freed_memory()  # before the fetcher's thread starts: freed chunks stay in this process, not faulted in again
    one_blas_thread()  # this process, and its decoding thread, are the parallelism: no BLAS threads beside them
    ahead = config.decode_ahead and a_core_to_spare()
    fs, root = FilesystemRef(shards.uri, shards.backend).open()
    fetcher = ChunkFetcher(shards, config, fs, root, work)
    to_input = partial(prepare, feature=config.feature, output=config.output, stats=stats, cache_dir=shards.cache_dir,
                       augment=config.augment, seed=config.plan.seed, epoch=work.epoch)
    get = DecodeAhead(fetcher.get, work, shards.where) if ahead else fetcher.get
    reads = rereads = read_bytes = 0
    try:
        for batch in form_batches(work, get, to_input, shards.where, config.on_error, config.output):
            batch["chunk_reads"], reads = fetcher.reads - reads, fetcher.reads  # re-reads included
            batch["chunk_bytes"], read_bytes = fetcher.bytes_read - read_bytes, fetcher.bytes_read  # stored bytes
            batch["chunk_rereads"], rereads = fetcher.rereads - rereads, fetcher.rereads  # read again to bound memory
            batch["worker_pid"], batch["formed_at"] = os.getpid(), time.time()  # wall clock: comparable across processes
            yield batch
    finally:
        if ahead:
            get.close()
        fetcher.close()


IDLE_SECONDS = 1.0  # how long an idle worker waits for Work before ending its task (DataLoader joins for 5 s)


class WorkStream(IterableDataset):
    """What ShardLoader's persistent workers iterate: one endless stream over every iteration's Work.

    The loader puts every worker's Work for an iteration in its inbox, tagged, and sets
    `current` to the tag it reads. A worker reads its Works in tag order, the last batch
    of each marked as its end. It drops a Work whose tag is older than `current` (the consumer moved
    on), and reads a newer one (the next epoch, handed out early) as soon as it is done
    with the current one. The stream never ends, so DataLoader never resets it between
    epochs: the tasks the loader keeps outstanding carry the workers straight into the
    next epoch, and its first batches reach the loader's process before it is asked for.
    Errors travel as items too, so one in a Work read ahead is raised only if that Work
    is read.
    """

    def __init__(self, shards: Shards, config: ReaderConfig, stats, inboxes: list, current):
        self.shards, self.config, self.stats, self.inboxes, self.current = shards, config, stats, inboxes, current
        self._queued: list[tuple[int, Work]] = []

    def _next_work(self, inbox, done: int) -> tuple[int, Work] | None:
        """Returns the oldest Work newer than `done` that is not older than `current`, or None after a second idle."""
        for wait in (0.0, IDLE_SECONDS):
            try:
                self._queued.append(inbox.get(timeout=wait) if wait else inbox.get_nowait())
                while True:
                    self._queued.append(inbox.get_nowait())
            except queue.Empty:
                pass
            wanted = max(int(self.current[0]), done + 1)
            self._queued = [(tag, work) for tag, work in self._queued if tag >= wanted]
            if self._queued:
                return self._queued.pop(0)
        return None

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info().id
        inbox, done = self.inboxes[worker], 0
        while True:
            got = self._next_work(inbox, done)
            if got is None:  # idle: the task ends, so the worker sees a shutdown; the loader drops tag 0
                yield {"tag": 0}
                continue
            (tag, work), done = got, got[0]
            try:
                ended = False
                for sent, batch in enumerate(read_work(self.shards, self.config, self.stats, work), 1):
                    if int(self.current[0]) > tag:
                        break  # the consumer moved on: its batches would be dropped
                    batch["tag"], batch["sent_at"] = tag, time.time()
                    if sent == len(work):  # the last batch ends the Work: an item of its own would take a
                        batch["end"], ended = worker, True  # task, and delay the next Work's first batch by one
                    yield batch
                else:
                    if not ended:  # a Work with no batch
                        yield {"tag": tag, "end": worker}
            except Exception:
                yield {"tag": tag, "error": ExceptionWrapper(where=f"in reader worker {worker}")}


class ShardLoader:
    """A DataLoader over a ShardDataset that records how far the consumer got, for exact resume.

    Its worker processes start once, at the first iteration, and serve every epoch after
    it, so an epoch start costs no process start (and, on HDFS, no JVM start per
    worker). They never see the index or the plan: the loader plans this rank's epoch
    and hands each worker its Work (hdfs_io.reader.work), about 40 bytes per utterance of its
    share. Once an epoch's first batch has arrived, the loader plans the next epoch on a
    thread and hands it out too, so workers go on to it as they finish this one, and the
    next epoch's first batches are formed and handed over before it is asked for.
    Batches arrive as workers finish them and are put back in position order here.
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 2, **kwargs):
        self.dataset, self.num_workers, self.kwargs = dataset, num_workers, kwargs
        self.next_position = dataset.start_position
        self._stream: Iterator[dict] | None = None  # the workers' one endless iteration
        self._early: list[dict] = []  # items of an iteration handed out early, arrived before it began
        self._inboxes: list = []
        self._current = None  # the tag of the iteration workers read, in shared memory
        self._tag = 0
        self._first = 0  # the worker that reads the iteration's first position
        self._ahead: tuple[tuple, int, int] | None = None  # handed out early: (its start position, tag, first worker)
        self._planner: threading.Thread | None = None
        lanes = dataset.config.plan.lanes
        if num_workers > 1 and lanes % num_workers:
            print(f"reader: warning: {num_workers} workers do not divide plan.lanes={lanes}, so workers share "
                  f"chunks and read them again (set lanes to a multiple of num_workers)", file=sys.stderr)
        if num_workers:
            worker_context()  # on HDFS, its forkserver starts now, to import while this process goes on

    def _wait_for_planner(self) -> None:
        if self._planner is not None:
            self._planner.join()
            self._planner = None

    def set_epoch(self, epoch: int) -> None:
        self._wait_for_planner()
        self.dataset.set_epoch(epoch)
        self.next_position = 0

    def __len__(self) -> int:
        self._wait_for_planner()
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        self._wait_for_planner()
        self.dataset.start_position = self.next_position
        if self.dataset.config.output == "features":
            self.dataset.normalization()  # here, once, not in every worker
        if not self.num_workers:
            for batch in DataLoader(self.dataset, batch_size=None, num_workers=0, **self.kwargs):
                self.next_position = batch["position"] + 1
                yield batch
            return
        if self._stream is None:
            self._stream = iter(self._start())
        for i, batch in enumerate(self._in_order(self._hand_out())):
            self.next_position = batch["position"] + 1
            yield batch
            if i == 0:  # once the first batch is taken, so that planning does not delay it
                self._plan_ahead()

    def _in_order(self, tag: int) -> Iterator[dict]:
        """Yields iteration `tag`'s batches in position order, until every worker has ended it."""
        early = [item for item in self._early if item["tag"] >= tag]
        self._early = [item for item in early if item["tag"] > tag]
        arrivals = itertools.chain((item for item in early if item["tag"] == tag), self._stream)
        held: dict[int, dict] = {}
        expected, ended = self.dataset.start_position, 0
        for item in arrivals:
            if item["tag"] != tag:
                if item["tag"] > tag:
                    self._early.append(item)
                continue  # older: the consumer left that iteration
            if "error" in item:
                item["error"].reraise()
            ends = item.pop("end", None) is not None
            if "position" in item:
                held[item["position"]] = item
                while expected in held:
                    yield held.pop(expected)
                    expected += 1
            ended += ends
            if ended == self.num_workers:
                break
        if held:
            raise RuntimeError(f"reader: iteration {tag} ended with batches {sorted(held)} out of order")

    def _start(self) -> DataLoader:
        ds = self.dataset
        context = worker_context()  # again: HDFS may have been opened since (a trainer's checkpoints, say)
        self._inboxes = [context.Queue() for _ in range(self.num_workers)]
        for inbox in self._inboxes:
            # A Work still in an inbox when this process exits is for a worker that is gone; without this the
            # exit waits for it to be sent, forever once it is larger than the pipe (64 KB, ~2,000 utterances).
            inbox.cancel_join_thread()
        self._current = context.Array("q", 1, lock=False)
        stats = ds.normalization()[:2] if ds.config.output == "features" else None
        stream = WorkStream(ds.shards_spec(), ds.config, stats, self._inboxes, self._current)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, multiprocessing_context=context,
                          persistent_workers=True, worker_init_fn=partial(start_worker, os.getpid(), client_log.path()),
                          **self.kwargs)

    def _send(self, epoch: int, start: int, first: int) -> int:
        """Puts every worker's Work of this rank's epoch from `start` in its inbox, worker `first` reading
        position `start`; returns their tag."""
        self._tag += 1
        n = self.num_workers
        for worker, inbox in enumerate(self._inboxes):
            inbox.put((self._tag, self.dataset.work(epoch, start, (worker - first) % n, n)))
        return self._tag

    def _hand_out(self) -> int:
        """Makes the workers read from the dataset's position: the Work handed out early if it fits, else new."""
        ds = self.dataset
        if self._ahead is not None and self._ahead[0] == ds.position():
            _, tag, self._first = self._ahead
        else:
            tag, self._first = self._send(ds.epoch, ds.start_position, 0), 0
        self._current[0] = tag
        self._ahead = None
        return tag

    def _plan_ahead(self) -> None:
        """Plans the next epoch on a thread and hands its Work out, for workers to go on to as they finish this one.

        Its first position goes to the worker after the one that reads this iteration's last,
        which is the first to finish this one: the workers go on round robin, as if the two
        epochs were one.
        """
        ds = self.dataset
        following = ds.epoch + 1
        first = (self._first + ds.worker_of_last(self.num_workers) + 1) % self.num_workers

        def run() -> None:
            self._ahead = ((following, 0, json.dumps([])), self._send(following, 0, first), first)

        self._planner = threading.Thread(target=run, daemon=True, name="reader-plan-ahead")
        self._planner.start()

    def state_dict(self) -> dict:
        return self.dataset.state_dict(self.next_position)

    def load_state_dict(self, state: dict) -> None:
        self._wait_for_planner()
        self.dataset.load_state_dict(state)
        self.next_position = state["position"]

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resumes from every rank's saved state, on this world size or another (ShardDataset.load_state_dicts)."""
        self._wait_for_planner()
        self.dataset.load_state_dicts(states)
        self.next_position = self.dataset.start_position
