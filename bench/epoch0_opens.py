"""bench/epoch0_opens: what bounds epoch 0's shard opens: the batches a rank's loader holds to keep SortaGrad's order.

    python -m bench.epoch0_opens [--sizes 3000000:64] [--workers 4] [--runs 64,128,256]
    python -m bench.epoch0_opens --check DATASET_URI [--workers 4]   # the simulation against a real ShardLoader

Epoch 0 reads batches in duration order, and a duration-layout shard holds one stretch of
durations, so a rank's consecutive batches come from the same shard. Its DataLoader workers
take turns (one batch each, round-robin), so for the batches to reach the trainer in order
while each worker reads whole chunks, the loader holds what arrives early
(ShardLoader._in_order). The planner gives each window's run of batches to one worker
(hdfs_io.reader.planner.run_lanes); every worker of a rank then reads from every shard
of the rank's segments. Giving a worker longer runs, whole windows of one shard up to N
batches in a row, has fewer workers open each shard, and makes the loader hold more.

For each grouping, on bench.locality's synthetic 256 MB shards of 16 MB chunks:
- shard opens by all workers of all ranks / shards (issue 28's goal: <= 3);
- amplification (bytes of chunks read / bytes trained on), worst worker;
- the most batches rank 0's loader holds, simulated as a DataLoader hands them over
  (round-robin over the workers that still have batches), and what that is in float32
  16 kHz audio at the plan's batch_seconds.
`--check` reads epoch 0 of a packed dataset through a real ShardLoader (ranks 0 of 1 and
of 2) and prints the most batches it held beside what the simulation says for its plan.
"""

from __future__ import annotations

import argparse

import numpy as np

import bench.locality as locality
from bench.common import write_result
from hdfs_io.reader.planner import MAX_RUN_BATCHES, PlanConfig, epoch_batches, epoch_deal, positions_of, run_lanes
from hdfs_io.reader.work import worker_positions

SAMPLE_BYTES = 4 * 16000  # a second of float32 audio at 16 kHz


def handed_over(workers: list[list[int]]) -> list[int]:
    """Returns the order a DataLoader hands positions over: one from each worker in turn, skipping the ones with
    none left."""
    queues = [list(reversed(w)) for w in workers if w]
    order = []
    while queues:
        for q in list(queues):
            order.append(q.pop())
            if not q:
                queues.remove(q)
    return order


def most_held(order: list[int]) -> int:
    """Returns the most positions a loader holds at once that receives them in `order` and hands them on in
    position order."""
    expected = min(order, default=0)
    held: set[int] = set()
    most = 0
    for position in order:
        held.add(position)
        while expected in held:
            held.remove(expected)
            expected += 1
        most = max(most, len(held))
    return most


def by_shard(n: int):
    """Returns a run_lanes in place of the planner's: runs of whole windows of one shard, of at most `n` batches
    (a window longer than `n` is a run of its own)."""
    def lanes_of(first: np.ndarray, last: np.ndarray, lanes: int, most: int = MAX_RUN_BATCHES) -> np.ndarray:
        window = np.r_[True, first[1:] != last[:-1]]
        shard = np.r_[True, (first[1:] >> 32) != (last[:-1] >> 32)]
        starts = np.r_[np.flatnonzero(window), len(first)]
        group = np.empty(len(first), np.int64)
        g, begun = 0, 0
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
            if a > begun and (shard[a] or b - begun > n):
                g, begun = g + 1, a
            group[a:b] = g
        return run_lanes(group, group, lanes, len(first) + 1)
    return lanes_of


def row(columns, world: int, workers: int, cfg: PlanConfig, grouping: str) -> dict:
    durations, shards, rows, chunks = columns
    result, _ = locality.epoch_rows(columns, world, workers, 0, cfg, 1 << 30, 20.0, None)
    sequence = epoch_batches(durations, shards, rows, 0, cfg, chunks, world)
    firsts, lengths, of_lane = epoch_deal(0, len(sequence), world, cfg, sequence.seconds())
    positions = np.asarray(positions_of(firsts, lengths, 0, of_lane))
    code = shards.astype(np.int64) << 32 | chunks
    lanes = locality.rank_lanes(sequence, positions, code, 0, cfg.lanes)
    held = most_held(handed_over([worker_positions(len(positions), 0, w, workers, lanes, cfg.lanes).tolist()
                                  for w in range(workers)]))
    return {"grouping": grouping, "utterances": len(durations), "world_size": world, "workers": workers,
            "opens_per_shard": result["opens_per_shard"], "small_files_over_opens": result["small_files_over_opens"],
            "amplification_worker_max": result["amplification_worker_max"],
            "amplification_rank_max": result["amplification_rank_max"], "rank0_batches": len(positions),
            "rank0_loader_held_max": held, "held_mb": held * cfg.batch_seconds * SAMPLE_BYTES / 2**20}


def check(uri: str, workers: int) -> int:
    """Prints, for rank 0 of 1 and of 2, the most batches a real ShardLoader held in epoch 0 and the simulation's."""
    from hdfs_io.reader.shard_reader import ShardDataset, ShardLoader

    for world in (1, 2):
        dataset = ShardDataset(uri, 0, world)
        plan = dataset.plan(0)
        positions = [worker_positions(len(plan.batches), 0, w, workers, plan.lanes, plan.num_lanes).tolist()
                     for w in range(workers)]
        simulated = most_held(handed_over(positions))
        loader, arrived = ShardLoader(dataset, num_workers=workers), []
        start = loader._start

        def spied():  # the positions in the order the DataLoader hands them to the loader
            items = start()  # at once: it makes the workers' inboxes

            def handed():
                for item in items:
                    if "position" in item:
                        arrived.append(item["position"])
                    yield item
            return handed()

        loader._start = spied
        for _ in loader:
            pass
        print(f"rank 0 of {world}, {workers} workers, {len(plan.batches)} batches: held at most {most_held(arrived)} "
              f"(simulated {simulated})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="3000000:64", help="UTTERANCES:WORLD,...")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--runs", default="64,128,256", help="longest run of a shard's batches given to one worker")
    p.add_argument("--check", metavar="URI", help="compare the simulation with a real ShardLoader on this dataset")
    args = p.parse_args(argv)
    if args.check:
        return check(args.check, args.workers)
    cfg = PlanConfig()
    out = []
    planner_lanes = locality.run_lanes
    for size in args.sizes.split(","):
        n, world = map(int, size.split(":"))
        columns = locality.synthetic(n, 20.0, 256.0)
        for grouping in ["window (the planner's)"] + [f"shard, <= {r} batches" for r in args.runs.split(",")]:
            locality.run_lanes = planner_lanes if grouping.startswith("window") else by_shard(int(grouping.split()[-2]))
            r = row(columns, world, args.workers, cfg, grouping)
            out.append(r)
            print(f"{n:>10,} utterances, {world} ranks x {args.workers} workers, epoch 0, runs by {grouping}: "
                  f"{r['opens_per_shard']:.2f} opens a shard ({r['small_files_over_opens']:.0f}x fewer than small "
                  f"files), amplification max {r['amplification_worker_max']:.3f} a worker, "
                  f"{r['amplification_rank_max']:.3f} a rank; rank 0's loader holds up to "
                  f"{r['rank0_loader_held_max']} of {r['rank0_batches']} batches "
                  f"({r['held_mb']:,.0f} MB of {cfg.batch_seconds:.0f} s float32 batches)", flush=True)
    locality.run_lanes = planner_lanes
    path = write_result("epoch0_opens", {"batch_seconds": cfg.batch_seconds, "rows": out,
                                         "goal": "issue 28: opens <= 3 x shards in every epoch"})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
