"""The local cluster script: idempotent start, and the environment it writes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from scripts import devcluster
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



def test_a_spark_master_whose_ui_port_was_taken_is_found_where_it_bound(cluster, monkeypatch):
    # the UI port was free when chosen, then a daemon starting beside the master took it: the master bound the next
    # port up, and the cluster waited 180 s on the taken one for workers that never showed (CI, 2026-12-05)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    ports = iter([devcluster.free_port(), taken_port])  # the master's RPC port, then its UI port
    monkeypatch.setattr(devcluster, "free_port", lambda: next(ports))
    try:
        proc, master, ui_port = devcluster.start_spark_master(devcluster.hadoop_env(), name="spark-master-test")
        try:
            status = devcluster.http_json(f"http://127.0.0.1:{ui_port}/json/")
        finally:
            os.killpg(proc["pid"], signal.SIGKILL)
    finally:
        taken.close()

    assert ui_port != taken_port
    assert status is not None and status["url"] == master
