"""bench/read_amplification: the bytes a real read reads, counted by its fetchers, against the plan's replay.

    python -m bench.read_amplification [--utterances 1000 | --corpus DIR] [--world-size 4] [--workers 2]
        [--epochs 0,1,2] [--row-group-mb 0.25] [--window-utterances 256] [--batch-seconds 30]

The synthetic corpus (espeak-ng voices, as bench.train_quality's) packed as Parquet in
row groups of --row-group-mb, so that each worker reads many chunks. Every rank of
--world-size reads each epoch through ShardLoader with --workers workers, and every
batch says how many stored bytes its worker's ChunkFetcher read for it (`chunk_bytes`:
the column chunks of every row group read, re-reads included). Per worker and per rank,
that count / the stored audio bytes of the utterances it served is the measured
amplification. The replay predicts the same from the plan alone: each worker's Work
(ShardDataset.work) replayed through ChunkFetcher's policy (bench.locality.replay),
its row groups' stored bytes summed. Issue 28: the two must agree, and at scale
(bench.locality) the amplification is <= 1.15. At this size each worker reads few
row groups, so the row groups it shares with a neighbour weigh more than at scale.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench.common import WORK, spark_pack, write_result
from bench.locality import replay
from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.reader.chunks import RECORD_COLUMNS, group_bytes
from hdfs_io.reader.planner import PlanConfig
from hdfs_io.reader.reader_config import ReaderConfig
from hdfs_io.reader.shard_reader import ShardDataset, ShardLoader
from scripts.synth_corpus import DEFAULT_VOICES, librispeech_tree

def stored_bytes(root: str, manifest: dict) -> tuple[dict[str, int], dict[tuple[int, int], int]]:
    """Returns ({key: its audio's stored bytes}, {(shard, row group): its read columns' stored bytes})."""
    audio, groups = {}, {}
    for shard, entry in enumerate(manifest["shards"]):
        parquet = pq.ParquetFile(f"{root}/{entry['path']}")
        table = parquet.read(columns=[F.KEY, F.AUDIO])
        audio.update(zip(table.column(F.KEY).to_pylist(), (len(a) for a in table.column(F.AUDIO).to_pylist())))
        groups.update({(shard, g): group_bytes(parquet, g, RECORD_COLUMNS)
                       for g in range(parquet.metadata.num_row_groups)})
    return audio, groups


def measured(ds: ShardDataset, workers: int, epoch: int, audio: dict[str, int]) -> list[dict]:
    """Reads rank `ds.rank`'s share of `epoch`; returns each worker's keys, in order, and bytes read."""
    loader = ShardLoader(ds, num_workers=workers)
    loader.set_epoch(epoch)
    keys, read = collections.defaultdict(list), collections.Counter()
    for batch in loader:
        keys[batch["worker_pid"]] += batch["keys"]
        read[batch["worker_pid"]] += batch["chunk_bytes"]
    return [{"keys": keys[pid], "read_bytes": read[pid], "trained_bytes": sum(audio[k] for k in keys[pid])}
            for pid in keys]


def predicted(ds: ShardDataset, workers: int, epoch: int, groups: dict, cap: int) -> list[dict]:
    """Returns each worker's utterances (ids, in order), re-reads and bytes read, from its Work replayed."""
    rows = []
    for w in range(workers):
        work = ds.work(epoch, 0, w, workers)
        codes = work.chunk_codes()
        if not len(codes):
            continue
        unique = np.unique(codes)
        reads, rereads = replay(codes, cap)
        rows.append({"ids": work.ids, "rereads": rereads,
                     "read_bytes": sum(groups[(int(c >> 32), int(c & 0xFFFFFFFF))] for c in unique[reads])})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--utterances", type=int, default=1000)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", default="0,1,2")
    p.add_argument("--row-group-mb", type=float, default=0.25)
    p.add_argument("--window-utterances", type=int, default=256)
    p.add_argument("--batch-seconds", type=float, default=30.0)
    p.add_argument("--corpus", help="a LibriSpeech-layout folder to pack instead of synthesizing one "
                                    "(bench.train_quality's bench/work/quality-2000/corpus/train, say)")
    args = p.parse_args(argv)
    base = WORK / f"amplification-{args.utterances}"
    corpus = Path(args.corpus) if args.corpus else base / "corpus"
    dataset = base / f"packed-{corpus.name}-{args.row_group_mb:g}mb"
    if not args.corpus and not (corpus / ".complete").exists():
        librispeech_tree(corpus, args.utterances, DEFAULT_VOICES, seed=21, per_chapter=100)
        (corpus / ".complete").write_text("done\n")
    if not (dataset / ".complete").exists():
        spark_pack("local[2]", str(corpus), str(dataset), "--row-group-mb", str(args.row_group_mb))
        (dataset / ".complete").write_text("done\n")
    manifest = open_dataset(str(dataset)).manifest
    audio, groups = stored_bytes(str(dataset), manifest)
    index_keys = pq.read_table(f"{dataset}/{F.INDEX}", columns=[F.KEY]).column(F.KEY).to_pylist()
    ids = {k: i for i, k in enumerate(index_keys)}  # an utterance's id is its index row
    config = ReaderConfig(plan=PlanConfig(batch_seconds=args.batch_seconds, window_utterances=args.window_utterances))
    rows = []
    for epoch in [int(e) for e in args.epochs.split(",")]:
        for rank in range(args.world_size):
            ds = ShardDataset(str(dataset), rank, args.world_size, config)
            got = measured(ds, args.workers, epoch, audio)
            replayed = predicted(ds, args.workers, epoch, groups, config.max_held_chunks)
            for worker in replayed:  # the measured worker that served the same utterances, in the same order
                match = next(g for g in got if [ids[k] for k in g["keys"]] == worker["ids"].tolist())
                rows.append({"epoch": epoch, "rank": rank, "utterances": len(match["keys"]),
                             "rereads_replayed": worker["rereads"], "read_bytes": match["read_bytes"],
                             "read_bytes_replayed": worker["read_bytes"], "trained_bytes": match["trained_bytes"],
                             "amplification": match["read_bytes"] / match["trained_bytes"],
                             "amplification_replayed": worker["read_bytes"] / match["trained_bytes"]})
    result = {"utterances": len(audio), "world_size": args.world_size, "workers": args.workers,
              "row_group_mb": args.row_group_mb, "row_groups": len(groups), "shards": len(manifest["shards"]),
              "window_utterances": args.window_utterances, "batch_seconds": args.batch_seconds, "rows": rows}
    path = write_result("read_amplification", result)
    for epoch in sorted({r["epoch"] for r in rows}):
        mine = [r for r in rows if r["epoch"] == epoch]
        amp = [r["amplification"] for r in mine]
        worst = max(abs(r["read_bytes"] - r["read_bytes_replayed"]) / r["read_bytes_replayed"] for r in mine)
        print(f"epoch {epoch}: per worker amplification mean {np.mean(amp):.3f} max {max(amp):.3f}; measured "
              f"against replayed: worst {worst:.2%} apart")
    print("->", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
