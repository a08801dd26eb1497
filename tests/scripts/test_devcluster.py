"""The local cluster script: idempotent start, and the environment it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.devcluster import ENV_FILE, ROOT, read_env_file


def test_cluster_up_twice_is_a_no_op_and_env_file_names_everything(cluster):
    again = subprocess.run([sys.executable, "-m", "scripts.devcluster", "up"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    status = subprocess.run([sys.executable, "-m", "scripts.devcluster", "status"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)

    assert again.returncode == 0 and "already up" in again.stdout
    # NameNode, 3 DataNodes, ResourceManager, 2 NodeManagers, Spark master, 2 workers
    assert status.returncode == 0 and status.stdout.count("running") == 10
    env = read_env_file(ENV_FILE)
    for key in ("HDFS_URI", "SPARK_MASTER", "HADOOP_CONF_DIR", "CLASSPATH", "ARROW_LIBHDFS_DIR",
                "JAVA_HOME", "SPARK_LOCAL_IP", "PATH"):
        assert env.get(key), key
    assert env["HDFS_URI"].startswith("hdfs://127.0.0.1:")
    assert "*" not in env["CLASSPATH"] and "hadoop-hdfs-client-3.4" in env["CLASSPATH"]
    assert (Path(env["HADOOP_CONF_DIR"]) / "yarn-site.xml").exists()  # what spark-submit --master yarn reads
