"""bench/reader_cpu: CPU time per utterance of our reader against LitData's, and the share both spend on the same work.

    python -m bench.reader_cpu [--utterances 5000] [--repeats 3]     # after bench.peers has made its datasets

What bounds bench/peers' 2-worker row. With 2 workers on this 2-core machine every
reader is CPU-bound, so readers' throughputs stand in the ratio of their CPU time per
utterance. Measured in one process, one thread (our reader with `decode_ahead=False`,
no feature cache), interleaved, medians of `repeats`:
- ours: iterating ShardDataset over the packed dataset;
- LitData: bench.peer_formats' Batched over LitData's StreamingDataset;
- shared: the per-utterance work both do, on the audio bytes already in memory (decode,
  mono, 16 kHz, log-mel, normalize: bench.peer_formats.Featurizer) and padding the
  same batches.
A reader's own cost is its time less the shared time; its ratio to LitData's is the
most a reader can gain.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # as bench.peers sets it, before numpy loads

import time  # noqa: E402

from bench import peer_formats as P  # noqa: E402
from bench.common import WORK, bench_args, median, write_result  # noqa: E402
from bench.peers import BATCH_SECONDS  # noqa: E402
from hdfs_io.format.dataset import open_dataset  # noqa: E402
from hdfs_io.reader.planner import PlanConfig  # noqa: E402
from hdfs_io.reader.shard_reader import ReaderConfig, ShardDataset  # noqa: E402


def cpu(run) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    uri = str(WORK / f"packed-{args.utterances}")
    litdata = WORK / f"peers-{args.utterances}" / "litdata"
    if not (litdata / "index.json").exists():
        raise SystemExit(f"bench.reader_cpu: {litdata} is missing; run python -m bench.peers --convert 0 first")
    manifest = open_dataset(uri).manifest
    featurizer = P.Featurizer(manifest)
    config = ReaderConfig(plan=PlanConfig(batch_seconds=BATCH_SECONDS), decode_ahead=False, use_feature_cache=False)
    samples = [(s["flac"], s["duration"]) for s in P.our_samples(uri)]

    def ours() -> int:
        return sum(len(b["keys"]) for b in ShardDataset(uri, 0, 1, config))

    def peer() -> int:
        return P.count_utterances(P.Batched(P.LitDataSamples(litdata), featurizer, BATCH_SECONDS))

    def shared() -> int:
        items = ((featurizer.from_bytes(audio), duration) for audio, duration in samples)
        return sum(len(P.pad(batch)) for batch in P.padded_duration_batches(items, BATCH_SECONDS))

    runs: dict[str, list[float]] = {"ours": [], "litdata": [], "shared": []}
    for name, run in (("ours", ours), ("litdata", peer), ("shared", shared)):
        assert run() == manifest["utterances"], name  # warm: imports, page cache, first-call costs
    for _ in range(args.repeats):
        for name, run in (("ours", ours), ("litdata", peer), ("shared", shared)):
            runs[name].append(cpu(run))
    n = manifest["utterances"]
    ms = {name: 1000 * median(t) / n for name, t in runs.items()}
    result = {"utterances": n, "cpu_s": runs, "ms_per_utterance": ms,
              "ours_over_litdata": ms["ours"] / ms["litdata"],
              "shared_share_of_litdata": ms["shared"] / ms["litdata"],
              "own_ms_per_utterance": {"ours": ms["ours"] - ms["shared"], "litdata": ms["litdata"] - ms["shared"]}}
    path = write_result("reader_cpu", result)
    own = result["own_ms_per_utterance"]
    print(f"CPU per utterance, medians of {args.repeats}: ours {ms['ours']:.3f} ms, LitData {ms['litdata']:.3f} ms "
          f"({result['ours_over_litdata']:.3f}x), the shared work alone {ms['shared']:.3f} ms "
          f"({100 * result['shared_share_of_litdata']:.1f}% of LitData's); own cost: ours "
          f"{own['ours']:.3f} ms, LitData {own['litdata']:.3f} ms")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
