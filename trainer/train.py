"""Train Deep Speech 2 on a packed dataset: one process per device, launched per node by torchrun.

    torchrun --nnodes N --node_rank i --master_addr HOST --nproc_per_node G \\
        -m trainer.train --conf conf/ds2_tiny.yaml --dataset URI --out URI \\
        [--eval-dataset URI] [--max-steps N] [--epochs N] [--resume] [--train.lr=3e-4 ...]

Single process: `python -m trainer.train ...` (world size 1). Backend gloo on CPU,
NCCL on GPU. Each rank builds its own shard reader with its rank and world size,
so every rank gets the same number of batches (no DDP hang at the end of an
epoch). `--out` (file:// or hdfs://) receives checkpoint.pt every N steps and at
the end (see trainer.checkpoint: a crash never leaves none) and metrics.jsonl,
the whole history across restarts. Rank 0 also logs to --log-dir (JSON lines and
TensorBoard; default OUT/logs for a local --out, else a folder under the temp dir).
On a terminal rank 0 shows a progress bar; in a log it writes a line every
`train.log_every_steps` steps.

The learning rate is a function of how far the run is (`run_progress`): the steps
of `train.max_steps`, else the epochs of data read, so a resume on another number
of ranks goes on with the schedule where it was. A resume keeps the history in
OUT/metrics.jsonl up to its checkpoint, refuses settings the checkpoint cannot go
on with (the reader's batches, the optimizer, the model, the features) in one
line, and applies the others (the LR, the epochs, ...), saying which. Every rank
evaluates its share of --eval-dataset and the error counts are summed, so no rank
waits in a collective for another's whole evaluation.

Exit codes: 0 done, 2 a user error (bad config, a dataset that is not there, a
resume that no longer fits), 1 a reader error (damaged data under on_error=fail,
storage unavailable) or a bug.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.fs.filesystem import probe_uri, uri_base
from hdfs_io.reader.planner import PlanConfig
from hdfs_io.reader.shard_reader import (CorruptRecord, ReaderConfig, ShardDataset, ShardLoader, StorageUnavailable,
                                         error_message)
from hdfs_io.speech.augmentation import noise_dataset
from trainer import checkpoint
from trainer.config import Config, ConfigError, TrainConfig, from_dict, load_config, to_dict
from trainer.decode import error_totals, greedy_decode, rates
from trainer.model import DeepSpeech2, cosine_with_warmup, parameter_count


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


def build_model(cfg: Config, vocabulary: list[str], reader: ShardDataset) -> DeepSpeech2:
    """Returns a model normalizing its features with the reader's statistics for `cfg.features`."""
    mean, std, _ = reader.normalization()
    return DeepSpeech2(cfg.model, cfg.features, vocabulary, mean, std)


def encode(transcripts: list[str], vocabulary: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns concatenated CTC targets (symbol i -> i + 1; 0 is blank) and their lengths."""
    index = {c: i + 1 for i, c in enumerate(vocabulary)}
    ids = [[index[c] for c in t if c in index] for t in transcripts]
    return torch.tensor([i for t in ids for i in t], dtype=torch.long), torch.tensor([len(t) for t in ids])


def evaluate(model: DeepSpeech2, dataset_uri: str, cfg: Config, device: torch.device, rank: int = 0,
             world: int = 1) -> dict:
    """Returns greedy-decoding WER and CER of `model` over every utterance of a dataset.

    Rank `rank` of `world` decodes its share of the dataset (the reader's plan deals it),
    and the error counts are summed over the ranks in one all-reduce at the end: with
    world > 1 every rank must call this at the same point, and none waits in a
    collective for longer than the ranks' shares differ. They all evaluate rank 0's model,
    the one a checkpoint holds.
    """
    if world > 1:
        # DDP gives every rank rank 0's buffers (batch norm's statistics) at the start of each forward,
        # so after a training step each rank's hold its own batch's update
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    reader = ShardDataset(dataset_uri, rank, world, eval_reader_config(cfg))
    was_training = model.training
    model.eval()
    hyps, refs = [], []
    with torch.no_grad():
        for batch in reader:
            if batch["repeated"] or not batch["keys"]:  # a repeat is a rank's own earlier batch, already counted
                continue
            time.sleep(cfg.train.inject_eval_utterance_delay_s * len(batch["keys"]))
            log_probs, lengths = model(batch["waveform"].to(device), batch["lengths"].to(device))
            hyps += greedy_decode(log_probs.float().cpu(), lengths.cpu(), model.vocabulary)
            refs += batch["transcripts"]
    model.train(was_training)
    totals = torch.tensor(error_totals(hyps, refs), dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors
    if world > 1:
        dist.all_reduce(totals)
    return rates([int(x) for x in totals.tolist()])


def train_reader_config(cfg: Config) -> ReaderConfig:
    """Returns the reader config training reads with: its plan, features, augmentation and error policy."""
    t = cfg.train
    return ReaderConfig(plan=PlanConfig(batch_seconds=t.batch_seconds, window_utterances=t.window_utterances,
                                        seed=t.seed),
                        feature=cfg.features, augment=cfg.augment, output="waveform", on_error=t.on_error)


def eval_reader_config(cfg: Config) -> ReaderConfig:
    """Returns the reader config evaluation reads with: the training features, never augmented."""
    return ReaderConfig(plan=PlanConfig(batch_seconds=cfg.train.batch_seconds), feature=cfg.features,
                        output="waveform")


def dataset_identity(manifest: dict, uri: str) -> dict:
    return {"uri": uri, "utterances": manifest["utterances"],
            "shards": [s["checksum"] for s in manifest["shards"]]}


# What a checkpoint cannot go on with under another value. train: the reader's batches (another value would
# deal other batches to the ranks) and the optimizer (its saved state is another optimizer's). model and
# features, whole: the saved weights have their shapes and learned from those inputs.
RESUME_MUST_MATCH = ("train.batch_seconds", "train.window_utterances", "train.seed", "train.optimizer",
                     "augment.speeds")
RESUME_MUST_MATCH_SECTIONS = ("model", "features")


def changed_settings(saved: dict, now: dict) -> list[tuple[str, str]]:
    """Returns (section.key, "section.key OLD -> NEW") for each setting of config dict `now` that `saved` differs in.

    A key the saved config lacks (it came with a later version) counts as changed.
    """
    return [(f"{section}.{k}", f"{section}.{k} {saved.get(section, {}).get(k)!r} -> {v!r}")
            for section, values in now.items() for k, v in values.items() if saved.get(section, {}).get(k) != v]


def resume_mismatch(ckpt: dict, cfg: Config, identity: dict) -> str | None:
    """Returns why a checkpoint cannot be resumed by this run, or None if it can.

    Another world size can: the readers deal the rest of the epoch to this run's ranks.
    """
    saved = ckpt["dataset"]
    if (saved["utterances"], saved["shards"]) != (identity["utterances"], identity["shards"]):
        return (f"the checkpoint was trained on another dataset ({saved['uri']}, {saved['utterances']} "
                f"utterances) than {identity['uri']} ({identity['utterances']} utterances)")
    changed = [said for key, said in changed_settings(saved_config(ckpt), to_dict(cfg))
               if key in RESUME_MUST_MATCH or key.split(".")[0] in RESUME_MUST_MATCH_SECTIONS]
    return f"the checkpoint was made with other settings: {', '.join(changed)}" if changed else None


def resume_changes(ckpt: dict, cfg: Config) -> list[str]:
    """Returns the settings this run changes that a resume applies ("train.lr 0.002 -> 0.001"), for the user.

    Called once `resume_mismatch` found none that it must refuse.
    """
    return [said for key, said in changed_settings(saved_config(ckpt), to_dict(cfg))
            if key.startswith(("train.", "augment."))]


def saved_config(ckpt: dict) -> dict:
    """Returns a checkpoint's config dict; one saved before augmentation existed had none: its section is off."""
    return {"augment": to_dict(Config())["augment"], **ckpt["config"]}


def run_progress(t: TrainConfig, step: int, epochs_read: float, agreed_s: float) -> float:
    """Returns the fraction of the run done, which the LR schedule follows.

    By steps when train.max_steps sets the run's length, else by the epochs of data read
    (`epochs_read`, fractional); by wall time (`agreed_s`, the slowest rank's) when a
    time budget would end the run first. All are the same on every rank, and the epochs
    read do not depend on the number of ranks, so a resume on another world size goes
    on with the schedule where it was.
    """
    done = step / t.max_steps if t.max_steps else epochs_read / max(t.epochs, 1)
    return max(done, agreed_s / (60 * t.max_minutes)) if t.max_minutes else done


def epoch_read(start: float, taken: int, left: int) -> float:
    """Returns the fraction of an epoch read once this run took `taken` of the `left` steps it has in the epoch.

    `start` is the fraction read when this run took the epoch up (0 for an epoch begun
    here). A resume on another world size deals what was left of the epoch afresh to
    the new ranks, so their step count spans the rest of the epoch, whatever it was before.
    """
    return start + (1.0 - start) * taken / left if left else start


def own_count(by_rank: list[int], rank: int, world: int) -> int:
    """Returns this rank's part of a count every rank of a saved run kept (skipped records, emptied batches).

    On the same world size each rank has its own; on another, rank 0 carries the total.
    """
    if len(by_rank) == world:
        return by_rank[rank]
    return sum(by_rank) if rank == 0 else 0


def wait_summary(waits: list[tuple[bool, float]]) -> dict:
    """Returns the median, mean and p95 of the data wait fraction, and the mean over epochs' first steps.

    The median alone hides waits that come in bursts, such as at each epoch's start. The
    run's first step also waits for the reader's workers to start; the epoch starts after
    it are reported on their own too.
    """
    if not waits:
        return {}
    fractions = np.array([w for _, w in waits])
    firsts = [w for first, w in waits if first]
    later = [w for first, w in waits[1:] if first]
    return {"median": float(np.median(fractions)), "mean": float(fractions.mean()),
            "p95": float(np.percentile(fractions, 95)), "first_step_of_epoch_mean": float(np.mean(firsts)),
            "first_step_of_run": float(waits[0][1]),
            "first_step_of_later_epochs_mean": float(np.mean(later)) if later else None}


def default_log_dir(out: str) -> Path:
    """Returns OUT/logs for a local --out; for a remote one, a folder of the temp dir named after it."""
    if not uri_base(out):
        return Path(out.removeprefix("file://")) / "logs"
    return Path(tempfile.gettempdir()) / "speechpack-train" / hashlib.sha256(out.encode()).hexdigest()[:12]


def check_datasets(*uris: str | None) -> None:
    """Raises a one-line error if a dataset URI does not hold a complete dataset.

    Raises:
        OSError (FilesystemUnavailable, PermissionError), hdfs_io.format.dataset_format.DatasetError.
    """
    for uri in uris:
        if uri:
            probe_uri(uri)
            open_dataset(uri)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="trainer.train", description=__doc__.split("\n")[0])
    p.add_argument("--conf", help="YAML config (conf/ds2_tiny.yaml, conf/ds2_base.yaml)")
    p.add_argument("--dataset", required=True, help="packed training dataset URI")
    p.add_argument("--out", required=True, help="checkpoint folder URI (file:// or hdfs://)")
    p.add_argument("--eval-dataset", help="held-out dataset URI, evaluated at the end")
    p.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--log-dir", help="local folder for metrics.jsonl and TensorBoard (default: OUT/logs for a "
                                     "local --out, else a folder under the temp dir)")
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
        check_datasets(args.dataset, args.eval_dataset, cfg.augment.noise)  # all, before any training
        if cfg.augment.noise:
            noise_dataset(cfg.augment.noise)
    except (ConfigError, OSError, F.DatasetError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    rank, world, device = setup_distributed(cfg.train.dist_timeout_minutes)
    torch.manual_seed(cfg.train.seed)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    t = cfg.train
    reader = ShardDataset(args.dataset, rank, world, train_reader_config(cfg))
    if rank == 0:  # computes feature statistics the dataset lacks, once, before the other ranks look for them
        reader.normalization()
    if world > 1:
        dist.barrier()
    loader = ShardLoader(reader, num_workers=t.num_workers)
    manifest = reader.manifest
    model = build_model(cfg, manifest["vocabulary"], reader).to(device)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, nesterov=True,
                                    weight_decay=t.weight_decay)
    clock = {"started": time.perf_counter(), "before_resume_s": 0.0, "agreed_s": 0.0}

    def elapsed() -> float:
        """This rank's training wall time in seconds, counting the runs before a resume."""
        return clock["before_resume_s"] + time.perf_counter() - clock["started"]

    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    precision = {"auto": "bf16" if device.type == "cuda" else "fp32"}.get(t.precision, t.precision)
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
                if precision != "fp32" else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    identity = dataset_identity(manifest, args.dataset)
    step, epoch, skipped, skipped_utterances, empty_batches = 0, 0, 0, 0, 0
    # how far into `epoch` the readers are: the fraction read, and whether they go on in it (else they start it)
    epoch_start, reader_resumed = 0.0, False
    found = checkpoint.load(args.out) if args.resume else None
    if args.resume and found is None and rank == 0:
        print(f"train: --resume: no checkpoint in {args.out}; starting from step 0", file=sys.stderr)
    if found is not None:
        ckpt, where = found
        why = resume_mismatch(ckpt, cfg, identity)
        try:
            if why is None:
                loader.load_state_dicts(ckpt["readers"])
        except ValueError as e:
            why = str(e)
        if why:
            print(f"train: error: cannot resume from {where}: {why}", file=sys.stderr)
            return 2
        changes = resume_changes(ckpt, cfg)
        if changes and rank == 0:
            print(f"train: --resume from {where} at step {ckpt['step']} with changed settings, applied from "
                  f"here: {', '.join(changes)}", file=sys.stderr)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the saved groups hold the saved run's; the LR is set at each step
            group["weight_decay"] = t.weight_decay
        if ckpt.get("scaler") and scaler.is_enabled():  # a run without fp16 saved none: the scale starts afresh
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, skipped = ckpt["step"], ckpt["epoch"], ckpt["skipped_steps"]
        skipped_utterances = own_count(ckpt.get("skipped_utterances_by_rank", []), rank, world)
        empty_batches = own_count(ckpt.get("empty_batches_by_rank", []), rank, world)
        clock["before_resume_s"] = clock["agreed_s"] = ckpt.get("wall_s", 0.0)
        # a checkpoint written after an epoch ended holds the readers at the end of the epoch before
        reader_resumed = ckpt["readers"][0]["epoch"] == epoch
        if reader_resumed:
            # a checkpoint saved before "epoch_read" was: estimated from the position, exact on the same world size
            epoch_start = ckpt.get("epoch_read", loader.next_position / max(len(loader), 1))

    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir(args.out)
    metrics_file = writer = None
    pending: list[str] = []  # metrics lines not yet appended to OUT/metrics.jsonl
    waits: list[tuple[bool, float]] = []  # rank 0: (first step of its epoch?, data wait fraction), per step
    if rank == 0:
        if found is not None:  # the history up to the checkpoint stays, whatever the readers go on with
            checkpoint.cut_metrics(args.out, step)
        else:
            checkpoint.start_metrics(args.out)
        log_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(log_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses no step
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(log_dir))
        except ImportError:
            print("train: tensorboard is not installed; scalars go to metrics.jsonl only", file=sys.stderr)
        print(f"train: augmentation: {cfg.augment.describe()}; {parameter_count(model) / 1e6:.2f}M parameters, "
              f"{world} rank(s) on {device}, {len(reader)} batches/rank/epoch, {manifest['utterances']} "
              f"utterances; features normalized with statistics from {reader.normalization()[2]}; "
              f"logs in {log_dir}", file=sys.stderr)

    def log_metrics(record: dict) -> None:
        line = json.dumps(record) + "\n"
        metrics_file.write(line)
        pending.append(line)

    def save(read: float) -> tuple[int, int]:
        """Writes a checkpoint, `read` the fraction of `epoch` read; returns the records skipped and the
        batches emptied by skips on all ranks so far."""
        mine = (loader.state_dict(), skipped_utterances, empty_batches)
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        states, skipped_by_rank, empty_by_rank = ([g[i] for g in gathered] for i in range(3))
        if rank == 0:
            checkpoint.append_metrics(args.out, pending)  # before the checkpoint: see trainer.checkpoint
            pending.clear()
            checkpoint.save(args.out, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": epoch, "epoch_read": read, "skipped_steps": skipped,
                "skipped_utterances_by_rank": skipped_by_rank, "empty_batches_by_rank": empty_by_rank,
                "wall_s": clock["agreed_s"], "config": to_dict(cfg), "vocabulary": model.vocabulary,
                "dataset": identity, "readers": states})
        return sum(skipped_by_rank), sum(empty_by_rank)

    # torchrun counts restarts; fault injection fires on the first attempt only
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    audit = None
    if t.audit_keys:
        log_dir.mkdir(parents=True, exist_ok=True)
        audit = open(log_dir / f"keys.rank{rank}.jsonl", "a", buffering=1)
    # for the progress display only: steps per epoch on this world size, from what is left of this one
    left = len(loader) - loader.next_position if reader_resumed else 0
    steps_per_epoch = left / (1.0 - epoch_start) if left else len(loader)
    total_steps = t.max_steps or max(step, round(step + (t.epochs - epoch - epoch_start) * steps_per_epoch))
    bar = tqdm(total=None if t.max_minutes and not t.max_steps else total_steps, initial=step,
               disable=rank != 0 or not sys.stderr.isatty(), unit="step", file=sys.stderr)
    read = epoch_start  # the fraction of `epoch` read
    done = bool(t.max_steps and step >= t.max_steps)  # a resume of a finished run trains no further step
    while epoch < t.epochs and not done:
        if not reader_resumed:
            loader.set_epoch(epoch)
            epoch_start = 0.0
        reader_resumed = False
        left, taken = len(loader) - loader.next_position, 0  # the steps this run has in the epoch: equal on all ranks
        waited_from = time.perf_counter()
        first_of_epoch = True
        for batch in loader:
            got_at = time.perf_counter()
            empty = not batch["keys"]
            if empty:
                # Every record of the batch was skipped. This rank still takes the step, with a stand-in input
                # and a loss of zero, so that it meets the other ranks in DDP's gradient all-reduce; in eval mode,
                # so that batch norm's running statistics do not learn from the stand-in.
                empty_batches += 1
                print(f"train: rank {rank} step {step + 1}: all {len(batch['skipped'])} records of batch "
                      f"{batch['position']} were skipped; it takes a step with a loss of zero", file=sys.stderr)
                wave, lengths = torch.zeros(1, 1, device=device), torch.ones(1, dtype=torch.long, device=device)
                model.eval()
            else:
                wave, lengths = batch["waveform"].to(device), batch["lengths"].to(device)
            with autocast:
                log_probs, out_lengths = ddp(wave, lengths, None if empty else batch.get("spec_masks"),
                                             None if empty else batch.get("speeds"))
            if empty:
                model.train()
                loss = log_probs.float().sum() * 0.0
            else:
                targets, target_lengths = encode(batch["transcripts"], model.vocabulary)
                loss = ctc(log_probs.float(), targets, out_lengths.cpu(), target_lengths)
            if step == t.inject_inf_at_step and rank == t.inject_inf_on_rank:
                loss = loss * float("inf")  # its gradients too, as an fp16 overflow would
            optimizer.zero_grad(set_to_none=True)
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            # What every rank must agree on, in one collective: whether any rank's step went bad, the wall
            # time (the slowest rank's) that the LR schedule and the time budget follow, and whether any
            # rank had a record in its batch.
            agreed = torch.tensor([float(not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item()))),
                                   elapsed(), float(not empty)], dtype=torch.float64, device=device)  # NCCL: CUDA
            if world > 1:
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            clock["agreed_s"] = agreed[1].item()
            lr = t.lr * cosine_with_warmup(run_progress(t, step, epoch + read, clock["agreed_s"]), t.warmup_fraction)
            if agreed[0].item() > 0 or agreed[2].item() == 0:  # a bad step, or no rank had a record
                skipped += agreed[0].item() > 0
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                scaler.step(optimizer)
                scaler.update()
            step += 1
            taken += 1
            read = epoch_read(epoch_start, taken, left)
            skipped_utterances += len(batch["skipped"])
            step_end = time.perf_counter()
            step_s = step_end - waited_from
            if rank == 0:
                audio_s = sum(batch["durations"])
                record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                          "utterances_per_s": len(batch["keys"]) * world / step_s,
                          "audio_seconds_per_s": audio_s * world / step_s,
                          "data_wait_fraction": (got_at - waited_from) / step_s, "skipped_steps": skipped,
                          "skipped_utterances_rank0": skipped_utterances, "empty_batches_rank0": empty_batches,
                          "wall_s": clock["agreed_s"]}
                if scaler.is_enabled():
                    record["loss_scale"] = scale
                log_metrics(record)
                waits.append((first_of_epoch, record["data_wait_fraction"]))
                if writer:
                    for k in ("loss", "lr", "audio_seconds_per_s", "data_wait_fraction", "skipped_steps"):
                        writer.add_scalar(f"train/{k}", record[k], step)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", epoch=epoch)
                if bar.disable and t.log_every_steps and step % t.log_every_steps == 0:
                    print(f"train: step {step}{f'/{total_steps}' if t.max_steps or not t.max_minutes else ''} "
                          f"epoch {epoch} loss {record['loss']:.3f} lr {record['lr']:.3g} "
                          f"{record['audio_seconds_per_s']:.0f} audio-s/s, data wait "
                          f"{100 * record['data_wait_fraction']:.1f}%, {clock['agreed_s'] / 60:.1f} min",
                          file=sys.stderr, flush=True)
            if args.eval_dataset and t.eval_every_steps and step % t.eval_every_steps == 0:  # on every rank
                scores = evaluate(model, args.eval_dataset, cfg, device, rank, world)
                if rank == 0:
                    log_metrics({"step": step, "eval": scores, "wall_s": clock["agreed_s"]})
                    if writer:
                        writer.add_scalar("eval/cer", scores["cer"], step)
                        writer.add_scalar("eval/wer", scores["wer"], step)
            if audit:
                audit.write(json.dumps({"step": step, "epoch": epoch, "position": batch["position"],
                                        "attempt": attempt, "keys": batch["keys"], "repeated": batch["repeated"],
                                        "skipped": len(batch["skipped"]), "lr": lr}) + "\n")
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:  # after the step's eval and audit
                save(read)
            if step == t.crash_after_step and rank == t.crash_on_rank and attempt == 0:
                os._exit(17)
            out_of_time = t.max_minutes and clock["agreed_s"] / 60 >= t.max_minutes  # agreed: ranks stop together
            if (t.max_steps and step >= t.max_steps) or out_of_time:
                done = True
                break
            waited_from = time.perf_counter()
            first_of_epoch = False
        else:
            epoch, read = epoch + 1, 0.0
    bar.close()
    skipped_everywhere, emptied_everywhere = save(read)
    final = evaluate(model, args.eval_dataset, cfg, device, rank, world) if args.eval_dataset else {}
    if rank == 0:
        result = {"step": step, "epoch": epoch, "skipped_steps": skipped, "skipped_utterances": skipped_everywhere,
                  "empty_batches": emptied_everywhere, "wall_s": clock["agreed_s"],
                  "data_wait_fraction": wait_summary(waits), **final}
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
    """Returns the model and config saved in a checkpoint file (or its previous version).

    Raises:
        FileNotFoundError: there is no checkpoint.
    """
    found = checkpoint.load_file(checkpoint_uri)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {checkpoint_uri}")
    ckpt, _ = found
    cfg = from_dict(ckpt["config"])
    model = DeepSpeech2(cfg.model, cfg.features, ckpt["vocabulary"])
    model.load_state_dict(ckpt["model"])
    return model, cfg


if __name__ == "__main__":
    sys.exit(main())
