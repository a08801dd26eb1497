"""hdfs_io.upload on the real local HDFS, with the pyarrow and pydoop clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyarrow import fs as pafs

from hdfs_io.fs.filesystem import open_filesystem
from hdfs_io.upload import (CHECKSUMS, TMP_SUFFIX, ArrowClient, Job, LocalFile, Record, RecordWriter, copy_list,
                            main, path_key, read_recorded, record_files, transfer, upload, walk_local)

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

    def read_chunks(self, path: str, *args):
        if self.failures:
            self.failures -= 1
            raise OSError("connection reset by peer")
        return self.client.read_chunks(path, *args)


def test_an_io_error_while_verifying_is_retried_and_a_vanished_file_is_a_failure_not_a_traceback(
        cluster, hdfs_dir, tmp_path):
    files = small_files(tmp_path / "src", 3)
    dest = f"{hdfs_dir}/corpus"
    upload(str(tmp_path / "src"), dest, progress=False)
    fs, root = open_filesystem(dest)
    client = FlakyClient(ArrowClient(fs), failures=1)
    rel = sorted(files)[0]

    verified = transfer(client, root, Job(rel, "verify", str(tmp_path / "src" / rel)), retries=2)
    vanished = transfer(client, root, Job("gone.bin", "copy", str(tmp_path / "src" / "gone.bin")), retries=1)

    assert (verified.status, verified.retried, verified.record[:2]) == ("skipped", 1, (4100, zlib.crc32(files[rel])))
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
    recorded = dict(read_recorded(ArrowClient(fs), root))
    assert len(recorded) == 6  # two batches of 3; the 7th was copied but not yet recorded
    assert all(recorded[rel][:2] == (len(files[rel]), zlib.crc32(files[rel])) for rel in recorded)


class NoAppendClient(ArrowClient):
    """A destination without append, as object stores are."""

    def append(self, path: str, data: bytes) -> None:
        raise NotImplementedError("append is not supported")


def test_without_append_the_checksum_record_is_written_whole_at_the_end(tmp_path):
    files = small_files(tmp_path / "src", 5)
    dest = tmp_path / "dest"
    dest.mkdir()
    client = NoAppendClient(pafs.LocalFileSystem())
    writer = RecordWriter(client, str(dest), 1, every_files=2, every_seconds=60.0)
    records = {rel: Record(len(data), zlib.crc32(data), None) for rel, data in sorted(files.items())}

    for rel, record in records.items():
        writer.add(rel, record)
    writer.close(complete=True)

    assert dict(read_recorded(client, str(dest))) == records
    assert sorted(os.listdir(dest)) == [CHECKSUMS]


def unprivileged() -> list[str]:
    """Returns a command prefix under which a folder of mode 000 is unreadable, as it is to anyone but root.

    Root reads any folder through the capabilities CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; without them
    the kernel checks root's permission bits like anyone else's.
    """
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def test_an_unreadable_folder_a_dangling_symlink_a_fifo_and_a_symlink_loop_are_listed_as_failed(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "ok").mkdir(parents=True)
    (src / "ok" / "a.bin").write_bytes(b"a" * 100)
    (src / "locked").mkdir()
    (src / "locked" / "b.bin").write_bytes(b"b" * 100)
    (src / "locked").chmod(0)
    (src / "gone.bin").symlink_to(src / "nowhere.bin")
    os.mkfifo(src / "pipe")
    (src / "linked").symlink_to(src / "ok")  # a symlink to a folder is followed
    (src / "ok" / "loop").symlink_to(src)  # ... unless it leads back to a folder above it

    result = subprocess.run([*unprivileged(), sys.executable, "-m", "hdfs_io.upload", "--quiet", str(src),
                             f"file://{dest}"], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "upload: 2 files (200 bytes) copied, 0 skipped, 0 retried, 5 failed"
    failed = [line.split(": ")[2] for line in result.stderr.splitlines() if line.startswith("upload: failed: ")]
    assert failed == ["gone.bin", "linked/loop", "locked/", "ok/loop", "pipe"], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.bin")) == ["linked/a.bin", "ok/a.bin"]


def test_a_name_that_is_not_utf8_is_listed_as_failed_by_name(cluster, hdfs_dir, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.bin").write_bytes(b"g" * 10)
    (src / os.fsdecode(b"bad\xff.bin")).write_bytes(b"b" * 10)
    (src / os.fsdecode(b"dir\xfe")).mkdir()
    (src / os.fsdecode(b"dir\xfe") / "x.bin").write_bytes(b"x" * 10)

    code = main(["--quiet", str(src), f"{hdfs_dir}/corpus"])

    out, err = capsys.readouterr()
    assert code == 1
    assert out.strip() == "upload: 1 files (10 bytes) copied, 0 skipped, 0 retried, 2 failed"
    failed = [line.split(": ")[2] for line in err.splitlines() if line.startswith("upload: failed: ")]
    assert failed == ["bad\\xff.bin", "dir\\xfe/"], err
    assert set(remote_files(f"{hdfs_dir}/corpus")) - {CHECKSUMS} == {"good.bin"}


def bytes_read() -> int:
    """Returns how many bytes this process has read so far, from files and sockets (rchar of /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_a_rerun_reads_no_file_whose_size_and_mtime_are_recorded(tmp_path):
    src, dest = tmp_path / "src", f"file://{tmp_path / 'dest'}"
    files = small_files(src, 16, size=256 * 1024)
    day_ago = time.time() - 86400
    for rel in files:
        os.utime(src / rel, (day_ago, day_ago))
    upload(str(src), dest, workers=2, progress=False)

    before = bytes_read()
    again = upload(str(src), dest, workers=2, progress=False)
    unchanged_read = bytes_read() - before

    touched, changed = sorted(files)[:2]
    os.utime(src / touched, (day_ago + 60, day_ago + 60))  # same bytes, another mtime: read once to check
    (src / changed).write_bytes(os.urandom(len(files[changed])))  # same size, other bytes: copied
    os.utime(src / changed, (day_ago + 60, day_ago + 60))
    third = upload(str(src), dest, workers=2, progress=False)
    before = bytes_read()
    fourth = upload(str(src), dest, workers=2, progress=False)
    fourth_read = bytes_read() - before

    assert (again.files, again.skipped, again.failed) == (0, 16, {})
    assert unchanged_read < 256 * 1024, f"a re-run of unchanged files read {unchanged_read} bytes"
    assert (third.files, third.skipped, third.failed) == (1, 15, {})
    assert remote_files(dest)[changed] == (src / changed).read_bytes()
    assert (fourth.files, fourth.skipped) == (0, 16)
    assert fourth_read < 256 * 1024, f"the checked file was read again: {fourth_read} bytes"


def recorded_tree(root: Path, count: int) -> tuple[Path, str]:
    """Returns (source, destination URI): `count` hard links in folders of 100, already uploaded and recorded.

    The destination holds the same files and a checksum record with each file's size, CRC32 and mtime, as a
    finished upload leaves them.
    """
    data = b"u" * 1000
    src, dest = root / "src", root / "dest"
    for side in (src, dest):
        side.mkdir(parents=True)
        (side / "first.bin").write_bytes(data)
    day_ago = time.time_ns() - 86400 * 10**9
    os.utime(src / "first.bin", ns=(day_ago, day_ago))
    lines = []
    for i in range(count):
        rel = f"d{i // 100:04d}/utt-{i:06d}.bin"
        for side in (src, dest):
            (side / rel).parent.mkdir(exist_ok=True)
            os.link(side / "first.bin", side / rel)
        lines.append(json.dumps({"path": rel, "size": len(data), "crc32": zlib.crc32(data), "mtime_ns": day_ago}))
    os.unlink(src / "first.bin")
    os.unlink(dest / "first.bin")
    (dest / CHECKSUMS).write_text("".join(line + "\n" for line in lines))
    return src, f"file://{dest}"


def resume_peak_bytes(src: Path, dest: str, expected: int) -> int:
    """Returns the peak of Python allocations while `upload` resumes into a destination that has everything."""
    tracemalloc.start()
    try:
        summary = upload(str(src), dest, workers=2, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (summary.files, summary.skipped, summary.failed) == (0, expected, {})
    return peak


def test_a_resume_holds_no_more_memory_for_a_tree_four_times_as_big(tmp_path):
    small, big = recorded_tree(tmp_path / "small", 2000), recorded_tree(tmp_path / "big", 8000)
    resume_peak_bytes(*recorded_tree(tmp_path / "warm", 10), expected=10)  # one-time allocations out of the way

    small_peak = resume_peak_bytes(*small, expected=2000)
    big_peak = resume_peak_bytes(*big, expected=8000)

    assert big_peak < 1.25 * small_peak, f"peak {small_peak} bytes at 2,000 files, {big_peak} at 8,000"


def test_the_copy_list_decides_from_size_mtime_and_record():
    local = [("changed", LocalFile("/s/changed", 5, 100)), ("new", LocalFile("/s/new", 5, 100)),
             ("norecord", LocalFile("/s/norecord", 5, 100)), ("same", LocalFile("/s/same", 5, 100)),
             ("touched", LocalFile("/s/touched", 5, 200)), ("unreadable/", LocalFile("/s/unreadable", error="no"))]
    remote = [("changed", 4), ("gone", 7), ("norecord", 5), ("same", 5), ("touched", 5)]
    recorded = [("changed", Record(5, 1, 100)), ("gone", Record(7, 2, 100)), ("same", Record(5, 3, 100)),
                ("touched", Record(5, 4, 100))]

    jobs = {job.rel: (job.action, job.record) for job in copy_list(local, remote, recorded)}

    assert jobs == {"changed": ("copy", None), "new": ("copy", None), "norecord": ("verify", None),
                    "same": ("skip", Record(5, 3, 100)), "touched": ("check", Record(5, 4, 100)),
                    "unreadable/": ("fail", None), "gone": ("keep", Record(7, 2, 100))}


NAMES = st.sampled_from(["a", "a-b", "a.b", "a0", "b", "é", "Z"])  # "-" and "." sort before "/", "é" after ASCII


@given(st.sets(st.lists(NAMES, min_size=1, max_size=3).map("/".join), max_size=30), st.randoms())
def test_the_copy_list_has_each_source_entry_once_in_path_order_and_skips_only_what_matches(rels, random):
    ordered = sorted(rels, key=path_key)
    local = [(rel, LocalFile(rel, random.choice([1, 2]), random.choice([10, 20]))) for rel in ordered
             if random.random() < 0.7]
    remote = [(rel, random.choice([1, 2])) for rel in ordered if random.random() < 0.7]
    recorded = [(rel, Record(random.choice([1, 2]), 0, random.choice([10, 20, None]))) for rel in ordered
                if random.random() < 0.7]

    jobs = list(copy_list(local, remote, recorded))

    assert [job.rel for job in jobs if job.action != "keep"] == [rel for rel, _ in local]
    assert [path_key(job.rel) for job in jobs] == sorted(path_key(job.rel) for job in jobs)
    sizes, records, sources = dict(remote), dict(recorded), dict(local)
    for job in jobs:
        if job.action in ("skip", "keep"):
            assert job.record == records[job.rel] and job.record.size == sizes[job.rel]
        if job.action == "skip":
            assert (sources[job.rel].size, sources[job.rel].mtime_ns) == (job.record.size, job.record.mtime_ns)
        if job.action == "keep":
            assert job.rel not in sources


def test_the_copy_list_pulls_its_inputs_as_it_goes():
    pulled = {"local": 0, "remote": 0, "recorded": 0}

    def stream(name, make):
        for i in range(100_000):
            pulled[name] += 1
            yield f"d{i // 100:04d}/f{i:06d}", make(i)

    jobs = copy_list(stream("local", lambda i: LocalFile(str(i), 1, 1)), stream("remote", lambda i: 1),
                     stream("recorded", lambda i: Record(1, 0, 1)))
    first = [next(jobs) for _ in range(10)]

    assert [job.action for job in first] == ["skip"] * 10
    assert max(pulled.values()) <= 12, pulled


def test_the_source_is_walked_in_path_order(tmp_path):
    for rel in ["a/b", "a-b", "a.b/c", "a0", "é/x", "Z", "a/a/a"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")

    walked = [rel for rel, _ in walk_local(str(tmp_path))]

    assert walked == sorted(walked, key=path_key) == ["Z", "a/a/a", "a/b", "a-b", "a.b/c", "a0", "é/x"]


def test_a_killed_run_s_records_win_over_the_record_until_a_later_run_completes(tmp_path):
    client, dest = ArrowClient(pafs.LocalFileSystem()), str(tmp_path)
    first = RecordWriter(client, dest, 1, every_files=1, every_seconds=60.0)
    first.add("a", Record(1, 1, 1))
    first.add("b", Record(1, 1, 1))
    first.close(complete=True)
    killed = RecordWriter(client, dest, 2, every_files=1, every_seconds=60.0)
    killed.add("a", Record(2, 2, 2))  # appended at once; the run never closes

    after_kill = dict(read_recorded(client, dest))
    third = RecordWriter(client, dest, 3, every_files=1, every_seconds=60.0)
    third.add("a", Record(3, 3, 3))
    third.add("b", Record(3, 3, 3))
    third.close(complete=True, superseded=[])  # killed before it removed segment 2

    assert after_kill == {"a": Record(2, 2, 2), "b": Record(1, 1, 1)}
    assert dict(read_recorded(client, dest)) == {"a": Record(3, 3, 3), "b": Record(3, 3, 3)}
    assert record_files(client, dest) == ([CHECKSUMS], [f"{CHECKSUMS}.2{TMP_SUFFIX}"], 4)


def test_a_record_out_of_path_order_costs_a_read_back_of_those_files_only(tmp_path, capsys):
    lines = [{"path": p, "size": 1, "crc32": 0} for p in ["b", "a", "c", "c"]] + [{"path": "d"}]
    (tmp_path / CHECKSUMS).write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"path": "e", "si')

    recorded = dict(read_recorded(ArrowClient(pafs.LocalFileSystem()), str(tmp_path)))

    assert recorded == {"b": Record(1, 0, None), "c": Record(1, 0, None)}
    assert "1 records of" in capsys.readouterr().err


def test_a_file_changed_within_its_mtime_granularity_after_its_copy_is_compared_not_trusted(tmp_path):
    src, dest = tmp_path / "src", f"file://{tmp_path / 'dest'}"
    files = small_files(src, 3)
    rel = sorted(files)[0]
    mtime = (src / rel).stat().st_mtime_ns
    upload(str(src), dest, progress=False)
    (src / rel).write_bytes(os.urandom(len(files[rel])))  # changed right after its copy, and within the
    os.utime(src / rel, ns=(mtime, mtime))  # timestamp's granularity, so its mtime reads as before

    again = upload(str(src), dest, progress=False)

    assert (again.files, again.skipped) == (1, 2)
    assert remote_files(dest)[rel] == (src / rel).read_bytes()


def test_pydoop_names_with_semicolon_hash_or_question_mark_are_skipped_by_a_rerun(cluster, hdfs_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a;b.bin", "a#b.bin", "q?x.bin"):
        (src / name).write_bytes(name.encode() * 100)
    argv = [sys.executable, "-m", "hdfs_io.upload", "--client", "pydoop", "--quiet", str(src), f"{hdfs_dir}/up"]
    first = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]

    again = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=180)

    assert again.returncode == 0, again.stderr[-2000:]
    assert "upload: 0 files (0 bytes) copied, 3 skipped" in again.stdout + again.stderr
