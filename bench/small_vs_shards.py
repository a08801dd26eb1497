"""bench/small_vs_shards: the same corpus read and decoded from HDFS as small files and as shards.

    make cluster-up && . .devcluster/env.sh && python -m bench.small_vs_shards [--utterances 5000]

Both sides use 2 processes and do the same work per utterance (read, decode to
float32, resample to 16 kHz mono): small files, one HDFS open per utterance,
split over a pool of 2 spawned processes; shards, the ShardDataset with 2
DataLoader workers producing waveform batches, for epoch 0 (SortaGrad) and for
epoch 1 (shuffled). Each side runs through both HDFS backends (libhdfs and
hdfs-native), interleaved.

Two figures:
- wall time, shards against small files (goal >= 50x; a loopback HDFS cannot show
  the network round trips and NameNode queueing that make it so on a real cluster);
- the work the NameNode does: client RPCs per 1,000 utterances read, from its
  JMX (`RpcDetailedActivityForPort<rpc port>`: each method's call count, read
  before and after each run; DataNode heartbeats and block reports on the same
  port are left out). Goal: shards >= 100x fewer.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter
from urllib.parse import urlparse

from pyarrow import fs as pafs

from bench.common import bench_args, corpus, median, spark_pack, write_result
from hdfs_io.fs.filesystem import BACKEND_VARIABLE, open_filesystem
from hdfs_io.reader.planner import PlanConfig
from hdfs_io.reader.shard_reader import ReaderConfig, ShardDataset, ShardLoader
from hdfs_io.speech.audio import decode, resample, to_mono
from hdfs_io.upload import upload
from scripts.devcluster import NAMENODE_HTTP_PORT, http_json

PROCESSES = 2
BACKENDS = ("libhdfs", "native")
# What DataNodes, not clients, call on the NameNode's RPC port (DatanodeProtocol).
DATANODE_METHODS = {"SendHeartbeat", "SendLifeline", "BlockReceivedAndDeleted", "BlockReport", "CacheReport",
                    "RegisterDatanode", "VersionRequest", "ErrorReport", "ReportBadBlocks",
                    "CommitBlockSynchronization"}
# conf/hadoop/hadoop-metrics2.properties: JMX serves a metrics snapshot at most this old.
METRICS_PERIOD_S = 1.0


def namenode_calls(rpc_port: int) -> Counter:
    """Returns the NameNode's client RPC counts by method since it started, from its JMX."""
    time.sleep(METRICS_PERIOD_S + 0.5)  # let the snapshot catch up with the calls just made
    bean = http_json(f"http://127.0.0.1:{NAMENODE_HTTP_PORT}/jmx"
                     f"?qry=Hadoop:service=NameNode,name=RpcDetailedActivityForPort{rpc_port}")["beans"][0]
    # Hadoop 3.4 also keeps Overall<Method> (every call) beside Deferred<Method> (its deferred ones) and
    # <Method> (the others); counting only <Method> counts each call once.
    return Counter({name[:-len("NumOps")]: count for name, count in bean.items()
                    if name.endswith("NumOps") and not name.startswith(("Deferred", "Overall"))
                    and name[:-len("NumOps")] not in DATANODE_METHODS})


def counted(run, rpc_port: int) -> tuple[float, Counter]:
    """Runs `run()` (which returns its seconds) and returns (seconds, the client RPCs it caused by method)."""
    before = namenode_calls(rpc_port)
    seconds = run()
    return seconds, namenode_calls(rpc_port) - before


def read_small(uris: list[str]) -> int:
    for uri in uris:
        fs, path = open_filesystem(uri)
        with fs.open_input_file(path) as f:
            samples, rate = decode(f.read())
        resample(to_mono(samples), rate, 16000)
    return len(uris)


def run_small(uris: list[str]) -> float:
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        assert sum(pool.map(read_small, [uris[i::PROCESSES] for i in range(PROCESSES)])) == len(uris)
    return time.perf_counter() - started


def run_shards(uri: str, expected: int, epoch: int) -> float:
    ds = ShardDataset(uri, 0, 1, ReaderConfig(plan=PlanConfig(), output="waveform"))
    started = time.perf_counter()
    loader = ShardLoader(ds, num_workers=PROCESSES)
    loader.set_epoch(epoch)
    count = sum(len(b["keys"]) for b in loader)
    assert count == expected, count
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    if not os.environ.get("HDFS_URI"):
        sys.exit("bench.small_vs_shards: make cluster-up && . .devcluster/env.sh first")
    hdfs = os.environ["HDFS_URI"]
    root = corpus(args.utterances)
    raw = f"{hdfs}/bench/raw"
    assert not upload(str(root), raw, workers=8, progress=False).failed
    packed = f"{hdfs}/bench/packed-reader"
    manifest = spark_pack("local[2]", raw, packed, env=dict(os.environ))
    fs, path = open_filesystem(raw)
    uris = sorted(f"{hdfs}{i.path}" for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.path.endswith(".flac"))
    rpc_port = urlparse(hdfs).port
    sides = {"small_files": lambda: run_small(uris), "shards": lambda: run_shards(packed, manifest["utterances"], 0),
             "shards_shuffled": lambda: run_shards(packed, manifest["utterances"], 1)}
    runs = {f"{side}_{backend}": [] for backend in BACKENDS for side in sides}
    calls: dict[str, list[Counter]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every row alike
        for backend in BACKENDS:
            os.environ[BACKEND_VARIABLE] = backend  # spawned pool processes and workers inherit it
            for side, run in sides.items():
                seconds, by_method = counted(run, rpc_port)
                runs[f"{side}_{backend}"].append(seconds)
                calls[f"{side}_{backend}"].append(by_method)
    n = manifest["utterances"]
    rows = {}
    for name, t in runs.items():
        totals = [sum(c.values()) for c in calls[name]]
        typical = calls[name][totals.index(sorted(totals)[len(totals) // 2])]
        rows[name] = {"median_s": median(t), "runs_s": t, "utterances_per_s": n / median(t),
                      "namenode_rpcs": totals, "namenode_rpcs_per_1000_utterances": 1000 * median(totals) / n,
                      "namenode_rpcs_by_method": dict(typical.most_common())}
    result = {"utterances": n, "processes": PROCESSES, "rows": rows,
              "speedup": {b: rows[f"small_files_{b}"]["median_s"] / rows[f"shards_{b}"]["median_s"]
                          for b in BACKENDS},
              "namenode_rpc_reduction": {f"{side}_{b}": rows[f"small_files_{b}"]["namenode_rpcs_per_1000_utterances"]
                                         / rows[f"{side}_{b}"]["namenode_rpcs_per_1000_utterances"]
                                         for b in BACKENDS for side in ("shards", "shards_shuffled")},
              "goal": "shards >= 50x small files in wall time; >= 100x fewer NameNode RPCs per utterance"}
    path_out = write_result("small_vs_shards", result)
    for name, r in rows.items():
        print(f"{name:20s} {r['median_s']:7.2f} s  {r['utterances_per_s']:7.0f} utt/s  "
              f"{r['namenode_rpcs_per_1000_utterances']:8.1f} NameNode RPCs per 1,000 utterances")
    for b in BACKENDS:
        print(f"{b}: shards / small files = {result['speedup'][b]:.1f}x in wall time, "
              f"{result['namenode_rpc_reduction'][f'shards_{b}']:.0f}x fewer NameNode RPCs in epoch 0 (SortaGrad), "
              f"{result['namenode_rpc_reduction'][f'shards_shuffled_{b}']:.0f}x in epoch 1 (shuffled)")
    print(f"-> {path_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
