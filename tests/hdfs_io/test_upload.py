"""hdfs_io.upload on the real local HDFS, with the pyarrow and pydoop clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from hdfs_io.filesystem import open_filesystem
from hdfs_io.upload import CHECKSUMS, TMP_SUFFIX, ArrowClient, RecordAppender, read_recorded, transfer, upload

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
    """Returns how many files are under `uri` so far, for polling while an upload writes there (0 if none yet).

    A recursive HDFS listing taken while the upload creates the folders can fail with "No such file or
    directory" (seen once in CI); a poll that races the upload counts as none yet and polls again.
    """
    fs, root = open_filesystem(uri)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    try:
        return sum(i.type == pafs.FileType.File for i in fs.get_file_info(selector))
    except FileNotFoundError:
        return 0


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


class FlakyClient:
    """A client whose next `failures` read-backs fail with an I/O error, as a DataNode going away would."""

    def __init__(self, client, failures: int):
        self.client, self.failures = client, failures

    def __getattr__(self, name):
        return getattr(self.client, name)

    def read_chunks(self, path: str):
        if self.failures:
            self.failures -= 1
            raise OSError("connection reset by peer")
        return self.client.read_chunks(path)


def test_an_io_error_while_verifying_is_retried_and_a_vanished_file_is_a_failure_not_a_traceback(
        cluster, hdfs_dir, tmp_path):
    files = small_files(tmp_path / "src", 3)
    dest = f"{hdfs_dir}/corpus"
    upload(str(tmp_path / "src"), dest, progress=False)
    fs, root = open_filesystem(dest)
    client = FlakyClient(ArrowClient(fs), failures=1)
    rel = sorted(files)[0]

    verified = transfer(client, root, rel, tmp_path / "src" / rel, "verify", retries=2)
    vanished = transfer(client, root, "gone.bin", tmp_path / "src" / "gone.bin", "copy", retries=1)

    assert (verified.status, verified.retried, verified.record) == ("skipped", 1, (4100, zlib.crc32(files[rel])))
    assert vanished.status == "failed" and "gone.bin" in vanished.error


KILLED_UPLOAD = """
import os, sys, time
import hdfs_io.upload as upload
copy_one, copies = upload.copy_one, [0]
def copy_then_die(*args):
    copies[0] += 1
    if copies[0] == 8:
        time.sleep(1.0)  # the upload has taken note of the 7 copies done
        os._exit(9)  # killed while copying the 8th file
    return copy_one(*args)
upload.copy_one = copy_then_die
upload.upload(sys.argv[1], sys.argv[2], workers=1, progress=False, record_every=3)
"""


def test_a_killed_upload_has_recorded_the_copies_it_finished_so_a_rerun_need_not_read_them_back(
        cluster, hdfs_dir, tmp_path):
    files = small_files(tmp_path / "src", 12)
    dest = f"{hdfs_dir}/corpus"

    killed = subprocess.run([sys.executable, "-c", KILLED_UPLOAD, str(tmp_path / "src"), dest], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)

    assert killed.returncode == 9, killed.stderr[-2000:]
    fs, root = open_filesystem(dest)
    recorded = read_recorded(ArrowClient(fs), root)
    assert len(recorded) == 6  # two batches of 3; the 7th was copied but not yet recorded
    assert all(recorded[rel] == (len(files[rel]), zlib.crc32(files[rel])) for rel in recorded)


class NoAppendClient(ArrowClient):
    """A destination without append, as object stores are."""

    def append(self, path: str, data: bytes) -> None:
        raise NotImplementedError("append is not supported")


def test_without_append_the_checksum_record_is_written_whole_at_the_end(tmp_path):
    files = small_files(tmp_path / "src", 5)
    dest = tmp_path / "dest"
    dest.mkdir()
    client = NoAppendClient(pafs.LocalFileSystem())
    appender = RecordAppender(client, str(dest), every_files=2, every_seconds=60.0)
    records = {rel: (len(data), zlib.crc32(data)) for rel, data in files.items()}

    for rel, record in records.items():
        appender.add(rel, record)
    appender.finish(str(dest), records)

    assert read_recorded(client, str(dest)) == records
