"""bench/peers: our pack job and reader against WebDataset, Lhotse Shar, LitData and MosaicML Streaming, same corpus.

    .venv/bin/pip install -e '.[bench]'            # webdataset, lhotse, litdata
    .venv/bin/pip install --no-deps 'mosaicml-streaming==0.13.0' -r bench/mosaic-requirements.txt
    python -m bench.peers [--utterances 5000] [--repeats 3]      # + HDFS rows after . .devcluster/env.sh
    python -m bench.peers --read 0                               # conversion alone -> peers-conversion.json

Two directions, every figure a median of interleaved runs in this one invocation.

Conversion, from the same source FLAC files, at N/2 and N utterances; "steady" is
the marginal rate between the two, which cancels what each tool pays once (JVM
and Python worker start, LitData's and Spark's planning):
- ours: spark_jobs/pack.py on local[2] from a DS2 manifest, the job's own time inside
  Spark (JVM start excluded). It decodes every frame of every file and CRCs it;
- litdata_checked: LitData's `optimize(num_workers=2)` with an `fn` that does that same
  check (hdfs_io.speech.audio.probe + CRC32): the equal-work peer;
- the plain peers, which check nothing: litdata_plain (optimize, 2 workers, reads bytes),
  mosaic_plain (MDSWriter, one process), webdataset_plain (ShardWriter, one process),
  lhotse_shar (Recording.from_file probes headers; to_shar re-encodes FLAC, one process).
Goal: ours >= 1.0x litdata_checked, steady state.

Reading: each format is written from our shards' own FLAC bytes (shard size as ours;
Lhotse Shar from the source files, 1,000 cuts a shard), then read doing the same
work per utterance: decode with soundfile, the same numpy log-mel normalized by the
same statistics, batches of at most `batch_seconds` of padded audio, padded into one
float32 array each (bench.peer_formats.Batched; Lhotse its own DynamicCutSampler).
In one process and with 2 DataLoader workers, from local disk; with
`HDFS_URI` set, also from HDFS with 2 workers: ours through both backends,
WebDataset through its `pipe:hdfs dfs -cat` route (a JVM per shard). LitData and
Mosaic have no HDFS route (their remotes are object stores); Lhotse Shar is not
measured there. Goals: local disk >= 1.0x the fastest peer, HDFS >= 1.5x.
Also shown, not part of a goal: ours reading the feature cache (no decode at all).
"""

from __future__ import annotations

import os

# Every reader, ours and the peers', with numpy's BLAS on one thread from the start, as ours sets it where it reads
# (hdfs_io.reader.blas_threads): the peers run our featurizer, and OpenBLAS's default of a thread per core in every
# worker oversubscribes the cores (ours read 3.7x slower with 2 workers before it set one thread itself). Set
# before numpy is imported, or it is too late.
os.environ["OMP_NUM_THREADS"] = "1"

import json  # noqa: E402
import shutil
import subprocess
import time
from functools import partial
from pathlib import Path

from pyarrow import fs as pafs

from bench import peer_formats as P
from bench.common import ROOT, SPARK_SUBMIT, WORK, bench_args, corpus, median, spark_pack, write_result
from hdfs_io.format.dataset import open_dataset
from hdfs_io.fs.filesystem import BACKEND_VARIABLE, DEFAULT_BACKEND, open_filesystem
from hdfs_io.reader.planner import PlanConfig
from hdfs_io.reader.shard_reader import ReaderConfig, ShardDataset, ShardLoader
from hdfs_io.speech.features import FeatureConfig
from scripts.devcluster import local_spark_env

BATCH_SECONDS = PlanConfig.batch_seconds
WORKERS = 2
# Conversion writes 16 MB shards (chunks), as bench/pack does: 9 and 17 write tasks at N/2 and N, so both
# sizes keep 2 cores busy. Shards of the reading size (about 140 MB) would leave the N/2 job one write task
# on one core, and its marginal cost would come out too small.
CONVERT_SHARD_BYTES = 16 << 20


def timed(run) -> tuple[object, float]:
    started = time.perf_counter()
    out = run()
    return out, time.perf_counter() - started


# -- conversion ------------------------------------------------------------------------

def ds2_manifest(utterances: list[dict], path: Path) -> Path:
    with path.open("w") as f:
        for s in utterances:
            f.write(json.dumps({"audio_filepath": s["path"], "text": s["text"]}) + "\n")
    return path


def converters(utterances: list[dict], out: Path, shard_bytes: int) -> dict:
    """Returns {name: () -> seconds} converting `utterances` (a list of sources) into each format."""
    manifest = ds2_manifest(utterances, out / f"manifest-{len(utterances)}.jsonl")

    def ours() -> float:
        m = spark_pack("local[2]", str(manifest), str(out / "ours"), "--shard-size-mb", str(shard_bytes >> 20))
        assert m["utterances"] == len(utterances), m["utterances"]
        return m["timing_s"]["total_in_spark"]

    def fresh(name: str) -> Path:
        shutil.rmtree(out / name, ignore_errors=True)
        return out / name

    def wall(write) -> float:
        return timed(write)[1]

    return {
        "ours": ours,
        "litdata_checked": lambda: wall(lambda: P.write_litdata(P.checked_sample, utterances, fresh("ld-checked"),
                                                                WORKERS, shard_bytes)),
        "litdata_plain": lambda: wall(lambda: P.write_litdata(P.plain_sample, utterances, fresh("ld-plain"),
                                                              WORKERS, shard_bytes)),
        "mosaic_plain": lambda: wall(lambda: P.write_mosaic(map(P.plain_sample, utterances), fresh("mds"),
                                                            shard_bytes)),
        "webdataset_plain": lambda: wall(lambda: P.write_webdataset(map(P.plain_sample, utterances), fresh("wds"),
                                                                    shard_bytes)),
        "lhotse_shar": lambda: wall(lambda: P.write_shar(utterances, fresh("shar"))),
    }


def conversion(root: Path, repeats: int, shard_bytes: int) -> dict:
    everything = P.sources(root)
    sizes = (len(everything) // 2, len(everything))
    out = WORK / "peers-convert"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs = {n: converters(everything[:n], out, shard_bytes) for n in sizes}
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in runs[sizes[0]]}
    for _ in range(repeats):
        for n in sizes:
            for name, run in runs[n].items():
                times[name][n].append(run())
    small, large = sizes
    rows = {}
    for name, by_size in times.items():
        t_small, t_large = median(by_size[small]), median(by_size[large])
        rows[name] = {"median_s": {str(small): t_small, str(large): t_large},
                      "runs_s": {str(n): t for n, t in by_size.items()},
                      "whole_utterances_per_s": large / t_large,
                      "steady_utterances_per_s": (large - small) / max(t_large - t_small, 1e-9)}
    return {"sizes": sizes, "rows": rows,
            "ours_vs_litdata_checked_steady": rows["ours"]["steady_utterances_per_s"]
            / rows["litdata_checked"]["steady_utterances_per_s"],
            "goal": "ours >= 1.0x litdata_checked in steady state (equal work: every frame decoded, CRC32)"}


# -- reading ---------------------------------------------------------------------------

def ours(uri: str, workers: int, cache: bool = False, backend: str | None = None):
    def run() -> int:
        before = os.environ.get(BACKEND_VARIABLE)
        os.environ[BACKEND_VARIABLE] = backend or before or DEFAULT_BACKEND  # ShardDataset resolves it, for its workers too
        try:
            ds = ShardDataset(uri, 0, 1, ReaderConfig(plan=PlanConfig(batch_seconds=BATCH_SECONDS),
                                                      use_feature_cache=cache))
            assert (ds.cache_dir is not None) == cache
            batches = ds if workers == 0 else ShardLoader(ds, num_workers=workers)
            return sum(len(b["keys"]) for b in batches)
        finally:
            if before is None:
                del os.environ[BACKEND_VARIABLE]
            else:
                os.environ[BACKEND_VARIABLE] = before
    return run


def peer(reader, featurizer: P.Featurizer, workers: int):
    def run() -> int:
        return P.count_utterances(P.through_workers(P.Batched(reader(), featurizer, BATCH_SECONDS), workers))
    return run


def write_reading_formats(uri: str, root: Path, peers: Path, shard_bytes: int) -> None:
    if (peers / ".complete").exists():
        return
    shutil.rmtree(peers, ignore_errors=True)
    P.write_webdataset(P.our_samples(uri), peers / "webdataset", shard_bytes)
    P.write_shar(P.sources(root), peers / "shar")
    P.write_mosaic(P.our_samples(uri), peers / "mosaic", shard_bytes)
    shards = list(range(len(open_dataset(uri).manifest["shards"])))
    P.write_litdata(partial(P.our_samples, uri), [[shard] for shard in shards], peers / "litdata", 1, shard_bytes)
    (peers / ".complete").write_text("")


def copy_to_hdfs(local: Path, uri: str) -> str:
    fs, path = open_filesystem(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def reading(uri: str, root: Path, manifest: dict, repeats: int) -> dict:
    shard_bytes = max(s["bytes"] for s in manifest["shards"])
    peers = WORK / f"peers-{manifest['utterances']}"
    write_reading_formats(uri, root, peers, shard_bytes)
    featurizer = P.Featurizer(manifest)
    tars = [str(p) for p in sorted((peers / "webdataset").glob("*.tar"))]
    readers = {}
    for w in (0, WORKERS):
        readers |= {
            f"ours_w{w}": ours(uri, w),
            f"webdataset_w{w}": peer(lambda: P.WebDatasetSamples(tars), featurizer, w),
            f"litdata_w{w}": peer(lambda: P.LitDataSamples(peers / "litdata"), featurizer, w),
            f"mosaic_w{w}": peer(lambda: P.MosaicSamples(peers / "mosaic"), featurizer, w),
        }
    readers["lhotse_shar_w0"] = lambda: P.count_utterances(P.read_shar(peers / "shar", featurizer, BATCH_SECONDS))
    readers["ours_feature_cache_w0"] = ours(uri, 0, cache=True)
    hdfs = os.environ.get("HDFS_URI")
    if hdfs:
        on_hdfs = copy_to_hdfs(Path(uri), f"{hdfs}/bench/peers/ours")
        wds_hdfs = copy_to_hdfs(peers / "webdataset", f"{hdfs}/bench/peers/webdataset")
        pipes = [f"pipe:{ROOT}/scripts/hadoop fs -cat {wds_hdfs}/{Path(t).name}" for t in tars]
        readers |= {f"hdfs_ours_{b}_w{WORKERS}": ours(on_hdfs, WORKERS, backend=b) for b in ("libhdfs", "native")}
        readers[f"hdfs_webdataset_pipe_w{WORKERS}"] = peer(lambda: P.WebDatasetSamples(pipes), featurizer, WORKERS)
    runs: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every reader alike
        for name, read in readers.items():
            n, seconds = timed(read)
            assert n == manifest["utterances"], (name, n)
            runs[name].append(seconds)
    rows = {name: {"median_s": median(t), "runs_s": t, "utterances_per_s": manifest["utterances"] / median(t)}
            for name, t in runs.items()}

    def versus(ours_row: str, peer_rows: list[str]) -> dict:
        fastest = min(peer_rows, key=lambda name: rows[name]["median_s"])
        return {"fastest_peer": fastest, "ratio": rows[fastest]["median_s"] / rows[ours_row]["median_s"]}

    local = {f"w{w}": versus(f"ours_w{w}", [f"{p}_w{w}" for p in ("webdataset", "litdata", "mosaic")]
                              + (["lhotse_shar_w0"] if w == 0 else [])) for w in (0, WORKERS)}
    result = {"rows": rows, "local_disk": local,
              "feature_cache_vs_fastest_peer_w0": rows[local["w0"]["fastest_peer"]]["median_s"]
              / rows["ours_feature_cache_w0"]["median_s"],
              "goal": "local disk >= 1.0x the fastest peer; HDFS >= 1.5x the fastest peer with an HDFS route"}
    if hdfs:
        result["hdfs"] = {b: versus(f"hdfs_ours_{b}_w{WORKERS}", [f"hdfs_webdataset_pipe_w{WORKERS}"])
                          for b in ("libhdfs", "native")}
    return result


def read_all(root: Path, utterances: int, repeats: int) -> dict:
    """Packs the corpus for reading (once, kept) and returns `reading`'s result with the dataset's size."""
    uri = str(WORK / f"packed-{utterances}")
    if not os.path.exists(f"{uri}/dataset.json"):
        spark_pack("local[2]", str(root), uri)
    manifest = open_dataset(uri).manifest
    cfg = FeatureConfig(**manifest["stats"]["features"]["config"])
    if not (Path(uri) / f"features-{cfg.digest()}" / "cache.json").exists():
        subprocess.run([str(SPARK_SUBMIT), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
                        str(ROOT / "spark_jobs" / "cache_features.py"), "--dataset", uri], check=True,
                       capture_output=True, env=local_spark_env())
    return dict(reading(uri, root, manifest, repeats), utterances=manifest["utterances"],
                audio_hours=manifest["hours"])


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv, convert=1, read=1)
    try:
        import lhotse  # noqa: F401
        import litdata  # noqa: F401
        import streaming  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench.peers: {e.name} is missing; see the install lines at the top of bench/peers.py")
    root = corpus(args.utterances)
    result = {"utterances": args.utterances, "batch_seconds": BATCH_SECONDS}
    if args.read:
        result["reading"] = read_all(root, args.utterances, args.repeats)
    if args.convert:
        result["conversion"] = conversion(root, args.repeats, CONVERT_SHARD_BYTES)
    # --read 0 measures conversion alone, beside the last full run's file instead of over it
    path = write_result("peers" if args.read else "peers-conversion", result)
    for name, r in result.get("reading", {}).get("rows", {}).items():
        print(f"read    {name:28s} {r['median_s']:7.2f} s  {r['utterances_per_s']:7.0f} utt/s")
    for where in ("local_disk", "hdfs") if args.read else ():
        for k, c in result["reading"].get(where, {}).items():
            print(f"{where} {k}: ours / {c['fastest_peer']} = {c['ratio']:.2f}x")
    if args.convert:
        for name, r in result["conversion"]["rows"].items():
            print(f"convert {name:18s} whole {r['whole_utterances_per_s']:7.0f} utt/s  "
                  f"steady {r['steady_utterances_per_s']:7.0f} utt/s")
        print(f"conversion: ours / litdata_checked (steady) = "
              f"{result['conversion']['ours_vs_litdata_checked_steady']:.2f}x")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
