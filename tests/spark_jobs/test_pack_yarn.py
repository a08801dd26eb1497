"""spark_jobs/pack.py on the local YARN, from a shipped executor environment (scripts/executor_env)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.reader.reader_config import ReaderConfig
from hdfs_io.reader.shard_reader import ShardDataset
from scripts.devcluster import RESOURCEMANAGER_HTTP_PORT, STATE_DIR, http_json
from scripts.executor_env import build, spark_flags
from scripts.synth_corpus import linked_corpus, tones
from tests.hdfs_io.test_shard_reader import CONFIG, read_all
from tests.spark_jobs.test_pack import check_dataset, to_hdfs

ROOT = Path(__file__).resolve().parents[2]
PROBE = '''
import sys
from pyspark.sql import SparkSession

def where(_):
    import importlib.util, sys
    yield sys.prefix, importlib.util.find_spec("torch") is not None

spark = SparkSession.builder.getOrCreate()
for prefix, has_torch in sorted(set(spark.sparkContext.parallelize(range(4), 4).mapPartitions(where).collect())):
    print(f"probe: executor prefix={prefix} torch={has_torch}")
spark.stop()
'''


@pytest.fixture(scope="module")
def executor_env(cluster, tmp_path_factory) -> str:
    """Builds the executor environment and puts it on HDFS, as a cluster's users share it; returns its URI."""
    archive = build(tmp_path_factory.mktemp("executor_env") / "speechpack-env.tar.gz")
    uri = f"{cluster.hdfs_uri}/tests/yarn-{uuid.uuid4().hex[:8]}/speechpack-env.tar.gz"
    cluster.hadoop("dfs", "-mkdir", "-p", uri.rsplit("/", 1)[0])
    cluster.hadoop("dfs", "-put", str(archive), uri)
    yield uri
    cluster.hadoop("dfs", "-rm", "-r", "-skipTrash", uri.rsplit("/", 1)[0], check=False)


@pytest.fixture(scope="module")
def corpus_on_hdfs(cluster, tmp_path_factory):
    from tests.corpora import bad_librispeech

    root = tmp_path_factory.mktemp("yarn_corpus")
    expected = bad_librispeech(root)
    uri = to_hdfs(root, f"{cluster.hdfs_uri}/tests/yarn-corpus-{uuid.uuid4().hex[:8]}")
    return root, expected, uri


def yarn_flags(cluster, executor_env: str, deploy_mode: str) -> list[str]:
    """Returns spark-submit's flags for YARN with the executor environment; Spark's jars are this machine's pyspark's."""
    spark_home = cluster.env["SPARK_HOME"]
    flags = ["--deploy-mode", deploy_mode, "--conf", f"spark.yarn.jars=local:{spark_home}/jars/*",
             "--num-executors", "2", "--executor-cores", "1", "--executor-memory", "1g",
             "--driver-memory", "1g", *spark_flags(executor_env, deploy_mode)]
    if deploy_mode == "cluster":  # the driver runs in a container too: HDFS through the JVM-free client
        flags += ["--conf", "spark.yarn.appMasterEnv.SPEECHPACK_HDFS_BACKEND=native"]
    return flags


def yarn_submit(cluster, executor_env: str, deploy_mode: str, *args: str, check: bool = True):
    return cluster.spark_submit(*yarn_flags(cluster, executor_env, deploy_mode), *args, master="yarn", check=check)


def application_id(output: str) -> str:
    return re.search(r"application_\d+_\d+", output).group(0)


def driver_output(app_id: str) -> str:
    """Returns what the cluster-mode driver printed, from its container's log in the NodeManagers' log folders.

    Spark puts the Python driver's stdout and stderr both in the container's `stdout` log.
    """
    logs = sorted(STATE_DIR.glob(f"yarn/nm*/logs/{app_id}/container_*_01_000001/stdout"))
    assert logs, f"no driver log for {app_id}"
    return logs[0].read_text(errors="replace")


def same_dataset(a: str, b: str) -> None:
    columns = [F.KEY, F.SHARD, F.ROW, F.CHECKSUM, F.DURATION_S]
    assert open_dataset(a).index(columns).to_pylist() == open_dataset(b).index(columns).to_pylist()
    shards = [[(s["rows"], s["checksum"]) for s in open_dataset(uri).manifest["shards"]] for uri in (a, b)]
    assert shards[0] == shards[1]


def test_executors_run_python_from_the_shipped_environment_not_the_checkouts_venv(cluster, executor_env, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)

    result = yarn_submit(cluster, executor_env, "client", str(probe))

    prefixes = re.findall(r"probe: executor prefix=(\S+) torch=(\w+)", result.stdout)
    assert prefixes, result.stdout[-2000:]
    for prefix, has_torch in prefixes:
        assert "/appcache/application_" in prefix and prefix.endswith("/environment"), prefix
        assert not prefix.startswith(str(ROOT / ".venv")) and has_torch == "False"


@pytest.fixture(scope="module")
def local2_pack(cluster, corpus_on_hdfs) -> str:
    """Returns the URI of the corpus packed on local[2], the reference a YARN pack must equal."""
    uri = f"{cluster.hdfs_uri}/tests/yarn-local2-{uuid.uuid4().hex[:8]}"
    cluster.pack("--input", corpus_on_hdfs[2], "--shard-size-mb", "0.1", "--output", uri, master="local[2]")
    yield uri
    cluster.hadoop("dfs", "-rm", "-r", "-skipTrash", uri, check=False)


@pytest.mark.parametrize("deploy_mode", ["client", "cluster"])
def test_pack_on_yarn_from_hdfs_to_hdfs_equals_local2(cluster, executor_env, corpus_on_hdfs, local2_pack, hdfs_dir,
                                                      deploy_mode):
    root, expected, source = corpus_on_hdfs
    dataset = f"{hdfs_dir}/yarn"

    yarn_submit(cluster, executor_env, deploy_mode, str(ROOT / "spark_jobs" / "pack.py"),
                "--input", source, "--shard-size-mb", "0.1", "--output", dataset)

    check_dataset(dataset, expected, root)
    same_dataset(dataset, local2_pack)


def test_cache_features_on_yarn_cluster_mode_writes_the_cache_that_readers_use(cluster, executor_env, local2_pack,
                                                                                hdfs_dir):
    # cluster mode: the driver too runs from the archive, in a container
    dataset = f"{hdfs_dir}/dataset"
    cluster.hadoop("dfs", "-cp", local2_pack, dataset)

    yarn_submit(cluster, executor_env, "cluster", str(ROOT / "spark_jobs" / "cache_features.py"),
                "--dataset", dataset)

    assert ShardDataset(dataset, 0, 1, CONFIG).cache_dir is not None
    decoded = read_all(dataset, 1, 1, 0, ReaderConfig(plan=CONFIG.plan, use_feature_cache=False))[0]
    cached = read_all(dataset, 1, 1, 0, CONFIG)[0]
    assert [b["keys"] for b in cached] == [b["keys"] for b in decoded]
    assert all((a["features"] - b["features"]).abs().max() < 0.02 for a, b in zip(cached, decoded))


def test_missing_input_on_yarn_client_mode_exits_2_with_one_line(cluster, executor_env, hdfs_dir):
    result = yarn_submit(cluster, executor_env, "client", str(ROOT / "spark_jobs" / "pack.py"),
                         "--input", f"{hdfs_dir}/nope", "--output", f"{hdfs_dir}/out", check=False)

    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("pack: ")]
    assert result.returncode == 2
    assert len(errors) == 1 and errors[0].startswith("pack: error: ") and "nope" in errors[0]
    assert "Traceback" not in output and "\tat " not in output


def test_missing_input_on_yarn_cluster_mode_fails_the_application_and_the_driver_log_has_one_line(
        cluster, executor_env, hdfs_dir):
    result = yarn_submit(cluster, executor_env, "cluster", str(ROOT / "spark_jobs" / "pack.py"),
                         "--input", f"{hdfs_dir}/nope", "--output", f"{hdfs_dir}/out", check=False)

    output = result.stdout + result.stderr
    app_id = application_id(output)
    assert result.returncode != 0
    assert "final status: FAILED" in output and "exited with status 2" in output, output[-3000:]
    errors = [line for line in driver_output(app_id).splitlines() if line.startswith("pack: ")]
    assert len(errors) == 1 and errors[0].startswith("pack: error: ") and "nope" in errors[0]
    assert cluster.hadoop("dfs", "-test", "-e", f"{hdfs_dir}/out", check=False).returncode != 0


def running_application(name: str, since_ms: int) -> str | None:
    """Returns the id of the RUNNING YARN application called `name` that started at or after `since_ms`."""
    url = f"http://127.0.0.1:{RESOURCEMANAGER_HTTP_PORT}/ws/v1/cluster/apps?states=RUNNING&startedTimeBegin={since_ms}"
    apps = http_json(url) or {}
    for app in ((apps.get("apps") or {}).get("app") or []):
        if app["name"] == name:
            return app["id"]
    return None


def executor_pids(app_id: str) -> list[int]:
    """Returns the pids of `app_id`'s executor JVMs that have started Python workers (so run tasks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"YarnCoarseGrainedExecutorBackend" in cmdline and app_id.encode() in cmdline:
                children = (proc / "task" / proc.name / "children").read_text().split()
                if children:
                    pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.slow
def test_a_container_killed_mid_pack_is_survived_by_task_retry(cluster, executor_env, hdfs_dir, tmp_path):
    corpus = linked_corpus(tmp_path / "corpus", 3000, "manifest", tones(tmp_path / "tones", 20, 0.1, 0.3))
    argv = [str(ROOT / "spark_jobs" / "pack.py"), "--input", str(corpus), "--output", f"{hdfs_dir}/ds",
            "--shard-size-mb", "4"]
    flags = yarn_flags(cluster, executor_env, "client")
    log = tmp_path / "pack.log"
    since_ms = int(time.time() * 1000)
    with open(log, "w") as out:
        pack = subprocess.Popen(cluster.spark_submit_argv(*flags, *argv, master="yarn"), env=cluster.env,
                                stdout=out, stderr=subprocess.STDOUT)
        app_id, killed = None, None
        try:
            deadline = time.monotonic() + 300
            while killed is None and pack.poll() is None and time.monotonic() < deadline:
                app_id = app_id or running_application("speechpack-pack", since_ms)
                pids = executor_pids(app_id) if app_id else []
                if pids:
                    os.killpg(os.getpgid(pids[0]), signal.SIGKILL)  # the container: its JVM and Python workers
                    killed = pids[0]
                time.sleep(0.2)
            rc = pack.wait(timeout=600)
        finally:
            if pack.poll() is None:
                pack.kill()
                if app_id:
                    cluster.hadoop("application", "-kill", app_id, check=False)

    output = log.read_text()
    assert killed is not None, "pack ended before an executor ran a task: " + output[-2000:]
    assert rc == 0, output[-3000:]
    assert re.search(r"Lost executor|Container .*exited|Exit status: 137", output), output[-3000:]
    ds = open_dataset(f"{hdfs_dir}/ds")
    keys = ds.index([F.KEY]).column(F.KEY).to_pylist()
    assert ds.manifest["utterances"] == len(keys) == len(set(keys)) == 3000 and ds.manifest["quarantined"] == 0
