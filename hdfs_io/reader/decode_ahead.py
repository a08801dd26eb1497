"""A Work's records verified and decoded ahead, on a thread of their own, while the last one's features are computed.

CRC32 (zlib), decoding (libsndfile through cffi) and numpy's FFT run in C with the GIL
released, so in a process with a spare core the decode of the next records overlaps the
features of this one: one process reading 5,000 utterances took 1.56x less time on two
cores (bench/README.md, peers). Where every core already has a reading process, the thread
only contends (5% slower with 2 workers on 2 cores), so it runs only where there is a core
to spare (`a_core_to_spare`). `ahead` bounds what is held: that many decoded records, plus
the one being decoded.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

import torch.utils.data

from hdfs_io.reader.batches import Decoded, verified_decode
from hdfs_io.reader.chunks import CorruptRecord, Record
from hdfs_io.reader.work import Work

AHEAD = 2  # records decoded and waiting: enough to cover one record's jitter, each at most a few MB


def a_core_to_spare() -> bool:
    """Returns whether this node has a core for each reading process's decoding thread, beside the processes.

    The processes of a node: each rank's trainer (torchrun's LOCAL_WORLD_SIZE), which reads
    in-process or has DataLoader workers that read (this loader's count is taken for every rank).
    An unreadable LOCAL_WORLD_SIZE counts as one rank.
    """
    worker = torch.utils.data.get_worker_info()
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    if worker is None:
        return 2 * ranks <= len(os.sched_getaffinity(0))  # each trainer reads, and its thread decodes
    return ranks + 2 * ranks * worker.num_workers <= len(os.sched_getaffinity(0))


class DecodeAhead:
    """`get(item)` for a Work's items asked for in order, each returned with its audio already decoded.

    A record whose audio fails its checksum or does not decode raises its CorruptRecord when its
    item is asked for, as anything `get` raised for it does, so the error policy sees what it saw
    without this thread. Feature-cache records and missing ones pass through as they came.
    """

    def __init__(self, get: Callable[[int], Record | None], work: Work, where: Callable[[int, int], str],
                 ahead: int = AHEAD):
        self.get, self.work, self.where = get, work, where
        self.results: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="decode-ahead")
        self.thread.start()

    def _run(self) -> None:
        for i in range(len(self.work)):
            for item in self.work.items(i):
                if self.stop.is_set():
                    return
                try:
                    done = (item, self._decoded(item), None)
                except BaseException as e:  # raised where the item is asked for, in the reading thread
                    done = (item, None, e)
                while True:
                    if self.stop.is_set():
                        return
                    try:
                        self.results.put(done, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if done[2] is not None and not isinstance(done[2], CorruptRecord):
                    return  # an outage or a bug ends the Work where it is raised: nothing after it is read

    def _decoded(self, item: int) -> Record | None:
        record = self.get(item)
        if record is None or not isinstance(record.data, bytes):
            return record
        where = self.where(int(self.work.shards[item]), int(self.work.rows[item]))
        return record._replace(data=Decoded(*verified_decode(record.data, record.checksum, where, record.key)))

    def __call__(self, item: int) -> Record | None:
        """Returns item `item`'s record, its audio decoded; items must be asked for in the Work's order.

        Raises:
            CorruptRecord, StorageUnavailable, ...: what reading or decoding this item raised.
        """
        while True:
            try:
                done, record, error = self.results.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():  # it stopped early: closed, or past an error already raised
                    raise RuntimeError(f"item {item} asked for after decoding ahead had ended") from None
        if done != item:
            raise RuntimeError(f"item {item} asked for, item {done} decoded: items are read in order")
        if error is not None:
            raise error
        return record

    def close(self) -> None:
        """Stops decoding ahead; a decode under way finishes on the daemon thread and is dropped.

        A read the thread waits for ends when the fetcher is closed (ChunkFetcher._take).
        """
        self.stop.set()
