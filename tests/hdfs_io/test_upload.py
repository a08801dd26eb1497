"""hdfs_io.upload on the real local HDFS, with the pyarrow and pydoop clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from hdfs_io.filesystem import open_filesystem
from hdfs_io.upload import CHECKSUMS, TMP_SUFFIX, upload

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ["pyarrow", "pydoop"]


def small_files(root: Path, count: int, size: int = 4096) -> dict[str, bytes]:
    files = {}
    for i in range(count):
        rel = f"{i % 7}/{i % 3}/utt-{i:04d}.bin"
        data = os.urandom(size) + i.to_bytes(4, "big")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = data
    return files


def remote_count(uri: str) -> int:
    fs, root = open_filesystem(uri)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return sum(i.type == pafs.FileType.File for i in fs.get_file_info(selector))


def remote_files(uri: str) -> dict[str, bytes]:
    fs, root = open_filesystem(uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[os.path.relpath(info.path, root)] = f.read()
    return out


@pytest.mark.parametrize("client", CLIENTS)
def test_upload_copies_everything_and_a_rerun_copies_nothing(cluster, hdfs_dir, tmp_path, client):
    files = small_files(tmp_path, 40)
    dest = f"{hdfs_dir}/corpus"

    first = upload(str(tmp_path), dest, workers=4, client_name=client, progress=False)
    second = upload(str(tmp_path), dest, workers=4, client_name=client, progress=False)

    assert (first.files, first.bytes, first.failed) == (40, sum(map(len, files.values())), {})
    assert (second.files, second.skipped, second.failed) == (0, 40, {})
    remote = remote_files(dest)
    assert {k: v for k, v in remote.items() if k != CHECKSUMS} == files


def test_a_changed_file_of_the_same_size_is_copied_again(cluster, hdfs_dir, tmp_path):
    files = small_files(tmp_path, 10)
    dest = f"{hdfs_dir}/corpus"
    upload(str(tmp_path), dest, progress=False)
    changed = sorted(files)[3]
    (tmp_path / changed).write_bytes(os.urandom(len(files[changed])))

    again = upload(str(tmp_path), dest, progress=False)

    assert (again.files, again.skipped) == (1, 9)
    assert remote_files(dest)[changed] == (tmp_path / changed).read_bytes()


@pytest.mark.parametrize("client", CLIENTS)
def test_an_upload_killed_midway_leaves_no_partial_file_and_resumes(cluster, hdfs_dir, tmp_path, client):
    src = tmp_path / "src"
    files = small_files(src, 300, size=32768)
    dest = f"{hdfs_dir}/corpus"
    proc = subprocess.Popen([sys.executable, "-m", "hdfs_io.upload", str(src), dest, "--workers", "2",
                             "--client", client, "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while remote_count(dest) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    partial = remote_files(dest)
    finals = {k: v for k, v in partial.items() if not k.endswith(TMP_SUFFIX) and k != CHECKSUMS}
    assert 0 < len(finals) < len(files), "the upload was not interrupted midway"
    assert all(files[k] == v for k, v in finals.items()), "a file under its final name is partial"

    resumed = subprocess.run([sys.executable, "-m", "hdfs_io.upload", str(src), dest, "--client", client,
                              "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(files) - len(finals)} files" in resumed.stdout.split("copied")[0]
    done = remote_files(dest)
    assert {k: v for k, v in done.items() if k != CHECKSUMS and not k.endswith(TMP_SUFFIX)} == files


def test_missing_source_is_a_one_line_user_error(cluster, hdfs_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "hdfs_io.upload", str(tmp_path / "nope"), hdfs_dir],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"upload: error: source {tmp_path / 'nope'} is not a local folder"]
