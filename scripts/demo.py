"""The main job on the embedded default: synthesize speech, pack it with Spark, train Deep Speech 2, evaluate.

    python -m scripts.demo [--storage local|hdfs] [--train-minutes 4] [--utterances 600] [--out demo-out]

1. espeak-ng speaks a LibriSpeech-layout training corpus with several voices, and
   two held-out sets of new sentences: one by a training voice, one by a voice
   never used in training (en-029). sox makes a noise corpus: coloured noise and
   babble of training voices.
2. `spark-submit spark_jobs/pack.py` packs all four (Spark local mode and the
   local disk, or with --storage hdfs the local HDFS and the standalone master).
3. torchrun trains conf/ds2_tiny.yaml on 2 processes for a fixed time budget,
   with its augmentation (speed, volume, SpecAugment) and the packed noise.
4. It evaluates before and after, prints a report, and writes demo-out/curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.reader.shard_reader import ReaderConfig, ShardDataset
from hdfs_io.speech.features import FeatureConfig, features_from_bytes
from scripts.devcluster import free_port, local_spark_env, read_env_file
from scripts.synth_corpus import librispeech_tree, noise_tree
from trainer.config import load_config
from trainer.train import build_model, evaluate

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "ds2_tiny.yaml"
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp+m3", "en+f2")
SPLITS = {"train": (TRAIN_VOICES, 1), "heldout-seen": (("en-us",), 2), "heldout-unseen": (("en-029",), 3)}
NOISE = "noise"  # packed like the others, added to training utterances at a drawn SNR (hdfs_io.speech.augmentation)


def pack(input_uri: str, output_uri: str, master: str, env: dict[str, str]) -> float:
    """Runs spark-submit spark_jobs/pack.py and returns its wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run([str(Path(env["SPARK_HOME"]) / "bin" / "spark-submit"), "--master", master,
                             "--conf", "spark.ui.enabled=false", str(ROOT / "spark_jobs" / "pack.py"),
                             "--input", input_uri, "--output", output_uri, "--shard-size-mb", "4", "--overwrite"],
                            env=env, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("pack: "):
            print(f"  {line}")
    if result.returncode != 0:
        sys.exit(f"demo: packing {input_uri} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - started


def read_back(uri: str) -> tuple[int, float, float]:
    """Reads every record, checks its checksum, decodes it, computes features; returns (utts, audio s, wall s)."""
    ds = open_dataset(uri)
    index = {r[F.KEY]: r for r in ds.index([F.KEY, F.CHECKSUM, F.DURATION_S]).to_pylist()}
    cfg = FeatureConfig()
    started = time.perf_counter()
    count, seconds = 0, 0.0
    for shard in range(len(ds.manifest["shards"])):
        for key, audio in ds.shard_records(shard):
            if zlib.crc32(audio) != index[key][F.CHECKSUM]:
                sys.exit(f"demo: checksum mismatch for {key} in shard {shard}")
            features_from_bytes(audio, cfg)
            count += 1
            seconds += index[key][F.DURATION_S]
    return count, seconds, time.perf_counter() - started


def plot(metrics: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval" in m]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([m["wall_s"] / 60 for m in steps], [m["loss"] for m in steps], lw=0.8)
    a.set(xlabel="minutes", ylabel="CTC loss", title="training loss")
    b.plot([m["wall_s"] / 60 for m in evals], [100 * m["eval"]["cer"] for m in evals], "o-", label="CER")
    b.plot([m["wall_s"] / 60 for m in evals], [100 * m["eval"]["wer"] for m in evals], "s--", label="WER")
    b.set(xlabel="minutes", ylabel="%", title="held-out (training voice, new sentences)")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--storage", choices=["local", "hdfs"], default="local")
    p.add_argument("--utterances", type=int, default=600, help="training utterances to synthesize")
    p.add_argument("--train-minutes", type=float, default=4.0)
    p.add_argument("--out", type=Path, default=ROOT / "demo-out")
    args = p.parse_args(argv)

    corpus = args.out / "corpus"
    if not ((corpus / ".complete").exists() and (corpus / NOISE).exists()):  # a corpus from before had no noise
        print(f"demo: synthesizing {args.utterances} training utterances with espeak-ng")
        shutil.rmtree(corpus, ignore_errors=True)
        for split, (voices, seed) in SPLITS.items():
            count = args.utterances if split == "train" else max(20, args.utterances // 12)
            librispeech_tree(corpus / split, count, voices, seed=seed)
        noise_tree(corpus / NOISE, TRAIN_VOICES)
        (corpus / ".complete").write_text("done\n")

    env = local_spark_env()
    if args.storage == "hdfs":
        subprocess.run([sys.executable, "-m", "scripts.devcluster", "up"], cwd=ROOT, check=True)
        env.update(read_env_file())
        os.environ.update(env)
        from hdfs_io.upload import upload

        base, master = f"{env['HDFS_URI']}/demo", env["SPARK_MASTER"]
        inputs = {}
        for split in [*SPLITS, NOISE]:
            s = upload(str(corpus / split), f"{base}/corpus/{split}", progress=False)
            print(f"demo: uploaded {split}: {s.files} copied, {s.skipped} already there, {len(s.failed)} failed")
            inputs[split] = f"{base}/corpus/{split}"
    else:
        base, master = f"file://{args.out.resolve()}", "local[2]"
        inputs = {split: f"file://{(corpus / split).resolve()}" for split in [*SPLITS, NOISE]}

    datasets, packing = {}, {}
    for split in [*SPLITS, NOISE]:
        datasets[split] = f"{base}/datasets/{split}"
        print(f"demo: packing {split} -> {datasets[split]}")
        pack_s = pack(inputs[split], datasets[split], master, env)
        packing[split] = (open_dataset(datasets[split]).manifest, pack_s, *read_back(datasets[split]))

    augment = [f"--augment.noise={datasets[NOISE]}"]
    cfg = load_config(CONF, augment)
    torch.manual_seed(cfg.train.seed)
    reader = ShardDataset(datasets["train"], 0, 1, ReaderConfig(feature=cfg.features, output="waveform"))
    untrained = build_model(cfg, reader.manifest["vocabulary"], reader)
    before = {split: evaluate(untrained, datasets[split], cfg, torch.device("cpu")) for split in SPLITS if split != "train"}

    log_dir = args.out / "train-log"
    shutil.rmtree(log_dir, ignore_errors=True)
    run = f"{base}/run"
    print(f"demo: training ds2_tiny with torchrun on 2 processes for {args.train_minutes:g} minutes")
    # launched as on a cluster, once per node (here one node): c10d rendezvous at an endpoint
    train = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0",
                            "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                            "-m", "trainer.train", "--conf", str(CONF), "--dataset", datasets["train"], "--out", run,
                            "--eval-dataset", datasets["heldout-seen"], "--log-dir", str(log_dir),
                            "--epochs", "1000", f"--train.max_minutes={args.train_minutes}",
                            "--train.eval_every_steps=40", *augment], cwd=ROOT, env=env)
    if train.returncode != 0:
        sys.exit("demo: training failed")
    after = {}
    for split in before:
        result = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--checkpoint", run,
                                 "--dataset", datasets[split]], cwd=ROOT, env=env, capture_output=True, text=True,
                                check=True)
        after[split] = json.loads(result.stdout)
    metrics = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    plot(metrics, args.out / "curves.png")

    steps = [m for m in metrics if "loss" in m]
    steady = steps[len(steps) // 5:] or steps
    print("\ndemo report")
    for split, (m, pack_s, n, audio_s, read_s) in packing.items():
        mb = sum(s["bytes"] for s in m["shards"]) / 2**20
        print(f"  {split:15s} {m['utterances']:5d} utterances, {m['hours']:.3f} h in {len(m['shards'])} shards "
              f"({mb:.1f} MB), {m['quarantined']} quarantined; pack {pack_s:.1f} s wall incl. JVM start "
              f"({m['timing_s']['total_in_spark']:.1f} s in Spark); read+verify+features "
              f"{audio_s / read_s:.0f}x real time")
    waits = [s["data_wait_fraction"] for s in steady]
    # epoch starts after the run's first step, which also waits for the reader's workers to start
    firsts = [s["data_wait_fraction"] for prev, s in zip(steps, steps[1:]) if prev["epoch"] != s["epoch"]]
    print(f"  training        {len(steps)} steps in {steps[-1]['wall_s'] / 60:.1f} min, "
          f"{statistics.median(s['audio_seconds_per_s'] for s in steady):.0f} audio-s/s; data wait "
          f"{100 * statistics.median(waits):.2f}% of step time (median), {100 * statistics.mean(waits):.2f}% "
          f"(mean), {100 * sorted(waits)[int(0.95 * (len(waits) - 1))]:.2f}% (p95); "
          f"{100 * statistics.mean(firsts):.2f}% (mean) on the first step of each later epoch ({len(firsts)}), "
          f"{100 * steps[0]['data_wait_fraction']:.1f}% on the run's first step (workers starting)")
    for split in before:
        print(f"  {split:15s} CER {100 * before[split]['cer']:5.1f}% -> {100 * after[split]['cer']:5.1f}%, "
              f"WER {100 * before[split]['wer']:5.1f}% -> {100 * after[split]['wer']:5.1f}% "
              f"({after[split]['utterances']} utterances)")
    print(f"  augmentation    {cfg.augment.describe()}")
    print(f"  curves          {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
