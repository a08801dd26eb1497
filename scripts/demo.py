"""The main job on the embedded default: synthesize speech, pack it with Spark, read it back.

    python -m scripts.demo [--storage local|hdfs] [--utterances 240] [--out demo-out]

`make demo` runs it on the local filesystem with Spark local mode;
`make demo STORAGE=hdfs` uploads to the local HDFS cluster and packs on the
Spark standalone master. It prints a short report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

from hdfs_io import dataset_format as F
from hdfs_io.dataset import open_dataset
from hdfs_io.features import FeatureConfig, features_from_bytes
from scripts.devcluster import local_spark_env, read_env_file
from scripts.synth_corpus import librispeech_tree

ROOT = Path(__file__).resolve().parent.parent
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp+m3")
HELDOUT_VOICES = ("en-us", "en-029")  # a training voice on new sentences, and a voice never trained on


def pack(input_uri: str, output_uri: str, master: str, env: dict[str, str]) -> float:
    """Runs spark-submit spark_jobs/pack.py and returns its wall time in seconds."""
    import pyspark

    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    start = time.perf_counter()
    result = subprocess.run([str(spark_submit), "--master", master, "--conf", "spark.ui.enabled=false",
                             str(ROOT / "spark_jobs" / "pack.py"), "--input", input_uri, "--output", output_uri,
                             "--shard-size-mb", "4", "--overwrite"], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("pack: "):
            print(f"  {line}")
    if result.returncode != 0:
        sys.exit(f"demo: packing {input_uri} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return elapsed


def read_back(uri: str) -> tuple[int, float, float]:
    """Reads every record, checks its checksum, decodes it and computes features.

    Returns (utterances, audio seconds, wall seconds).
    """
    ds = open_dataset(uri)
    index = {r[F.KEY]: r for r in ds.index([F.KEY, F.CHECKSUM, F.DURATION_S]).to_pylist()}
    cfg = FeatureConfig()
    start = time.perf_counter()
    count, seconds = 0, 0.0
    for shard in range(len(ds.manifest["shards"])):
        for key, audio in ds.shard_records(shard):
            if zlib.crc32(audio) != index[key][F.CHECKSUM]:
                sys.exit(f"demo: checksum mismatch for {key} in shard {shard}")
            features_from_bytes(audio, cfg)
            count += 1
            seconds += index[key][F.DURATION_S]
    return count, seconds, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--storage", choices=["local", "hdfs"], default="local")
    p.add_argument("--utterances", type=int, default=240, help="training utterances to synthesize")
    p.add_argument("--out", type=Path, default=ROOT / "demo-out")
    args = p.parse_args(argv)

    corpus = args.out / "corpus"
    if not (corpus / "train").exists():
        print(f"demo: synthesizing {args.utterances} training utterances with espeak-ng")
        shutil.rmtree(corpus, ignore_errors=True)
        librispeech_tree(corpus / "train", args.utterances, TRAIN_VOICES, seed=1)
        librispeech_tree(corpus / "heldout", max(20, args.utterances // 8), HELDOUT_VOICES, seed=2)

    env = local_spark_env()
    if args.storage == "hdfs":
        subprocess.run([sys.executable, "-m", "scripts.devcluster", "up"], cwd=ROOT, check=True)
        env.update(read_env_file())
        os.environ.update(env)
        from hdfs_io.upload import upload

        base, master = f"{env['HDFS_URI']}/demo", env["SPARK_MASTER"]
        for split in ("train", "heldout"):
            s = upload(str(corpus / split), f"{base}/corpus/{split}", progress=False)
            print(f"demo: uploaded {split}: {s.files} copied, {s.skipped} already there, {len(s.failed)} failed")
        inputs = {split: f"{base}/corpus/{split}" for split in ("train", "heldout")}
    else:
        base, master = f"file://{args.out.resolve()}", "local[2]"
        inputs = {split: f"file://{(corpus / split).resolve()}" for split in ("train", "heldout")}

    report = []
    for split in ("train", "heldout"):
        out = f"{base}/datasets/{split}"
        print(f"demo: packing {split} -> {out}")
        pack_s = pack(inputs[split], out, master, env)
        m = open_dataset(out).manifest
        n, audio_s, read_s = read_back(out)
        mb = sum(s["bytes"] for s in m["shards"]) / 2**20
        report.append((split, m, pack_s, mb, n, audio_s, read_s))

    print("\ndemo report")
    for split, m, pack_s, mb, n, audio_s, read_s in report:
        print(f"  {split:8s} {m['utterances']:5d} utterances, {m['hours']:.3f} h in {len(m['shards'])} shards "
              f"({mb:.1f} MB), {m['quarantined']} quarantined")
        print(f"           pack {pack_s:.1f} s wall incl. JVM start ({mb / pack_s:.2f} MB/s); "
              f"read+verify+features {n / read_s:.0f} utt/s, {audio_s / read_s:.0f}x real time")
    print("  (training and evaluation join this report when the trainer lands)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
