"""A DataLoader worker's work for one epoch: where rank and worker enter the reader.

The rank's batches come from hdfs_io.reader.planner. Worker w of k takes whole lanes of the
rank's positions (every k-th position where the plan has no lanes or k does not
divide them); the loader puts batches back in position order, so the output does not
depend on k. A Work holds only those batches' utterances, each with the index fields that
reading, checking and labelling it need. A worker holds nothing per utterance beyond
its own share: it never sees the index or the plan of the whole dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hdfs_io.reader.planner import RankPlan


@dataclass
class Work:
    """Batches to read, in order; item j of batch i is item bounds[i] + j of the per-item arrays."""
    epoch: int
    positions: np.ndarray  # the rank's batch positions, in the order this worker reads them
    repeated: np.ndarray  # bool per batch: whether it repeats an earlier one (counted padding)
    bounds: np.ndarray  # len(positions) + 1 item offsets
    shards: np.ndarray  # per item: shard number, its chunk in that shard, its row in that shard
    chunks: np.ndarray  # and its duration (what the planner used); key, transcript and checksum
    rows: np.ndarray  # come with the chunk
    durations: np.ndarray
    ids: np.ndarray | None = None  # per item: its index row, which augmentation's draws follow
    cache_groups: np.ndarray | None = None  # with a feature cache: the chunk's row group in the cache file,
    cache_rows: np.ndarray | None = None  # and the row's place inside it

    def __len__(self) -> int:
        return len(self.positions)

    def items(self, i: int) -> range:
        return range(int(self.bounds[i]), int(self.bounds[i + 1]))

    def chunk_codes(self) -> np.ndarray:
        """Returns the chunk of every item, in reading order, as shard << 32 | chunk."""
        return self.shards.astype(np.int64) << 32 | self.chunks.astype(np.int64)


def worker_positions(batches: int, start: int, worker: int, workers: int, lanes: np.ndarray | None = None,
                     num_lanes: int = 1) -> np.ndarray:
    """Returns the positions worker `worker` of `workers` reads from `start`, worker 0 reading `start`.

    With the plan's lanes (hdfs_io.reader.planner.with_lanes) and `workers` dividing `num_lanes`,
    a worker reads whole lanes, so whole chunks: the positions whose lane is `worker`
    lanes (mod `workers`) after the lane of `start`. Otherwise every k-th from `start`.
    """
    if lanes is None or num_lanes % workers or start >= batches:
        return np.arange(start + worker, batches, workers, dtype=np.int64)
    after = (lanes[start:].astype(np.int64) - int(lanes[start])) % workers
    return start + np.flatnonzero(after == worker).astype(np.int64)


def work_for(epoch: int, plan: RankPlan, positions: np.ndarray, fields) -> Work:
    """Returns the Work of `positions` of a rank's plan.

    `fields(ids)` returns the per-item fields (a dict of Work's per-item arguments) of
    index rows `ids`; the reader that holds the index supplies it.
    """
    positions = np.asarray(positions, np.int64)
    batches = [plan.batches[p] for p in positions.tolist()]
    bounds = np.zeros(len(batches) + 1, np.int64)
    np.cumsum([len(b) for b in batches], out=bounds[1:])
    ids = np.concatenate(batches).astype(np.int64) if batches else np.empty(0, np.int64)
    repeated = np.array([plan.repeated[p] for p in positions.tolist()], bool)
    return Work(epoch, positions, repeated, bounds, **fields(ids))
