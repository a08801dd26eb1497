"""bench/peers: our shard reader against WebDataset tar shards and Lhotse Shar, on the same corpus.

    .venv/bin/pip install -e '.[bench]'      # webdataset and lhotse, from PyPI
    python -m bench.peers [--utterances 5000] [--repeats 3]

The packed corpus of bench.reader is written twice more, from the same FLAC bytes:
- WebDataset: tar shards of about the same size as ours (`webdataset.ShardWriter`), one
  sample = flac + txt + json (duration);
- Lhotse Shar: `CutSet.to_shar(fields={"recording": "flac"})`, lhotse's default
  1000 cuts per shard.
Each is then read in one process, side by side, doing the same work per
utterance: decode with soundfile, the same numpy log-mel features normalized by
the same statistics, batches of at most `batch_seconds` of padded audio, padded
into one float32 array per batch:
- ours: ShardDataset iterated in-process (num_workers=0);
- webdataset: `WebDataset(urls)` -> decode + features -> a padded-duration batcher stage;
- lhotse: `CutSet.from_shar(in_dir)` -> `DynamicCutSampler(max_duration=...)` -> cut.load_audio()
  + features (lhotse's sampler budgets total, not padded, duration: a little kinder to it).
Goal: ours >= 1.5x the faster peer. Also shown, not part of the goal: ours reading the
feature cache (spark_jobs/cache_features.py), which skips decoding altogether.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from scripts.devcluster import local_spark_env
from bench.common import ROOT, SPARK_SUBMIT, WORK, bench_args, corpus, median, spark_pack, write_result
from hdfs_io import dataset_format as F
from hdfs_io.dataset import open_dataset
from hdfs_io.features import FeatureConfig, log_features
from hdfs_io.audio import decode, resample, to_mono
from hdfs_io.plan import PlanConfig
from hdfs_io.shard_reader import ReaderConfig, ShardDataset

BATCH_SECONDS = PlanConfig.batch_seconds


class Featurizer:
    """The per-utterance work every reader does: decode, mono, 16 kHz, log-mel, normalize."""

    def __init__(self, manifest: dict):
        stats = manifest["stats"]["features"]
        self.cfg = FeatureConfig(**stats["config"])
        self.mean = np.asarray(stats["mean"], np.float32)
        self.std = np.maximum(np.asarray(stats["std"], np.float32), 1e-5)

    def from_samples(self, samples: np.ndarray, rate: int) -> np.ndarray:
        signal = resample(to_mono(samples), rate, self.cfg.sample_rate)
        return (log_features(signal, self.cfg) - self.mean) / self.std

    def from_bytes(self, data: bytes) -> np.ndarray:
        return self.from_samples(*decode(data))


def pad(features: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(features), max(len(f) for f in features), features[0].shape[1]), np.float32)
    for i, f in enumerate(features):
        out[i, :len(f)] = f
    return out


def padded_duration_batches(samples, batch_seconds: float):
    """WebDataset-style stage: (features, duration) items -> lists whose padded duration fits the budget."""
    batch, longest = [], 0.0
    for features, duration in samples:
        if batch and max(longest, duration) * (len(batch) + 1) > batch_seconds:
            yield batch
            batch, longest = [], 0.0
        batch.append(features)
        longest = max(longest, duration)
    if batch:
        yield batch


# -- writing the peers' formats ----------------------------------------------------

def write_webdataset(uri: str, out: Path, shard_bytes: int) -> None:
    import webdataset as wds

    ds = open_dataset(uri)
    meta = ds.index([F.KEY, F.TRANSCRIPT, F.DURATION_S]).to_pylist()
    by_key = {m[F.KEY]: m for m in meta}
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=shard_bytes, maxcount=10**9, verbose=0) as sink:
        for shard in range(len(ds.manifest["shards"])):
            for key, audio in ds.shard_records(shard):
                m = by_key[key]
                sink.write({"__key__": key, "flac": audio, "txt": m[F.TRANSCRIPT].encode(),
                            "json": json.dumps({"duration": m[F.DURATION_S]}).encode()})


def write_shar(root: Path, out: Path) -> None:
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    recordings, supervisions = [], []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            key, text = line.split(" ", 1)
            recording = Recording.from_file(trans.parent / f"{key}.flac", recording_id=key)
            recordings.append(recording)
            supervisions.append(SupervisionSegment(id=key, recording_id=key, start=0.0,
                                                   duration=recording.duration, text=text))
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                                 supervisions=SupervisionSet.from_segments(supervisions))
    out.mkdir(parents=True)
    cuts.to_shar(out, fields={"recording": "flac"}, shard_size=1000)


# -- reading ---------------------------------------------------------------------------

def run_ours(uri: str, cache: bool) -> tuple[int, float]:
    ds = ShardDataset(uri, 0, 1, ReaderConfig(plan=PlanConfig(batch_seconds=BATCH_SECONDS),
                                              use_feature_cache=cache))
    assert (ds.cache_dir is not None) == cache
    started = time.perf_counter()
    n = sum(len(b["keys"]) for b in ds)
    return n, time.perf_counter() - started


def run_webdataset(folder: Path, featurizer: Featurizer) -> tuple[int, float]:
    import webdataset as wds

    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    started = time.perf_counter()
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("flac", "json")
    items = ((featurizer.from_bytes(flac), json.loads(meta)["duration"]) for flac, meta in pipeline)
    n = 0
    for batch in padded_duration_batches(items, BATCH_SECONDS):
        n += len(pad(batch))
    return n, time.perf_counter() - started


def run_lhotse(folder: Path, featurizer: Featurizer) -> tuple[int, float]:
    from lhotse import CutSet
    from lhotse.dataset import DynamicCutSampler

    started = time.perf_counter()
    cuts = CutSet.from_shar(in_dir=folder)
    n = 0
    for batch in DynamicCutSampler(cuts, max_duration=BATCH_SECONDS, shuffle=False):
        n += len(pad([featurizer.from_samples(c.load_audio().T, c.sampling_rate) for c in batch]))
    return n, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    try:
        import lhotse  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench.peers: {e.name} is missing; run: .venv/bin/pip install -e '.[bench]'")
    root = corpus(args.utterances)
    uri = str(WORK / f"packed-{args.utterances}")
    if not os.path.exists(f"{uri}/dataset.json"):
        spark_pack("local[2]", str(root), uri)
    manifest = open_dataset(uri).manifest
    cfg = FeatureConfig(**manifest["stats"]["features"]["config"])
    if not (Path(uri) / f"features-{cfg.digest()}" / "cache.json").exists():
        subprocess.run([str(SPARK_SUBMIT), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
                        str(ROOT / "spark_jobs" / "cache_features.py"), "--dataset", uri], check=True,
                       capture_output=True, env=local_spark_env())
    peers = WORK / f"peers-{args.utterances}"
    if not (peers / ".complete").exists():
        shutil.rmtree(peers, ignore_errors=True)
        shard_bytes = max(s["bytes"] for s in manifest["shards"])
        write_webdataset(uri, peers / "webdataset", shard_bytes)
        write_shar(root, peers / "shar")
        (peers / ".complete").write_text("")
    os.environ["OMP_NUM_THREADS"] = "1"
    featurizer = Featurizer(manifest)
    readers = {
        "ours": lambda: run_ours(uri, cache=False),
        "webdataset": lambda: run_webdataset(peers / "webdataset", featurizer),
        "lhotse_shar": lambda: run_lhotse(peers / "shar", featurizer),
        "ours_feature_cache": lambda: run_ours(uri, cache=True),
    }
    runs: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every reader alike
        for name, read in readers.items():
            n, seconds = read()
            assert n == manifest["utterances"], (name, n)
            runs[name].append(seconds)
    audio_s = manifest["hours"] * 3600
    rows = {name: {"median_s": median(t), "runs_s": t, "utterances_per_s": manifest["utterances"] / median(t),
                   "audio_seconds_per_s": audio_s / median(t)} for name, t in runs.items()}
    faster_peer = min(("webdataset", "lhotse_shar"), key=lambda name: rows[name]["median_s"])
    result = {"utterances": manifest["utterances"], "audio_hours": manifest["hours"], "batch_seconds": BATCH_SECONDS,
              "rows": rows, "faster_peer": faster_peer,
              "ours_vs_faster_peer": rows[faster_peer]["median_s"] / rows["ours"]["median_s"],
              "cache_vs_faster_peer": rows[faster_peer]["median_s"] / rows["ours_feature_cache"]["median_s"],
              "goal": "ours >= 1.5x the faster of webdataset and lhotse shar (same decode, features, batching)"}
    path = write_result("peers", result)
    for name, r in rows.items():
        print(f"{name:19s} {r['median_s']:7.2f} s  {r['utterances_per_s']:7.0f} utt/s  "
              f"{r['audio_seconds_per_s']:7.0f} audio-s/s")
    print(f"ours / {faster_peer} = {result['ours_vs_faster_peer']:.2f}x; with the feature cache "
          f"{result['cache_vs_faster_peer']:.2f}x -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
