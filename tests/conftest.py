"""Session fixtures for the real local cluster: HDFS (1 NameNode, 3 DataNodes) and Spark standalone.

`make test` starts the cluster and sources `.devcluster/env.sh` before pytest. Run
pytest alone and the `cluster` fixture starts it (and stops it at the end).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.devcluster import read_env_file

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / ".devcluster" / "env.sh"
# The test jobs are short: their JVMs (driver, executors) compile with C1 only and collect with one thread.
# That changes no behaviour and takes a 24-utterance pack from 31 s to 19.5 s on the standalone master.
_QUICK_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
QUICK_START_JVMS = (f"spark.driver.extraJavaOptions={_QUICK_JVM}", f"spark.executor.extraJavaOptions={_QUICK_JVM}",
                    f"spark.yarn.am.extraJavaOptions={_QUICK_JVM}")


def pytest_configure(config) -> None:
    # Once HDFS is open in this process, DataLoader workers start from its one forkserver, whichever test starts
    # it first. It imports what the reader's workers import, once, as ShardLoader's own forkserver does, so a
    # worker forks warm instead of importing torch and pyarrow again.
    import multiprocessing

    from hdfs_io.reader.shard_reader import WORKER_MODULES

    multiprocessing.set_forkserver_preload(list(WORKER_MODULES))


@dataclass(frozen=True)
class Cluster:
    hdfs_uri: str
    spark_master: str
    env: dict[str, str]

    def hadoop(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs the Hadoop CLI (scripts/hadoop) and returns the finished process."""
        return subprocess.run([str(ROOT / "scripts" / "hadoop"), *args], env=self.env,
                              capture_output=True, text=True, check=check, timeout=120)

    def spark_submit_argv(self, *args: str, master: str | None = None) -> list[str]:
        """Returns the command line of pyspark's spark-submit against `master` (the standalone master by default)."""
        spark_submit = Path(self.env["SPARK_HOME"]) / "bin" / "spark-submit"
        return [str(spark_submit), "--master", master or self.spark_master, "--conf", "spark.ui.enabled=false",
                *(f for option in QUICK_START_JVMS for f in ("--conf", option)), *args]

    def spark_submit(self, *args: str, master: str | None = None,
                     check: bool = True) -> subprocess.CompletedProcess:
        """Runs pyspark's spark-submit against `master` (the standalone master by default)."""
        return subprocess.run(self.spark_submit_argv(*args, master=master), env=self.env, capture_output=True,
                              text=True, check=check, timeout=600)

    def pack(self, *args: str, master: str = "local[2]", check: bool = True) -> subprocess.CompletedProcess:
        """Runs `spark-submit spark_jobs/pack.py ARGS` (on local[2] unless told otherwise)."""
        return self.spark_submit(str(ROOT / "spark_jobs" / "pack.py"), *args, master=master, check=check)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    started_here = False
    if not os.environ.get("HDFS_URI"):
        subprocess.run([sys.executable, "-m", "scripts.devcluster", "up"], cwd=ROOT, check=True)
        started_here = True
        # Must be in place before the first HDFS call starts libhdfs's JVM.
        os.environ.update(read_env_file(ENV_FILE))
    yield Cluster(os.environ["HDFS_URI"], os.environ["SPARK_MASTER"], dict(os.environ))
    if started_here:
        subprocess.run([sys.executable, "-m", "scripts.devcluster", "down"], cwd=ROOT, check=True)


@pytest.fixture
def hdfs_dir(cluster: Cluster) -> str:
    """Returns a fresh `hdfs://` folder URI for one test, removed afterwards."""
    from hdfs_io.fs.filesystem import open_filesystem

    uri = f"{cluster.hdfs_uri}/tests/{uuid.uuid4().hex[:12]}"
    fs, path = open_filesystem(uri)
    fs.create_dir(path)
    yield uri
    fs.delete_dir(path)
