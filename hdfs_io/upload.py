"""Upload a local tree of small files to HDFS (or any pyarrow URI): parallel, verified, resumable.

    python -m hdfs_io.upload SRC DEST_URI [--workers 8] [--client pyarrow|pydoop] [--retries 3]

Relative paths are kept. Each file is written as NAME._COPYING_, read back and
compared (size and CRC32), then renamed into place, so a killed upload never
leaves half a file under its final name. A re-run copies only what is missing
or differs: a file whose size matches and whose checksum is recorded in
DEST/.upload-checksums.jsonl from a verified copy is skipped; one whose size
matches but has no record is read back and compared. Records are appended as
copies complete (every `record_every` files or `record_seconds`), so a killed
upload's re-run reads back at most those last few. At most 4 x workers files are
in flight, so memory does not grow with the tree. Exit codes: 0 all copied,
1 some files failed after retries (they are listed), 2 a user error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import posixpath
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs as pafs
from tqdm import tqdm

from hdfs_io.filesystem import FilesystemUnavailable, first_line, hdfs_user, probe_uri

CHUNK_BYTES = 8 * 2**20
IN_FLIGHT_PER_WORKER = 4
RECORD_EVERY_FILES = 1000
RECORD_EVERY_SECONDS = 30.0
TMP_SUFFIX = "._COPYING_"
CHECKSUMS = ".upload-checksums.jsonl"


class ArrowClient:
    """Destination operations through pyarrow.fs."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def sizes(self, root: str) -> dict[str, int]:
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        return {posixpath.relpath(i.path, root): i.size for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File}

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def write(self, path: str, chunks) -> None:
        with self.fs.open_output_stream(path) as f:
            for chunk in chunks:
                f.write(chunk)

    def append(self, path: str, data: bytes) -> None:
        with self.fs.open_append_stream(path) as f:
            f.write(data)

    def read_chunks(self, path: str):
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    def replace(self, src: str, dst: str) -> None:
        if self.fs.get_file_info(dst).type != pafs.FileType.NotFound:
            self.fs.delete_file(dst)
        self.fs.move(src, dst)


class PydoopClient:
    """Destination operations through pydoop.hdfs (HDFS only)."""

    def __init__(self, uri: str):
        try:
            import pydoop.hdfs as phdfs
        except (ImportError, subprocess.CalledProcessError) as e:
            raise ValueError("--client pydoop needs pydoop and the `hadoop` command on PATH "
                             f"(here: . .devcluster/env.sh or scripts/hadoop_env.sh): {e}") from None

        parsed = urlparse(uri)
        self.fs = phdfs.hdfs(parsed.hostname or "default", parsed.port or 0)

    def sizes(self, root: str) -> dict[str, int]:
        if not self.fs.exists(root):
            return {}
        out = {}
        for info in self.fs.walk(root):
            if info["kind"] == "file":
                path = urlparse(info["name"]).path
                out[posixpath.relpath(path, root)] = info["size"]
        return out

    def makedirs(self, path: str) -> None:
        self.fs.create_directory(path)

    def write(self, path: str, chunks) -> None:
        with self.fs.open_file(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    def append(self, path: str, data: bytes) -> None:
        with self.fs.open_file(path, "ab") as f:
            f.write(data)

    def read_chunks(self, path: str):
        with self.fs.open_file(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    def replace(self, src: str, dst: str) -> None:
        if self.fs.exists(dst):
            self.fs.delete(dst, recursive=False)
        self.fs.rename(src, dst)


@dataclass
class Summary:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    retried: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, tuple[int, int]] = field(default_factory=dict)  # rel -> (size, crc32)


def local_chunks(path: Path, crc_box: list[int]):
    """Yields a local file's chunks, keeping their running CRC32 in crc_box[0]."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc_box[0] = zlib.crc32(chunk, crc_box[0])
            yield chunk


def local_crc(path: Path) -> int:
    box = [0]
    for _ in local_chunks(path, box):
        pass
    return box[0]


def remote_crc(client, path: str) -> tuple[int, int]:
    size, crc = 0, 0
    for chunk in client.read_chunks(path):
        size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return size, crc


def copy_one(client, src: Path, dst: str) -> tuple[int, int]:
    """Copies, verifies and renames one file into place; returns (size, crc32)."""
    tmp = dst + TMP_SUFFIX
    box = [0]
    client.write(tmp, local_chunks(src, box))
    size, crc = remote_crc(client, tmp)
    if (size, crc) != (src.stat().st_size, box[0]):
        raise OSError(f"verification failed: wrote {src.stat().st_size} bytes, read back {size}")
    client.replace(tmp, dst)
    return size, crc


def verify_or_copy(client, src: Path, dst: str) -> tuple[str, tuple[int, int]]:
    """Returns ("skipped", record) if the remote file already equals `src`, else copies it: ("copied", record)."""
    size, crc = src.stat().st_size, local_crc(src)
    if remote_crc(client, dst) == (size, crc):
        return "skipped", (size, crc)
    client.makedirs(posixpath.dirname(dst))
    return "copied", copy_one(client, src, dst)


def plan(src_root: Path, remote_sizes: dict[str, int], recorded: dict[str, tuple[int, int]]):
    """Returns [(rel, local path, action)] with action 'copy', 'skip' or 'verify' (size matches, no record)."""
    out = []
    for path in sorted(p for p in src_root.rglob("*") if p.is_file()):
        rel = path.relative_to(src_root).as_posix()
        size = path.stat().st_size
        if remote_sizes.get(rel) != size:
            out.append((rel, path, "copy"))
        elif rel in recorded and recorded[rel][0] == size:
            out.append((rel, path, "skip" if recorded[rel][1] == local_crc(path) else "copy"))
        else:
            out.append((rel, path, "verify"))
    return out


def read_recorded(client, dest_root: str) -> dict[str, tuple[int, int]]:
    try:
        text = b"".join(client.read_chunks(posixpath.join(dest_root, CHECKSUMS))).decode()
    except (OSError, FileNotFoundError):
        return {}
    out = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            out[entry["path"]] = (int(entry["size"]), int(entry["crc32"]))
        except (ValueError, KeyError, TypeError):
            continue  # a damaged record only means that file gets verified again
    return out


def record_lines(checksums) -> bytes:
    """Returns checksum records, one JSON line each, from (rel, (size, crc32)) pairs."""
    return "".join(json.dumps({"path": rel, "size": s, "crc32": c}) + "\n" for rel, (s, c) in checksums).encode()


def write_recorded(client, dest_root: str, checksums: dict[str, tuple[int, int]]) -> None:
    """Replaces the checksum record with `checksums` (a fresh file: a killed run may have left the old one open)."""
    target = posixpath.join(dest_root, CHECKSUMS)
    client.write(target + TMP_SUFFIX, [record_lines(sorted(checksums.items()))])
    client.replace(target + TMP_SUFFIX, target)


class RecordAppender:
    """Appends checksum records to DEST/.upload-checksums.jsonl as copies complete, in batches."""

    def __init__(self, client, dest_root: str, every_files: int, every_seconds: float):
        self.client, self.path = client, posixpath.join(dest_root, CHECKSUMS)
        self.every_files, self.every_seconds = every_files, every_seconds
        self.pending: list[tuple[str, tuple[int, int]]] = []
        self.last = time.monotonic()
        self.append_unsupported = False

    def add(self, rel: str, record: tuple[int, int]) -> None:
        self.pending.append((rel, record))
        if len(self.pending) >= self.every_files or time.monotonic() - self.last >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        """Appends the pending records; a failed append keeps them for the next flush.

        Filesystems without append (object stores) keep them all for `finish`.
        """
        self.last = time.monotonic()
        if not self.pending or self.append_unsupported:
            return
        try:
            self.client.append(self.path, record_lines(self.pending))
            self.pending = []
        except NotImplementedError:
            self.append_unsupported = True
        except OSError:
            pass  # a record only saves a re-run's read-back: try again at the next flush

    def finish(self, dest_root: str, everything: dict[str, tuple[int, int]]) -> None:
        """Flushes; if records are still pending, rewrites the whole record instead, or says it could not."""
        self.flush()
        if not self.pending:
            return
        try:
            write_recorded(self.client, dest_root, everything)
        except OSError as e:
            print(f"upload: warning: checksum records not saved ({first_line(e)}); a re-run reads back "
                  f"{len(self.pending)} files to verify them", file=sys.stderr)


@dataclass
class Outcome:
    rel: str
    status: str  # "copied", "skipped" or "failed"
    size: int
    record: tuple[int, int] | None = None  # (size, crc32) of the verified remote file
    retried: int = 0
    error: str = ""


def transfer(client, dest_root: str, rel: str, path: Path, action: str, retries: int) -> Outcome:
    """Carries out one planned action ('copy', 'verify' or 'skip') with retries; returns what happened.

    Every I/O error, local (the file vanished) or remote (the read-back of a verify,
    the copy), is retried and then reported as a failed outcome, never raised.
    """
    dst = posixpath.join(dest_root, rel)
    if action == "skip":
        return Outcome(rel, "skipped", path.stat().st_size if path.exists() else 0)
    for attempt in range(retries + 1):
        try:
            if action == "verify":
                status, record = verify_or_copy(client, path, dst)
            else:
                client.makedirs(posixpath.dirname(dst))
                status, record = "copied", copy_one(client, path, dst)
            return Outcome(rel, status, record[0], record, retried=attempt)
        except OSError as e:
            if attempt == retries:
                return Outcome(rel, "failed", 0, retried=attempt, error=first_line(e))
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


_worker_client = None


def _start_pydoop_worker(dest: str) -> None:
    global _worker_client
    # If the upload is killed, its workers die with it instead of finishing copies unseen.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _worker_client = PydoopClient(dest)


def _transfer_in_worker(*args) -> Outcome:
    return transfer(_worker_client, *args)


def upload(src: str, dest: str, workers: int = 8, client_name: str = "pyarrow", retries: int = 3,
           progress: bool = True, record_every: int = RECORD_EVERY_FILES,
           record_seconds: float = RECORD_EVERY_SECONDS) -> Summary:
    """Uploads the tree at local `src` to `dest` and returns what happened.

    pyarrow copies on threads sharing one handle. pydoop's native client
    crashes when threads share it (segfaults seen here), so pydoop copies run in
    worker processes started with spawn, each with its own handle and JVM.

    Raises:
        ValueError: `src` is not a local folder, or pydoop was asked for a non-HDFS URI.
        hdfs_io.filesystem.FilesystemUnavailable: the destination cannot be reached.
    """
    src_root = Path(src)
    if not src_root.is_dir():
        raise ValueError(f"source {src} is not a local folder")
    if client_name == "pydoop":
        # pydoop brings its own libhdfs; keep pyarrow's HDFS out of this process.
        if urlparse(dest).scheme != "hdfs":
            raise ValueError("--client pydoop needs an hdfs:// destination")
        client, dest_root = PydoopClient(dest), urlparse(dest).path
        pool = ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_pydoop_worker, initargs=(dest,))
        submit = partial(pool.submit, _transfer_in_worker)
    else:
        fs, dest_root, _ = probe_uri(dest)
        client = ArrowClient(fs)
        pool = ThreadPoolExecutor(max(1, workers))
        submit = partial(pool.submit, transfer, client)
    try:
        client.makedirs(dest_root)
    except PermissionError:
        raise PermissionError(f"permission denied: user {hdfs_user()} may not create {dest}") from None
    remote = client.sizes(dest_root)
    recorded = read_recorded(client, dest_root) if CHECKSUMS in remote else {}
    jobs = [j for j in plan(src_root, remote, recorded) if j[0] != CHECKSUMS]
    summary = Summary(checksums={rel: rec for rel, rec in recorded.items() if rel in remote})
    write_recorded(client, dest_root, summary.checksums)  # fresh, then appended to as copies complete
    appender = RecordAppender(client, dest_root, record_every, record_seconds)
    total_bytes = sum(p.stat().st_size for _, p, action in jobs if action != "skip")
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress, desc="upload", file=sys.stderr)

    def settle(done) -> None:
        for future in done:
            outcome = future.result()
            summary.retried += outcome.retried
            if outcome.record:
                summary.checksums[outcome.rel] = outcome.record
                appender.add(outcome.rel, outcome.record)
            if outcome.status == "copied":
                summary.files += 1
                summary.bytes += outcome.size
            elif outcome.status == "skipped":
                summary.skipped += 1
            else:
                summary.failed[outcome.rel] = outcome.error
            if outcome.status != "skipped" or outcome.record:
                bar.update(outcome.size)

    try:
        with pool:
            in_flight: set = set()
            for rel, path, action in jobs:
                if len(in_flight) >= IN_FLIGHT_PER_WORKER * max(1, workers):
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    settle(done)
                in_flight.add(submit(dest_root, rel, path, action, retries))
            settle(wait(in_flight).done)
    finally:
        bar.close()
        appender.finish(dest_root, summary.checksums)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hdfs_io.upload", description=__doc__.split("\n")[0])
    p.add_argument("src", help="local folder")
    p.add_argument("dest", help="destination URI: hdfs://host:port/path, file:///path or a path")
    p.add_argument("--workers", type=int, default=8, help="parallel copies (default 8)")
    p.add_argument("--client", choices=["pyarrow", "pydoop"], default="pyarrow")
    p.add_argument("--retries", type=int, default=3, help="retries per file (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        s = upload(args.src, args.dest, args.workers, args.client, args.retries, progress=not args.quiet)
    except (ValueError, FilesystemUnavailable, PermissionError) as e:
        print(f"upload: error: {e}", file=sys.stderr)
        return 2
    print(f"upload: {s.files} files ({s.bytes} bytes) copied, {s.skipped} skipped, "
          f"{s.retried} retried, {len(s.failed)} failed")
    for rel, reason in sorted(s.failed.items()):
        print(f"upload: failed: {rel}: {reason}", file=sys.stderr)
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
