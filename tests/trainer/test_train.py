"""trainer.train end to end: torchrun on 2 processes (and on 2 "nodes") reading the real HDFS, resume, NaN skip,
evaluate."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.fs.filesystem import open_filesystem
from hdfs_io.reader.shard_reader import ShardDataset
from hdfs_io.speech.augmentation import AugmentConfig
from pyarrow import fs as pafs
from scripts.devcluster import free_port
from tests.corpora import good_librispeech
from trainer.config import Config, TrainConfig, load_config, to_dict
from trainer.model import cosine_with_warmup
from trainer.train import (epoch_read, eval_reader_config, resume_changes, resume_mismatch, run_progress,
                           train_reader_config)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--conf", str(ROOT / "conf" / "ds2_tiny.yaml"), "--train.batch_seconds=12", "--train.checkpoint_every_steps=3",
        "--train.num_workers=1", "--model.rnn_hidden=32", "--model.conv_channels=4", "--model.rnn_layers=2"]


@pytest.fixture(scope="module")
def hdfs_dataset(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    good_librispeech(root / "corpus", 24, seed=11)
    uri = f"{cluster.hdfs_uri}/tests/train-{uuid.uuid4().hex[:12]}/dataset"
    cluster.pack("--input", str(root / "corpus"), "--output", uri, "--shard-size-mb", "0.3")
    yield uri
    fs, path = open_filesystem(uri.rsplit("/", 1)[0])
    fs.delete_dir(path)


def tiny_reader(uri: str, rank: int, world: int, *overrides: str) -> ShardDataset:
    """Returns the reader a TINY training run's rank makes (its plan, augmentation included)."""
    return ShardDataset(uri, rank, world, train_reader_config(load_config(TINY[1], [*TINY[2:], *overrides])))


def train(cluster, *args: str, procs: int = 1, check: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "trainer.train", *TINY, *args], cwd=cwd,
                          env=dict(cluster.env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900,
                          check=check)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("train: error:")]


def metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_torchrun_trains_from_hdfs_and_checkpoints_there(cluster, hdfs_dataset, hdfs_dir, tmp_path):
    out = f"{hdfs_dir}/run"

    result = train(cluster, "--dataset", hdfs_dataset, "--out", out, "--max-steps", "4",
                   "--eval-dataset", hdfs_dataset, "--log-dir", str(tmp_path / "log"), procs=2)

    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["step"] == 4 and final["utterances"] == 24 and 0 <= final["cer"]
    wait = final["data_wait_fraction"]
    assert 0 <= wait["median"] <= wait["p95"] <= 1 and 0 <= wait["mean"] <= 1
    assert 0 <= wait["first_step_of_epoch_mean"] <= 1 and 0 <= wait["first_step_of_run"] <= 1
    later = wait["first_step_of_later_epochs_mean"]  # None when the 4 steps are all in epoch 0
    assert later is None or 0 <= later <= 1
    steps = metrics(tmp_path / "log")
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and 0 <= m["data_wait_fraction"] <= 1 for m in steps)
    ls = cluster.hadoop("dfs", "-ls", out).stdout
    assert "checkpoint.pt" in ls and "metrics.jsonl" in ls and ".tmp" not in ls

    evaluated = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--checkpoint", out,
                                "--dataset", hdfs_dataset], cwd=ROOT, env=cluster.env, capture_output=True,
                               text=True, timeout=300, check=True)
    assert json.loads(evaluated.stdout) == {k: final[k] for k in ("wer", "cer", "utterances")}


def test_resume_after_a_crash_continues_with_the_same_batches_and_losses(cluster, hdfs_dataset, tmp_path):
    common = ["--dataset", hdfs_dataset, "--max-steps", "8", "--epochs", "3", "--train.audit_keys=true"]
    train(cluster, *common, "--out", str(tmp_path / "whole"), "--log-dir", str(tmp_path / "whole-log"))

    crashed = train(cluster, *common, "--out", str(tmp_path / "cut"), "--log-dir", str(tmp_path / "cut-log"),
                    "--train.crash_after_step=4", check=False)
    assert crashed.returncode == 17
    changed = train(cluster, *common, "--out", str(tmp_path / "cut"), "--log-dir", str(tmp_path / "cut-log-x"),
                    "--resume", "--train.batch_seconds=7", check=False)
    # a restarted pod: a fresh local log folder
    train(cluster, *common, "--out", str(tmp_path / "cut"), "--log-dir", str(tmp_path / "cut-log2"), "--resume")

    assert changed.returncode == 2 and len(error_lines(changed)) == 1, changed.stderr[-2000:]
    assert "batch_seconds 12.0 -> 7.0" in error_lines(changed)[0] and "Traceback" not in changed.stderr
    whole, first, second = (metrics(tmp_path / d) for d in ("whole-log", "cut-log", "cut-log2"))
    assert [m["step"] for m in first] == [1, 2, 3, 4] and [m["step"] for m in second] == [4, 5, 6, 7, 8]
    assert all("keys" not in m for m in whole), "the key audit has its own file"
    # the checkpoint was written at step 3, so step 4 runs again after the restart
    keys = {d: [r["keys"] for r in audit(tmp_path / d, 1)[0]] for d in ("whole-log", "cut-log", "cut-log2")}
    assert keys["cut-log"][:3] + keys["cut-log2"] == keys["whole-log"]
    for a, b in zip(first[:3] + second, whole):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # the history in --out is whole across the restart: every step once
    history = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, 9))


def test_a_dataset_eval_dataset_or_noise_that_is_not_there_is_one_line_before_any_training(cluster, hdfs_dataset,
                                                                                          tmp_path):
    no_dataset = train(cluster, "--dataset", "file:///no/such/dataset", "--out", str(tmp_path / "a"), check=False)
    no_eval = train(cluster, "--dataset", hdfs_dataset, "--eval-dataset", f"{hdfs_dataset}-missing",
                    "--out", str(tmp_path / "b"), "--max-steps", "2", check=False)
    no_noise = train(cluster, "--dataset", hdfs_dataset, "--augment.noise=file:///no/such/noise",
                     "--out", str(tmp_path / "c"), "--max-steps", "2", check=False)

    for result in (no_dataset, no_eval, no_noise):
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(error_lines(result)) == 1 and "Traceback" not in result.stderr
        assert "dataset.json" in error_lines(result)[0]
    assert not (tmp_path / "b" / "checkpoint.pt").exists(), "it trained before finding the eval dataset missing"


def test_ranks_under_a_time_budget_follow_one_lr_and_a_log_gets_plain_lines(cluster, hdfs_dataset, tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()

    result = train(cluster, "--dataset", hdfs_dataset, "--out", str(out), "--epochs", "100",
                   "--train.max_minutes=0.25", "--train.warmup_fraction=0.5", "--train.audit_keys=true",
                   "--train.log_every_steps=2", "--train.batch_seconds=6", procs=2, cwd=cwd)

    logs = audit(out / "logs", 2)  # no --log-dir: the logs go under a local --out
    assert len(logs[0]) == len(logs[1]) >= 4
    assert [r["lr"] for r in logs[0]] == [r["lr"] for r in logs[1]], "ranks stepped with different LRs"
    assert list(cwd.iterdir()) == [], "the trainer left files in the working directory"
    assert "\r" not in result.stderr and max(map(len, result.stderr.splitlines())) < 1000
    assert sum(line.startswith("train: step ") for line in result.stderr.splitlines()) >= 2


def test_an_inf_loss_on_one_rank_makes_every_rank_skip_that_step(cluster, hdfs_dataset, tmp_path):
    result = train(cluster, "--dataset", hdfs_dataset, "--out", str(tmp_path / "out"), "--max-steps", "4",
                   "--log-dir", str(tmp_path / "log"), "--train.inject_inf_at_step=2", "--train.inject_inf_on_rank=1",
                   procs=2)

    steps = metrics(tmp_path / "log")  # rank 0's log: its own loss at step 3 was finite
    assert [m["skipped_steps"] for m in steps] == [0, 0, 1, 1]
    assert all(m["loss"] < float("inf") for m in steps)
    assert json.loads(result.stdout.strip().splitlines()[-1])["skipped_steps"] == 1


def audit(log_dir: Path, world: int) -> dict[int, list[dict]]:
    return {r: [json.loads(line) for line in (log_dir / f"keys.rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)}


def audit_so_far(log_dir: Path) -> dict[int, list[dict]]:
    """The audit of a run still going: its whole lines, of the ranks that have written any."""
    return {int(p.name.split(".")[1][4:]): [json.loads(line) for line in p.read_text().splitlines(keepends=True)
                                            if line.endswith("\n")]
            for p in sorted(log_dir.glob("keys.rank*.jsonl"))}


def test_torchrun_restarts_a_dead_rank_and_the_epoch_is_read_exactly_once(cluster, hdfs_dataset, tmp_path):
    fault = ["--train.batch_seconds=6", "--train.checkpoint_every_steps=2", "--train.audit_keys=true",
             "--train.dist_timeout_minutes=1",
             "--train.crash_after_step=3", "--train.crash_on_rank=1", "--epochs", "1"]
    ds = tiny_reader(hdfs_dataset, 0, 2, "--train.batch_seconds=6")
    assert len(ds) >= 5, "the epoch must outlast the crash"

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
         "-m", "trainer.train", *TINY, *fault, "--dataset", hdfs_dataset, "--out", str(tmp_path / "out"),
         "--log-dir", str(tmp_path / "log"), "--resume"],
        cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=900)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "--resume: no checkpoint in" in result.stderr  # the first attempt found none, and said so
    logs = audit(tmp_path / "log", 2)
    # gloo's set-up after a restart sometimes fails or hangs here (1 run in 3); the timeout turns a hang
    # into a failure and torchrun's next restart goes on from the same checkpoint
    assert len({r["attempt"] for r in logs[1]}) >= 2, "rank 1 did not die and come back"
    assert_one_clean_epoch(logs, len(ds), hdfs_dataset)


def assert_one_clean_epoch(logs: dict[int, list[dict]], steps: int, dataset: str) -> None:
    """Every rank's audit has steps 1..`steps`, a redone step read what it read before, and the epoch's
    utterances were read once each (repeats aside)."""
    consumed = []
    for rank, records in logs.items():
        by_step = {}
        for r in records:  # in file order: a later attempt redoes the steps after the last checkpoint
            if r["step"] in by_step:
                assert r["keys"] == by_step[r["step"]]["keys"], "a redone step read other utterances"
            by_step[r["step"]] = r
        assert sorted(by_step) == list(range(1, steps + 1)), f"rank {rank} skipped or repeated a step"
        consumed += [k for r in by_step.values() if not r["repeated"] for k in r["keys"]]
    expected = open_dataset(dataset).index().column(F.KEY).to_pylist()
    assert Counter(consumed) == Counter(expected)  # one clean epoch: none missing, none twice


def kill_tree(pid: int) -> None:
    """SIGKILLs `pid` and every process under it, found through /proc before any is killed."""
    tree, i = [pid], 0
    while i < len(tree):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{tree[i]}/task"):
                with open(f"/proc/{tree[i]}/task/{task}/children") as f:
                    tree += [int(child) for child in f.read().split()]
        i += 1
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def launch_nodes(cluster, *args: str) -> list[subprocess.Popen]:
    """Starts two torchrun launchers, one per "node", that meet through a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                              "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                              f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}", "--rdzv-id=two-nodes",
                              "-m", "trainer.train", *TINY, *args],
                             cwd=ROOT, env=dict(cluster.env, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for node in (0, 1)]


def test_two_nodes_launched_per_node_train_from_hdfs_and_a_killed_node_resumes_to_one_clean_epoch(
        cluster, hdfs_dataset, hdfs_dir, tmp_path):
    common = ["--dataset", hdfs_dataset, "--out", f"{hdfs_dir}/run", "--log-dir", str(tmp_path / "log"),
              "--train.batch_seconds=6", "--train.checkpoint_every_steps=2", "--train.audit_keys=true",
              "--train.dist_timeout_minutes=1", "--epochs", "1"]
    steps = len(tiny_reader(hdfs_dataset, 0, 2, "--train.batch_seconds=6"))
    assert steps >= 5, "the epoch must outlast the kill"

    nodes = launch_nodes(cluster, *common)
    try:
        deadline = time.monotonic() + 600
        while not any(r["step"] >= 3 for records in audit_so_far(tmp_path / "log").values() for r in records):
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
                [n.communicate()[0][-2000:] for n in nodes if n.poll() is not None]
            time.sleep(0.2)
        kill_tree(nodes[1].pid)  # node 1 gone at once: its launcher and its rank (in a session of its own)
        assert nodes[0].wait(timeout=300) != 0, "node 0 finished an epoch that node 1 left"
    finally:
        for n in nodes:
            kill_tree(n.pid)
            n.wait()
    assert "checkpoint.pt" in cluster.hadoop("dfs", "-ls", f"{hdfs_dir}/run").stdout

    resumed = launch_nodes(cluster, *common, "--resume")
    outputs = [n.communicate(timeout=600)[0] for n in resumed]

    assert [n.returncode for n in resumed] == [0, 0], [o[-2000:] for o in outputs]
    logs = audit(tmp_path / "log", 2)
    assert max(r["step"] for r in logs[0]) == steps
    assert_one_clean_epoch(logs, steps, hdfs_dataset)


def test_a_finished_run_resumed_with_more_epochs_trains_the_next_epoch_whole(cluster, hdfs_dataset, tmp_path):
    common = ["--dataset", hdfs_dataset, "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "log"),
              "--train.audit_keys=true", "--train.batch_seconds=6"]
    train(cluster, *common, "--epochs", "1")

    more = train(cluster, *common, "--epochs", "2", "--resume")

    records = audit(tmp_path / "log", 1)[0]
    by_epoch = Counter(r["epoch"] for r in records)
    reader = tiny_reader(hdfs_dataset, 0, 1, "--train.batch_seconds=6")
    # epoch 1 in full, not skipped (speed perturbation gives each epoch its own number of batches)
    assert [by_epoch[0], by_epoch[1]] == [len(reader.plan(0).batches), len(reader.plan(1).batches)], by_epoch
    assert json.loads(more.stdout.strip().splitlines()[-1])["epoch"] == 2


ELASTIC = ["--train.batch_seconds=6", "--train.checkpoint_every_steps=3", "--train.audit_keys=true", "--epochs", "1"]


@pytest.fixture(scope="module")
def stopped_on_two_ranks(cluster, hdfs_dataset, tmp_path_factory) -> Path:
    """A 2-rank run of one epoch that died after step 4, its checkpoint at step 3; returns its folder."""
    root = tmp_path_factory.mktemp("elastic")
    ds = tiny_reader(hdfs_dataset, 0, 2, "--train.batch_seconds=6")
    assert len(ds) >= 5, "the epoch must outlast the crash"
    stopped = train(cluster, "--dataset", hdfs_dataset, *ELASTIC, "--out", str(root / "out"),
                    "--log-dir", str(root / "log"), "--train.crash_after_step=4", "--train.dist_timeout_minutes=1",
                    procs=2, check=False)
    assert stopped.returncode != 0 and (root / "out" / "checkpoint.pt").exists(), stopped.stderr[-2000:]
    return root


@pytest.mark.parametrize("new_world", [1, 3])
def test_an_epoch_stopped_on_two_ranks_finishes_on_another_number_of_ranks_read_once(
        cluster, hdfs_dataset, stopped_on_two_ranks, tmp_path, new_world):
    shutil.copytree(stopped_on_two_ranks / "out", tmp_path / "out")

    train(cluster, "--dataset", hdfs_dataset, *ELASTIC, "--out", str(tmp_path / "out"), "--log-dir",
          str(tmp_path / "log"), "--resume", procs=new_world)

    before = [r for records in audit(stopped_on_two_ranks / "log", 2).values() for r in records if r["step"] <= 3]
    after = audit(tmp_path / "log", new_world)
    assert len({len(records) for records in after.values()}) == 1, "the new ranks read unequal batch counts"
    assert all(r["step"] > 3 for records in after.values() for r in records)
    consumed = [k for r in before + [r for records in after.values() for r in records] if not r["repeated"]
                for k in r["keys"]]
    expected = open_dataset(hdfs_dataset).index().column(F.KEY).to_pylist()
    assert Counter(consumed) == Counter(expected)  # one clean epoch over both runs: none missing, none twice


def test_a_resume_on_another_world_size_goes_on_with_the_lr_schedule_where_it_was(
        cluster, hdfs_dataset, stopped_on_two_ranks, tmp_path):
    shutil.copytree(stopped_on_two_ranks / "out", tmp_path / "out")

    train(cluster, "--dataset", hdfs_dataset, *ELASTIC, "--out", str(tmp_path / "out"), "--log-dir",
          str(tmp_path / "log"), "--resume")

    before = {r["step"]: r["lr"] for r in audit(stopped_on_two_ranks / "log", 2)[0]}
    after = [r["lr"] for r in audit(tmp_path / "log", 1)[0]]  # steps 4 to the end of the epoch
    peak = load_config(ROOT / "conf" / "ds2_tiny.yaml").train.lr
    assert after[0] == pytest.approx(before[4], rel=1e-9), "step 4 is at the same point of the epoch on any world size"
    assert after == sorted(after, reverse=True), "the LR went up again after a resume"
    assert all(lr > 0 for lr in after), f"the LR reached zero before the epoch ended: {after}"
    assert after[-1] < 0.1 * peak, f"the schedule did not come to its end with the epoch: {after}"


def test_lr_schedule_is_a_function_of_the_data_read_whatever_the_number_of_ranks():
    t = TrainConfig(epochs=1, warmup_fraction=0.05)

    def multiplier(step: int, read: float) -> float:
        return cosine_with_warmup(run_progress(t, step, read, 0.0), t.warmup_fraction)

    # one epoch: 100 steps on 4 ranks; stopped after 50, the other half is 25 steps on 8 ranks, or 50 on 4
    whole = [multiplier(k, epoch_read(0.0, k, 100)) for k in range(100)]
    on_eight = [multiplier(50 + k, epoch_read(epoch_read(0.0, 50, 100), k, 25)) for k in range(25)]

    assert on_eight == pytest.approx(whole[50::2]), "8 ranks read the second half twice as fast, on the same schedule"
    assert whole[49] > on_eight[0] > on_eight[-1] > 0
    assert run_progress(t, 75, 1.0, 0.0) == 1.0 and run_progress(TrainConfig(max_steps=10), 5, 0.1, 0.0) == 0.5


def test_a_resume_refuses_another_optimizer_or_model_in_one_line_and_names_the_settings_it_applies():
    identity = {"uri": "d", "utterances": 3, "shards": [1]}
    ckpt = {"dataset": identity, "config": to_dict(Config())}

    sgd, wider, lower = (load_config(None, [o]) for o in ("--train.optimizer=sgd", "--model.rnn_hidden=64",
                                                           "--train.lr=3e-4"))

    assert "train.optimizer 'adamw' -> 'sgd'" in resume_mismatch(ckpt, sgd, identity)
    assert "model.rnn_hidden 256 -> 64" in resume_mismatch(ckpt, wider, identity)
    assert resume_mismatch(ckpt, lower, identity) is None
    assert resume_changes(ckpt, lower) == ["train.lr 0.0015 -> 0.0003"]


def test_a_resume_refuses_other_speed_factors_and_applies_other_noise_and_masks():
    identity = {"uri": "d", "utterances": 3, "shards": [1]}
    before_augmentation = {"dataset": identity, "config": {k: v for k, v in to_dict(Config()).items() if k != "augment"}}
    ckpt = {"dataset": identity, "config": to_dict(load_config(None, ["--augment.speeds=[0.9, 1.1]"]))}

    faster, masked = (load_config(None, ["--augment.speeds=[0.9, 1.1]", o]) for o in ("--augment.speeds=[1.1]",
                                                                                       "--augment.time_masks=2"))

    assert resume_mismatch(ckpt, faster, identity).endswith("augment.speeds (0.9, 1.1) -> (1.1,)")
    assert resume_mismatch(ckpt, masked, identity) is None
    assert resume_changes(ckpt, masked) == ["augment.time_masks 0 -> 2"]
    assert resume_mismatch(before_augmentation, Config(), identity) is None, "a checkpoint from before was refused"
    assert resume_mismatch(before_augmentation, load_config(None, ["--augment.speeds=[0.9, 1.1]"]),
                           identity).endswith("augment.speeds () -> (0.9, 1.1)")


def test_training_reads_with_its_augmentation_and_evaluation_never_does():
    cfg = load_config(ROOT / "conf" / "ds2_tiny.yaml")

    train_config, eval_config = train_reader_config(cfg), eval_reader_config(cfg)

    assert cfg.augment.speeds == (0.9, 1.0, 1.1) and cfg.augment.masks > 0
    assert train_config.augment == cfg.augment
    assert eval_config.augment == AugmentConfig() and eval_config.feature == cfg.features


def test_a_resume_after_the_final_checkpoint_keeps_the_history_in_out(cluster, hdfs_dataset, tmp_path):
    common = ["--dataset", hdfs_dataset, "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "log")]
    first = train(cluster, *common, "--epochs", "1")
    steps = json.loads(first.stdout.strip().splitlines()[-1])["step"]

    more = train(cluster, *common, "--epochs", "2", "--resume")  # the final checkpoint says epoch 1, its readers 0

    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    total = json.loads(more.stdout.strip().splitlines()[-1])["step"]
    assert total == steps + len(tiny_reader(hdfs_dataset, 0, 1).plan(1).batches)  # speed gives epochs their own
    assert [m["step"] for m in history] == list(range(1, total + 1))


def test_a_resume_applies_a_new_lr_and_the_fp16_loss_scale_and_refuses_another_optimizer(
        cluster, hdfs_dataset, tmp_path):
    common = ["--dataset", hdfs_dataset, "--out", str(tmp_path / "out"), "--train.precision=fp16"]
    # the first step overflows, as fp16 gradients do: the loss scale halves
    train(cluster, *common, "--max-steps", "2", "--train.inject_inf_at_step=0")

    sgd = train(cluster, *common, "--max-steps", "3", "--resume", "--train.optimizer=sgd", check=False)
    lower = train(cluster, *common, "--max-steps", "3", "--resume", "--train.lr=1e-4")

    assert sgd.returncode == 2 and len(error_lines(sgd)) == 1 and "Traceback" not in sgd.stderr, sgd.stderr[-2000:]
    assert "train.optimizer 'adamw' -> 'sgd'" in error_lines(sgd)[0]
    assert "train.lr 0.002 -> 0.0001" in lower.stderr
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in history] == [1, 1, 1]
    assert history[2]["lr"] == pytest.approx(1e-4 * cosine_with_warmup(2 / 3, 0.05))
    assert [m["loss_scale"] for m in history] == [65536.0, 32768.0, 32768.0], "the loss scale started afresh"


def damage_records(dataset: Path, keys: list[str]) -> None:
    """Flips a byte in the middle of the audio of each of `keys` in a local dataset's shards."""
    ds, reader = open_dataset(str(dataset)), ShardDataset(str(dataset), 0, 1)
    shards = {r[F.KEY]: r[F.SHARD] for r in ds.index([F.KEY, F.SHARD]).to_pylist()}
    for key in keys:
        audio = reader.get(key)["audio"]
        path = dataset / ds.manifest["shards"][shards[key]]["path"]
        data = bytearray(path.read_bytes())
        data[data.find(audio) + len(audio) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_a_batch_whose_records_were_all_skipped_takes_a_step_on_every_rank(cluster, hdfs_dataset, tmp_path):
    fs, path = open_filesystem(hdfs_dataset)
    pafs.copy_files(path, str(tmp_path / "ds"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    ids = tiny_reader(str(tmp_path / "ds"), 1, 2).plan(0).batches[1]
    keys = open_dataset(str(tmp_path / "ds")).index([F.KEY]).column(F.KEY).take(ids).to_pylist()
    damage_records(tmp_path / "ds", keys)  # rank 1's second batch, whole

    result = train(cluster, "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--max-steps", "2",
                   "--train.on_error=skip", "--train.dist_timeout_minutes=1", procs=2, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert (final["step"], final["skipped_utterances"], final["empty_batches"]) == (2, len(keys), 1)
    assert f"rank 1 step 2: all {len(keys)} records of batch 1 were skipped" in result.stderr


def test_an_evaluation_longer_than_the_collective_timeout_runs_on_every_rank_and_the_job_goes_on(
        cluster, hdfs_dataset, tmp_path):
    # each evaluated utterance takes 1 s longer: all 24 on one rank (24 s) is past the 12 s a collective waits,
    # each rank's share (12 s, side by side) is not
    result = train(cluster, "--dataset", hdfs_dataset, "--out", str(tmp_path / "out"), "--max-steps", "2",
                   "--eval-dataset", hdfs_dataset, "--train.eval_every_steps=2",
                   "--train.inject_eval_utterance_delay_s=1",
                   "--train.dist_timeout_minutes=0.2", "--log-dir", str(tmp_path / "log"), procs=2, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    evals = [m["eval"] for m in metrics(tmp_path / "log") if "eval" in m]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(evals) == 1 and evals[0]["utterances"] == final["utterances"] == 24
