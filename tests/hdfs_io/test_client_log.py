"""hdfs_io.fs.client_log: what is written below Python goes to the log, Python's own stderr stays, an empty log goes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROCESS = """
import os, subprocess, sys
from hdfs_io.fs import client_log
client_log.send_native_stderr()
os.write(2, b"java.io.IOException: a trace line from libhdfs\\n")
print("read: error: one line for the user" + client_log.note(), file=sys.stderr)
if sys.argv[1] == "child":
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('a child stderr line\\\\n')"], check=True)
"""


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROCESS, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=True)


def test_native_stderr_goes_to_the_log_and_python_stderr_to_the_terminal(tmp_path):
    log = tmp_path / "client.log"

    result = run("child", env=dict(os.environ, SPEECHPACK_HDFS_LOG=str(log)))

    assert result.stderr == f"read: error: one line for the user (HDFS client log: {log})\n"
    assert log.read_text() == "java.io.IOException: a trace line from libhdfs\na child stderr line\n"


def test_a_log_of_its_own_is_kept_when_written_and_removed_when_empty(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPEECHPACK_HDFS_LOG"}
    env["TMPDIR"] = str(tmp_path)

    run("alone", env=env)
    empty = subprocess.run([sys.executable, "-c", "from hdfs_io.fs import client_log; client_log.path()"], cwd=ROOT,
                           env=env, check=True, timeout=60)

    logs = list(tmp_path.glob("speechpack-hdfs-*.log"))
    assert empty.returncode == 0 and len(logs) == 1  # the written one; the empty one is gone
    assert logs[0].read_text() == "java.io.IOException: a trace line from libhdfs\n"
