"""Read and decode one rank's share of a packed dataset, and report throughput.

    python -m hdfs_io.read DATASET_URI --rank R --world-size W --epoch E [--workers 2] [--batch-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from tqdm import tqdm

from hdfs_io import prog
from hdfs_io.format import dataset_format as F
from hdfs_io.fs import client_log
from hdfs_io.fs.filesystem import FilesystemUnavailable, probe_uri
from hdfs_io.reader.planner import PlanConfig
from hdfs_io.reader.shard_reader import (CorruptRecord, ReaderConfig, ShardDataset, ShardLoader, StorageUnavailable,
                                         error_message)


def peak_rss_mb(worker_pids: set[int]) -> dict[str, float]:
    """Returns the peak RSS of this process and of its largest DataLoader worker (still running), in MB."""
    def vm_hwm(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            return 0.0

    return {"reader": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_worker": max((vm_hwm(p) for p in worker_pids - {os.getpid()}), default=0.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("hdfs_io.read"), description=__doc__.split("\n")[0])
    p.add_argument("dataset")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--batch-seconds", type=float, default=PlanConfig.batch_seconds)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    p.add_argument("--retry-seconds", type=float, default=ReaderConfig.retry_seconds,
                   help="how long to retry a failing read before giving up (default %(default)s)")
    p.add_argument("--stall-seconds", type=float, default=ReaderConfig.stall_seconds,
                   help="how long a read may hang beyond the retries before giving up (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--keys-out", type=argparse.FileType("w"),
                   help="write every key read, one JSON string per line, for auditing")
    args = p.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        p.error("--rank must be in [0, --world-size)")
    try:
        config = ReaderConfig(plan=PlanConfig(batch_seconds=args.batch_seconds, seed=args.seed),
                              on_error=args.on_error, retry_seconds=args.retry_seconds,
                              stall_seconds=args.stall_seconds)
        probe_uri(args.dataset)
        ds = ShardDataset(args.dataset, args.rank, args.world_size, config)
    except (F.DatasetError, FilesystemUnavailable, PermissionError, ValueError) as e:
        print(f"read: error: {e}", file=sys.stderr)
        return 2
    loader = ShardLoader(ds, num_workers=args.workers)  # on HDFS, its workers' forkserver starts while this plans
    loader.set_epoch(args.epoch)
    planned_at = time.perf_counter()
    batches = len(ds)  # plans this rank's share of the epoch
    plan_s = time.perf_counter() - planned_at
    utterances = skipped = repeated = rereads = reads = read_bytes = 0
    audio_s = 0.0
    first_batch_s = None
    worker_pids: set[int] = set()
    started = time.perf_counter()
    try:
        for batch in tqdm(loader, total=batches, unit="batch", file=sys.stderr, desc=f"rank {args.rank}",
                          disable=args.json or not sys.stderr.isatty()):
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
            utterances += len(batch["keys"])
            reads += batch["chunk_reads"]
            read_bytes += batch["chunk_bytes"]
            worker_pids.add(batch["worker_pid"])
            if args.keys_out:
                args.keys_out.writelines(json.dumps(k) + "\n" for k in batch["keys"])
            audio_s += sum(batch["durations"])
            skipped += len(batch["skipped"])
            repeated += len(batch["keys"]) if batch["repeated"] else 0
            rereads += batch["chunk_rereads"]
    except (CorruptRecord, StorageUnavailable) as e:
        print(f"read: error: {error_message(e)}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - started
    result = {"rank": args.rank, "world_size": args.world_size, "epoch": args.epoch, "batches": batches,
              "hdfs_backend": ds.ref.backend,
              "utterances": utterances, "repeated": repeated, "skipped": skipped, "chunk_reads": reads,
              "chunk_rereads": rereads, "chunk_bytes": read_bytes, "plan_seconds": plan_s,
              "first_batch_seconds": first_batch_s,
              "peak_rss_mb": peak_rss_mb(worker_pids), "audio_seconds": audio_s,
              "wall_seconds": wall, "utterances_per_s": utterances / wall, "audio_seconds_per_s": audio_s / wall}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"read: rank {args.rank}/{args.world_size} epoch {args.epoch}: {utterances} utterances "
              f"({audio_s / 3600:.3f} h) in {wall:.1f} s: {result['utterances_per_s']:.0f} utt/s, "
              f"{result['audio_seconds_per_s']:.0f} audio-s/s; {repeated} repeated, {skipped} skipped, "
              f"{rereads} chunks read again to bound memory")
    return 0


if __name__ == "__main__":
    client_log.send_native_stderr()  # the HDFS client's Java traces go to a log, not the terminal
    sys.exit(main())
