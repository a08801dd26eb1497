"""Train Deep Speech 2 on a packed dataset: one process per device, launched per node by torchrun.

    torchrun --nnodes N --node_rank i --master_addr HOST --nproc_per_node G \\
        -m trainer.train --conf conf/ds2_tiny.yaml --dataset URI --out URI \\
        [--eval-dataset URI] [--max-steps N] [--epochs N] [--resume] [--train.lr=3e-4 ...]

Single process: `python -m trainer.train ...` (world size 1). Backend gloo on CPU,
NCCL on GPU. Each rank builds its own shard reader with its rank and world size,
so every rank gets the same number of batches (no DDP hang at the end of an
epoch). `--out` (file:// or hdfs://) receives checkpoint.pt every N steps and at
the end (written to a temporary name, then renamed) and metrics.jsonl; rank 0
also logs to --log-dir (JSON lines and TensorBoard).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from hdfs_io.filesystem import open_filesystem, probe_uri
from hdfs_io.plan import PlanConfig
from hdfs_io.shard_reader import (CorruptRecord, ReaderConfig, ShardDataset, ShardLoader, StorageUnavailable,
                                  error_message)
from trainer.config import Config, ConfigError, from_dict, load_config, to_dict
from trainer.decode import error_rates, greedy_decode
from trainer.model import DeepSpeech2, cosine_with_warmup, parameter_count

CHECKPOINT = "checkpoint.pt"


def setup_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    """Returns (rank, world size, device) from torchrun's environment; world size 1 without it.

    A rank whose set-up or collectives wait longer than `timeout_minutes` fails,
    so torchrun can restart the group instead of every rank hanging.
    """
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    timeout = timedelta(minutes=timeout_minutes)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Keys under a prefix per torchrun attempt: after a restart, gloo otherwise found the dead
    # attempt's addresses in the shared store ("connection refused") and never set up.
    store = dist.PrefixStore(f"speechpack/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                             dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                           is_master=False, timeout=timeout))
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a file atomically: to NAME.tmp, then renamed over NAME."""
    fs, path = open_filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path + ".tmp") as f:
        f.write(data)
    if fs.get_file_info(path).type.name != "NotFound":
        fs.delete_file(path)
    fs.move(path + ".tmp", path)


def read_bytes(uri: str) -> bytes | None:
    fs, path = open_filesystem(uri)
    if fs.get_file_info(path).type.name == "NotFound":
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def load_checkpoint(uri: str) -> dict | None:
    data = read_bytes(uri)
    return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def build_model(cfg: Config, manifest: dict) -> DeepSpeech2:
    stats = manifest["stats"]["features"]
    same_features = stats["config"] == to_dict(cfg)["features"]
    return DeepSpeech2(cfg.model, cfg.features, manifest["vocabulary"],
                       stats["mean"] if same_features else None, stats["std"] if same_features else None)


def encode(transcripts: list[str], vocabulary: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns concatenated CTC targets (symbol i -> i + 1; 0 is blank) and their lengths."""
    index = {c: i + 1 for i, c in enumerate(vocabulary)}
    ids = [[index[c] for c in t if c in index] for t in transcripts]
    return torch.tensor([i for t in ids for i in t], dtype=torch.long), torch.tensor([len(t) for t in ids])


def evaluate(model: DeepSpeech2, dataset_uri: str, cfg: Config, device: torch.device) -> dict:
    """Returns greedy-decoding WER and CER of `model` over every utterance of a dataset."""
    reader = ShardDataset(dataset_uri, 0, 1, ReaderConfig(plan=PlanConfig(batch_seconds=cfg.train.batch_seconds),
                                                          feature=cfg.features, output="waveform"))
    was_training = model.training
    model.eval()
    hyps, refs = [], []
    with torch.no_grad():
        for batch in reader:
            if batch["repeated"] or not batch["keys"]:
                continue
            log_probs, lengths = model(batch["waveform"].to(device), batch["lengths"].to(device))
            hyps += greedy_decode(log_probs.float().cpu(), lengths.cpu(), model.vocabulary)
            refs += batch["transcripts"]
    model.train(was_training)
    return error_rates(hyps, refs)


def dataset_identity(manifest: dict, uri: str) -> dict:
    return {"uri": uri, "utterances": manifest["utterances"],
            "shards": [s["checksum"] for s in manifest["shards"]]}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="trainer.train", description=__doc__.split("\n")[0])
    p.add_argument("--conf", help="YAML config (conf/ds2_tiny.yaml, conf/ds2_base.yaml)")
    p.add_argument("--dataset", required=True, help="packed training dataset URI")
    p.add_argument("--out", required=True, help="checkpoint folder URI (file:// or hdfs://)")
    p.add_argument("--eval-dataset", help="held-out dataset URI, evaluated at the end")
    p.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--log-dir", default="runs/train", help="local folder for metrics.jsonl and TensorBoard")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--") or "=" not in r]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.max_steps is not None:
        rest.append(f"--train.max_steps={args.max_steps}")
    if args.epochs is not None:
        rest.append(f"--train.epochs={args.epochs}")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except (CorruptRecord, StorageUnavailable) as e:  # the reader's own errors name shard and filesystem
        print(f"train: error: {error_message(e)}", file=sys.stderr)
        return 1


def run(argv: list[str] | None) -> int:
    """Trains as `main` does; returns the exit code."""
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.conf, overrides)
        probe_uri(args.dataset)
    except (ConfigError, OSError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    rank, world, device = setup_distributed(cfg.train.dist_timeout_minutes)
    torch.manual_seed(cfg.train.seed)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    t = cfg.train
    reader = ShardDataset(args.dataset, rank, world, ReaderConfig(
        plan=PlanConfig(batch_seconds=t.batch_seconds, window_utterances=t.window_utterances, seed=t.seed),
        feature=cfg.features, output="waveform"))
    loader = ShardLoader(reader, num_workers=t.num_workers)
    manifest = reader.manifest
    model = build_model(cfg, manifest).to(device)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, nesterov=True,
                                    weight_decay=t.weight_decay)
    total_steps = t.max_steps or t.epochs * len(reader)
    clock = {"started": time.perf_counter(), "before_resume_s": 0.0}

    def elapsed() -> float:
        """Training wall time in seconds, counting the runs before a resume."""
        return clock["before_resume_s"] + time.perf_counter() - clock["started"]

    def progress(step_count: int) -> float:
        """Fraction of training done: by steps, or by wall time when a time budget ends the run first."""
        by_steps = step_count / max(total_steps, 1)
        return max(by_steps, elapsed() / (60 * t.max_minutes)) if t.max_minutes else by_steps

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(progress(s), t.warmup_fraction))
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    precision = {"auto": "bf16" if device.type == "cuda" else "fp32"}.get(t.precision, t.precision)
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
                if precision != "fp32" else nullcontext())
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    step, epoch, skipped, resumed = 0, 0, 0, False
    checkpoint_uri = f"{args.out.rstrip('/')}/{CHECKPOINT}"
    if args.resume and (ckpt := load_checkpoint(checkpoint_uri)) is not None:
        if len(ckpt["readers"]) != world:
            print(f"train: error: checkpoint was written by {len(ckpt['readers'])} ranks, not {world}", file=sys.stderr)
            return 2
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, skipped = ckpt["step"], ckpt["epoch"], ckpt["skipped_steps"]
        clock["before_resume_s"] = ckpt.get("wall_s", 0.0)
        loader.load_state_dict(ckpt["readers"][rank])
        resumed = True

    log_dir = Path(args.log_dir)
    metrics_file = writer = None
    if rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(log_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses no step
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(log_dir))
        except ImportError:
            print("train: tensorboard is not installed; scalars go to metrics.jsonl only", file=sys.stderr)
        print(f"train: {parameter_count(model) / 1e6:.2f}M parameters, {world} rank(s) on {device}, "
              f"{len(reader)} batches/rank/epoch, {manifest['utterances']} utterances", file=sys.stderr)

    def save() -> None:
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, loader.state_dict())
        else:
            states = [loader.state_dict()]
        if rank == 0:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                        "skipped_steps": skipped, "wall_s": elapsed(), "config": to_dict(cfg),
                        "vocabulary": model.vocabulary,
                        "dataset": dataset_identity(manifest, args.dataset), "readers": states}, buf)
            write_bytes(checkpoint_uri, buf.getvalue())
            metrics_file.flush()
            write_bytes(f"{args.out.rstrip('/')}/metrics.jsonl", (log_dir / "metrics.jsonl").read_bytes())

    # torchrun counts restarts; fault injection fires on the first attempt only
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    audit = None
    if t.audit_keys:
        log_dir.mkdir(parents=True, exist_ok=True)
        audit = open(log_dir / f"keys.rank{rank}.jsonl", "a", buffering=1)
    done = False
    bar = tqdm(total=None if t.max_minutes and not t.max_steps else total_steps, initial=step,
               disable=rank != 0, unit="step", file=sys.stderr)
    while epoch < t.epochs and not done:
        if not resumed:
            loader.set_epoch(epoch)
        resumed = False
        waited_from = time.perf_counter()
        for batch in loader:
            got_at = time.perf_counter()
            wave, lengths = batch["waveform"].to(device), batch["lengths"].to(device)
            targets, target_lengths = encode(batch["transcripts"], model.vocabulary)
            with autocast:
                log_probs, out_lengths = ddp(wave, lengths)
            loss = ctc(log_probs.float(), targets, out_lengths.cpu(), target_lengths)
            if step == t.inject_inf_at_step and rank == t.inject_inf_on_rank:
                loss = loss + float("inf")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            bad = torch.tensor([float(not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())))])
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips together, or none does
            if bad.item() > 0:
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
            else:
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            step += 1
            step_end = time.perf_counter()
            step_s = step_end - waited_from
            if rank == 0:
                audio_s = sum(batch["durations"])
                record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                          "utterances_per_s": len(batch["keys"]) * world / step_s,
                          "audio_seconds_per_s": audio_s * world / step_s,
                          "data_wait_fraction": (got_at - waited_from) / step_s, "skipped_steps": skipped,
                          "wall_s": elapsed(), "keys": batch["keys"]}
                metrics_file.write(json.dumps(record) + "\n")
                if writer:
                    for k in ("loss", "lr", "audio_seconds_per_s", "data_wait_fraction", "skipped_steps"):
                        writer.add_scalar(f"train/{k}", record[k], step)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", epoch=epoch)
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                save()
            if args.eval_dataset and t.eval_every_steps and step % t.eval_every_steps == 0 and rank == 0:
                rates = evaluate(model, args.eval_dataset, cfg, device)
                metrics_file.write(json.dumps({"step": step, "eval": rates, "wall_s": elapsed()})
                                   + "\n")
                if writer:
                    writer.add_scalar("eval/cer", rates["cer"], step)
                    writer.add_scalar("eval/wer", rates["wer"], step)
            if audit:
                audit.write(json.dumps({"step": step, "epoch": epoch, "position": batch["position"],
                                        "attempt": attempt, "keys": batch["keys"],
                                        "repeated": batch["repeated"]}) + "\n")
            if step == t.crash_after_step and rank == t.crash_on_rank and attempt == 0:
                os._exit(17)
            out_of_time = t.max_minutes and elapsed() / 60 >= t.max_minutes
            if world > 1 and t.max_minutes:  # ranks must agree to stop at the same step
                flag = torch.tensor([float(bool(out_of_time))])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = flag.item() > 0
            if (t.max_steps and step >= t.max_steps) or out_of_time:
                done = True
                break
            waited_from = time.perf_counter()
        else:
            epoch += 1
    bar.close()
    save()
    if rank == 0:
        result = {"step": step, "epoch": epoch, "skipped_steps": skipped, "wall_s": elapsed()}
        if args.eval_dataset:
            result.update(evaluate(model, args.eval_dataset, cfg, device))
        print(json.dumps(result))
        metrics_file.close()
        if writer:
            writer.close()
    if audit:
        audit.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def restore(checkpoint_uri: str) -> tuple[DeepSpeech2, Config]:
    """Returns the model and config saved in a checkpoint."""
    ckpt = load_checkpoint(checkpoint_uri)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint at {checkpoint_uri}")
    cfg = from_dict(ckpt["config"])
    model = DeepSpeech2(cfg.model, cfg.features, ckpt["vocabulary"])
    model.load_state_dict(ckpt["model"])
    return model, cfg


if __name__ == "__main__":
    sys.exit(main())
