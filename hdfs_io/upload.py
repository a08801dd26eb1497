"""Upload a local tree of small files to HDFS (or any pyarrow URI): parallel, verified, resumable.

    python -m hdfs_io.upload SRC DEST_URI [--workers 8] [--client pyarrow|pydoop] [--retries 3]

Relative paths are kept. Each file is written as NAME._COPYING_, read back and
compared (size and CRC32), then renamed into place, so a killed upload never
leaves half a file under its final name. Every entry of SRC is copied or listed
as failed: a folder that cannot be listed, a symlink to nothing, a symlink that
leads back to a folder above it, a FIFO, socket or device, and a name that is
not UTF-8 (HDFS names must be). Other symlinks are followed.

A re-run copies only what is missing or differs. DEST/.upload-checksums.jsonl
records each verified copy: its size, CRC32 and the source's mtime. A file
whose copy has the recorded size, and whose size and mtime match the record, is
skipped without being read; one whose mtime changed is read and its CRC32
compared with the record; one without a record is read on both sides and
compared. Records are appended as copies complete (every `record_every` files
or `record_seconds`), so a killed upload's re-run reads back at most those last
few.

Memory does not grow with the tree. The source, the destination and the record
are each read in path order and merged as they stream; what is held is one
folder's listing per level on each side, at most 4 x workers files in flight,
and at most ORDER_WINDOW settled files waiting for an earlier one (records are
written in path order). Exit codes: 0 all copied, 1 some files failed after
retries (they are listed), 2 a user error.
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import multiprocessing
import os
import posixpath
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, groupby
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from pyarrow import fs as pafs
from tqdm import tqdm

from hdfs_io import prog
from hdfs_io.fs.filesystem import (FilesystemUnavailable, first_line, hdfs_address, hdfs_user, is_unicode, printable,
                                   probe_uri)

CHUNK_BYTES = 8 * 2**20
RECORD_CHUNK_BYTES = 2**16  # the record is read in small pieces: at 30M files it is about 3 GB
IN_FLIGHT_PER_WORKER = 4
ORDER_WINDOW = 10_000  # settled files that may wait for an earlier, slower one (a few MB)
RECORD_EVERY_FILES = 1000
RECORD_EVERY_SECONDS = 30.0
SPILL_AFTER_BATCHES = 10  # records kept in memory while appends fail, in batches of `record_every`
# A change to a file within the filesystem's timestamp granularity (ext4: a jiffy; FAT: 2 s) after it was
# read can leave its mtime as it was; a source modified less than this long before it is read gets no mtime
# in its record, so the next run compares its CRC32 instead of trusting size and mtime (git's "racy clean").
RACY_NS = 2 * 10**9
TMP_SUFFIX = "._COPYING_"
CHECKSUMS = ".upload-checksums.jsonl"
SEGMENT = re.compile(re.escape(CHECKSUMS) + r"\.(\d+)" + re.escape(TMP_SUFFIX))


class ArrowClient:
    """Destination operations through pyarrow.fs."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def list_dir(self, path: str) -> list[tuple[str, bool, int]]:
        """Returns (name, is a folder, size) for each entry of a folder; [] if it does not exist."""
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        return [(posixpath.basename(i.path), i.type == pafs.FileType.Directory, i.size or 0)
                for i in self.fs.get_file_info(selector) if i.type in (pafs.FileType.File, pafs.FileType.Directory)]

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def write(self, path: str, chunks: Iterable[bytes]) -> None:
        with self.fs.open_output_stream(path) as f:
            for chunk in chunks:
                f.write(chunk)

    def append(self, path: str, data: bytes) -> None:
        with self.fs.open_append_stream(path) as f:
            f.write(data)

    def read_chunks(self, path: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(chunk_bytes):
                yield chunk

    def replace(self, src: str, dst: str) -> None:
        if self.fs.get_file_info(dst).type != pafs.FileType.NotFound:
            self.fs.delete_file(dst)
        self.fs.move(src, dst)

    def delete(self, path: str) -> None:
        self.fs.delete_file(path)


class PydoopClient:
    """Destination operations through pydoop.hdfs (HDFS only)."""

    def __init__(self, uri: str):
        try:
            import pydoop.hdfs as phdfs
        except (ImportError, subprocess.CalledProcessError) as e:
            raise ValueError("--client pydoop needs pydoop and the `hadoop` command on PATH "
                             f"(here: . .devcluster/env.sh or scripts/hadoop_env.sh): {e}") from None

        self.fs = phdfs.hdfs(*hdfs_address(uri))  # a nameservice's ID keeps its case

    def list_dir(self, path: str) -> list[tuple[str, bool, int]]:
        """Returns (name, is a folder, size) for each entry of a folder; [] if it does not exist."""
        try:
            infos = self.fs.list_directory(path)
        except OSError:
            if not self.fs.exists(path):
                return []
            raise
        # the name is a whole URI; taken by text, since a URI parser ends a path at ';', '#' or '?'
        return [(posixpath.basename(i["name"]), i["kind"] == "directory", i["size"]) for i in infos]

    def makedirs(self, path: str) -> None:
        self.fs.create_directory(path)

    def write(self, path: str, chunks: Iterable[bytes]) -> None:
        with self.fs.open_file(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    def append(self, path: str, data: bytes) -> None:
        with self.fs.open_file(path, "ab") as f:
            f.write(data)

    def read_chunks(self, path: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        with self.fs.open_file(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                yield chunk

    def replace(self, src: str, dst: str) -> None:
        if self.fs.exists(dst):
            self.fs.delete(dst, recursive=False)
        self.fs.rename(src, dst)

    def delete(self, path: str) -> None:
        self.fs.delete(path, recursive=False)


class Record(NamedTuple):
    """A verified copy, as the checksum record keeps it."""

    size: int
    crc32: int
    mtime_ns: int | None  # the source's mtime when it was read; None where a change could have kept it (RACY_NS)


class LocalFile(NamedTuple):
    """One entry of the source tree: a file to copy, or why it cannot be copied."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    error: str = ""


@dataclass(frozen=True)
class Job:
    """One entry of the copy list."""

    rel: str
    action: str  # "copy", "verify" (no record), "check" (mtime changed), "skip", "keep" (no source), "fail"
    path: str = ""
    record: Record | None = None  # the recorded copy, for "check", "skip" and "keep", and for "fail" if any
    error: str = ""


@dataclass
class Outcome:
    rel: str
    status: str  # "copied", "skipped", "kept" (a copy without a source, its record carried over) or "failed"
    size: int
    record: Record | None = None  # of the verified copy, written to this run's record
    retried: int = 0
    error: str = ""


@dataclass
class Summary:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    retried: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shown name -> why


SETTLED_AT_ONCE = ("skip", "keep", "fail")  # the actions that need no I/O


def path_key(rel: str) -> tuple[str, ...]:
    """Returns the sort key of a relative path: by folder, then name, the order of a sorted depth-first walk.

    Plain string order would not do: "a-b" sorts before "a/b", but a walk lists all of "a/" first.
    """
    return tuple(rel.split("/"))


def is_record_name(name: str) -> bool:
    """Whether a name at the destination's top is the checksum record's, or a segment's."""
    return name == CHECKSUMS or name.startswith(CHECKSUMS + ".")


def walk_local(root: str) -> Iterator[tuple[str, LocalFile]]:
    """Returns an iterator of (relative path, LocalFile) over every entry under `root`, in path order.

    Only `root` is listed at once; the rest is listed as the iterator advances, holding one sorted
    folder listing per level. An entry that cannot be copied comes with its reason: a folder that cannot
    be listed (named `rel/`, for nothing under it is copied), a symlink to nothing, a symlink loop, a
    FIFO, socket or device, a name that is not UTF-8.

    Raises:
        OSError: `root` cannot be listed (PermissionError, NotADirectoryError, ...).
    """
    names = sorted(os.listdir(root))
    top = os.stat(root)
    return _walk(root, names, (top.st_dev, top.st_ino))


def _walk(root: str, names: list[str], top: tuple[int, int]) -> Iterator[tuple[str, LocalFile]]:
    # One (prefix, folder, names left, folders above) per level: an explicit stack, for trees of any depth.
    stack = [("", root, iter(names), frozenset([top]))]
    while stack:
        prefix, folder, entries, above = stack[-1]
        name = next(entries, None)
        if name is None:
            stack.pop()
            continue
        rel, path = prefix + name, os.path.join(folder, name)
        try:
            st = os.stat(path)
        except OSError as e:
            yield rel, LocalFile(path, error=unstatable(path, e))
            continue
        is_folder = stat.S_ISDIR(st.st_mode)
        if not is_unicode(name):
            nothing_under = "; nothing under it copied" if is_folder else ""
            yield rel + "/" * is_folder, LocalFile(path, error=f"the name is not UTF-8, as HDFS names must be "
                                                               f"(rename it){nothing_under}")
        elif is_folder:
            if (st.st_dev, st.st_ino) in above:
                yield rel, LocalFile(path, error=loop_reason(path))
                continue
            try:
                inside = sorted(os.listdir(path))
            except OSError as e:
                yield rel + "/", LocalFile(path, error=f"cannot list this folder, nothing under it copied: "
                                                       f"{first_line(e)}")
                continue
            stack.append((rel + "/", path, iter(inside), above | {(st.st_dev, st.st_ino)}))
        elif stat.S_ISREG(st.st_mode):
            yield rel, LocalFile(path, st.st_size, st.st_mtime_ns)
        else:
            yield rel, LocalFile(path, error=f"not a regular file but {special_kind(st.st_mode)}: not copied")


def unstatable(path: str, error: OSError) -> str:
    """Returns why an entry could not be looked at."""
    if isinstance(error, FileNotFoundError) and os.path.islink(path):
        return f"a symlink to {os.readlink(path)}, which does not exist"
    return first_line(error)


def loop_reason(path: str) -> str:
    """Returns why a folder that is also one above it is not followed."""
    if os.path.islink(path):
        return f"a symlink to {os.readlink(path)}, a folder above it: not followed"
    return "the same folder as one above it (a bind mount?): not followed"


def special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"


def walk_remote(client, root: str) -> Iterator[tuple[str, int]]:
    """Yields (relative path, size) of each file under `root` at the destination, in path order.

    Lists one folder at a time and holds one sorted listing per level. The checksum record and its
    segments at the top are left out.
    """
    stack = [("", iter(sorted(client.list_dir(root))))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, is_folder, size = entry
        rel = prefix + name
        if is_folder:
            stack.append((rel + "/", iter(sorted(client.list_dir(posixpath.join(root, rel))))))
        elif prefix or not is_record_name(name):
            yield rel, size


def _tagged(stream: Iterable[tuple[str, object]], tag: int) -> Iterator[tuple[str, int, object]]:
    for rel, item in stream:
        yield rel, tag, item


def align(*streams: Iterable[tuple[str, object]]) -> Iterator[tuple[str, list]]:
    """Merges streams of (relative path, item), each in path order, into (path, [its item or None per stream]).

    Holds one item per stream.
    """
    merged = heapq.merge(*(_tagged(s, i) for i, s in enumerate(streams)), key=lambda t: path_key(t[0]))
    for rel, group in groupby(merged, key=itemgetter(0)):
        items = [None] * len(streams)
        for _, tag, item in group:
            items[tag] = item
        yield rel, items


def copy_list(local: Iterable[tuple[str, LocalFile]], remote: Iterable[tuple[str, int]],
              recorded: Iterable[tuple[str, Record]]) -> Iterator[Job]:
    """Yields the upload's jobs in path order, from three streams in path order, consumed as it goes.

    Args:
        local: (rel, LocalFile) of the source, as `walk_local` yields them.
        remote: (rel, size) of the files at the destination, as `walk_remote` yields them.
        recorded: (rel, Record) of the checksum record, as `read_recorded` yields them.

    A source file is copied where the destination lacks it or has another size. Where the sizes agree,
    it is skipped if its record has its size and mtime, checked (its CRC32 against the record's) if only
    the mtime differs, and verified (both sides read) if it has no record. A destination file without a
    source keeps its record.
    """
    for rel, (here, size, record) in align(local, remote, recorded):
        if record is not None and record.size != size:
            record = None  # the copy is gone or was changed since it was recorded
        if here is None:
            if record is not None:
                yield Job(rel, "keep", record=record)
        elif here.error or ("/" not in rel and is_record_name(rel)):
            yield Job(rel, "fail", here.path, record, here.error or "the name is taken by the upload's checksum record")
        elif size != here.size:
            yield Job(rel, "copy", here.path)
        elif record is None:
            yield Job(rel, "verify", here.path)
        elif record.mtime_ns == here.mtime_ns:
            yield Job(rel, "skip", here.path, record)
        else:
            yield Job(rel, "check", here.path, record)


def local_chunks(path: str, crc_box: list[int]) -> Iterator[bytes]:
    """Yields a local file's chunks, keeping their running CRC32 in crc_box[0]."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc_box[0] = zlib.crc32(chunk, crc_box[0])
            yield chunk


def local_crc(path: str) -> tuple[int, int]:
    """Returns (size, CRC32) of a local file's bytes."""
    size, box = 0, [0]
    for chunk in local_chunks(path, box):
        size += len(chunk)
    return size, box[0]


def remote_crc(client, path: str) -> tuple[int, int]:
    size, crc = 0, 0
    for chunk in client.read_chunks(path):
        size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return size, crc


def trusted_mtime(path: str) -> int | None:
    """Returns a source's mtime, taken before it is read, or None if it is too recent to trust (RACY_NS)."""
    now = time.time_ns()
    mtime = os.stat(path).st_mtime_ns
    return mtime if now - mtime > RACY_NS else None


def copy_one(client, src: str, dst: str) -> Record:
    """Copies, verifies and renames one file into place; returns its record."""
    mtime = trusted_mtime(src)
    tmp = dst + TMP_SUFFIX
    box = [0]
    client.write(tmp, local_chunks(src, box))
    size, crc = remote_crc(client, tmp)
    local_size = os.stat(src).st_size
    if (size, crc) != (local_size, box[0]):
        raise OSError(f"verification failed: the copy reads back as {size} bytes with CRC32 {crc:08x}, "
                      f"the source is {local_size} bytes with CRC32 {box[0]:08x}")
    client.replace(tmp, dst)
    return Record(size, crc, mtime)


def verify_or_copy(client, src: str, dst: str) -> tuple[str, Record]:
    """Returns ("skipped", record) if the remote file already equals `src`, else copies it: ("copied", record)."""
    mtime = trusted_mtime(src)
    size, crc = local_crc(src)
    if remote_crc(client, dst) == (size, crc):
        return "skipped", Record(size, crc, mtime)
    client.makedirs(posixpath.dirname(dst))
    return "copied", copy_one(client, src, dst)


def check_or_copy(client, src: str, dst: str, recorded: Record) -> tuple[str, Record]:
    """Returns ("skipped", record) if `src` still has the recorded CRC32, else copies it: ("copied", record)."""
    mtime = trusted_mtime(src)
    size, crc = local_crc(src)
    if (size, crc) == recorded[:2]:
        return "skipped", Record(size, crc, mtime)
    client.makedirs(posixpath.dirname(dst))
    return "copied", copy_one(client, src, dst)


def transfer(client, dest_root: str, job: Job, retries: int) -> Outcome:
    """Carries out one job of the copy list with retries; returns what happened.

    Every I/O error, local (the file vanished) or remote (the read-back of a verify,
    the copy), is retried and then reported as a failed outcome, never raised.
    """
    if job.action == "skip":
        return Outcome(job.rel, "skipped", job.record.size, job.record)
    if job.action == "keep":
        return Outcome(job.rel, "kept", 0, job.record)
    if job.action == "fail":
        return Outcome(job.rel, "failed", 0, job.record, error=job.error)
    dst = posixpath.join(dest_root, job.rel)
    for attempt in range(retries + 1):
        try:
            if job.action == "check":
                status, record = check_or_copy(client, job.path, dst, job.record)
            elif job.action == "verify":
                status, record = verify_or_copy(client, job.path, dst)
            else:
                client.makedirs(posixpath.dirname(dst))
                status, record = "copied", copy_one(client, job.path, dst)
            return Outcome(job.rel, status, record.size, record, retried=attempt)
        except OSError as e:
            if attempt == retries:
                return Outcome(job.rel, "failed", 0, retried=attempt, error=first_line(e))
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def _settled(waiting: deque) -> Iterator[Outcome]:
    while waiting and (not isinstance(waiting[0], Future) or waiting[0].done()):
        head = waiting.popleft()
        yield head.result() if isinstance(head, Future) else head


def in_order(jobs: Iterable[Job], start: Callable[[Job], Outcome | Future], running: int,
             window: int) -> Iterator[Outcome]:
    """Yields each job's outcome in the order of `jobs`, starting jobs as earlier ones finish.

    `start` returns a job's Outcome, or a Future of it. At most `running` futures run at once, and at
    most `window` jobs wait to be yielded, so a slow job holds up the start of others only once `window`
    have queued behind it.
    """
    waiting: deque = deque()
    busy: set = set()
    for job in jobs:
        while len(busy) >= running or len(waiting) >= window:
            _, busy = wait(busy, return_when=FIRST_COMPLETED)
            yield from _settled(waiting)
        started = start(job)
        waiting.append(started)
        if isinstance(started, Future):
            busy.add(started)
        yield from _settled(waiting)
    while waiting:
        if isinstance(waiting[0], Future):
            wait([waiting[0]])
        yield from _settled(waiting)


def segment_name(number: int) -> str:
    return f"{CHECKSUMS}.{number}{TMP_SUFFIX}"


def read_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def record_line(rel: str, record: Record) -> bytes:
    return (json.dumps({"path": rel, "size": record.size, "crc32": record.crc32, "mtime_ns": record.mtime_ns})
            + "\n").encode()


def header_line(number: int) -> bytes:
    """The first line of a run's segment: which run wrote it, so that older segments are known as superseded."""
    return (json.dumps({"run": number}) + "\n").encode()


def parse_record(line: bytes) -> tuple[str, Record] | None:
    """Returns (rel, Record) of a record line, None for a header or a damaged line."""
    try:
        entry = json.loads(line)
        rel, mtime = entry["path"], entry.get("mtime_ns")
        if not isinstance(rel, str):
            return None
        return rel, Record(int(entry["size"]), int(entry["crc32"]), None if mtime is None else int(mtime))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def read_record_file(client, path: str) -> Iterator[tuple[str, Record]]:
    """Yields the records of one record file in path order; of two lines for one path, the later wins.

    A damaged line, or one out of path order (records before 2026-12-03 were kept in the order copies
    finished), is skipped: that file is only read back again. So is the rest of a file that cannot be read.
    """
    held, out_of_order = None, 0
    try:
        for line in read_lines(client.read_chunks(path, RECORD_CHUNK_BYTES)):
            parsed = parse_record(line)
            if parsed is None:
                continue
            if held is not None and parsed[0] != held[0]:
                if path_key(parsed[0]) < path_key(held[0]):
                    out_of_order += 1
                    continue
                yield held
            held = parsed
    except OSError as e:
        print(f"upload: warning: cannot read the checksum record {path} ({first_line(e)}); the files it "
              "records are read back", file=sys.stderr)
    if held is not None:
        yield held
    if out_of_order:
        print(f"upload: warning: {out_of_order} records of {path} are out of path order (an older upload's?); "
              "those files are read back once", file=sys.stderr)


def recorded_run(client, path: str) -> int:
    """Returns the number of the run that wrote a record file, from its first line (0 if it has none)."""
    try:
        with closing(client.read_chunks(path, RECORD_CHUNK_BYTES)) as chunks:
            return int(json.loads(next(read_lines(chunks), b"{}"))["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def record_files(client, dest_root: str) -> tuple[list[str], list[str], int]:
    """Returns the checksum record files at `dest_root`: (those to read, oldest first; the segments that a
    completed run removes; the number of the next run).

    The record names the run that wrote it; segments of killed runs after it are read too, later ones
    winning, and segments of runs before it (a run killed while it tidied up) are superseded.
    """
    names = [name for name, is_folder, _ in client.list_dir(dest_root) if not is_folder]
    segments = sorted((int(m.group(1)), name) for name in names if (m := SEGMENT.fullmatch(name)))
    base = recorded_run(client, posixpath.join(dest_root, CHECKSUMS)) if CHECKSUMS in names else 0
    live = [CHECKSUMS] * (CHECKSUMS in names) + [name for number, name in segments if number > base]
    return live, [name for _, name in segments], max([base, *(number for number, _ in segments)]) + 1


def read_recorded(client, dest_root: str, names: list[str] | None = None) -> Iterator[tuple[str, Record]]:
    """Yields every checksum record at `dest_root` in path order: the record's, merged with the segments of
    killed runs (`names`, oldest first, as `record_files` returns them); the newest record of a path wins."""
    if names is None:
        names = record_files(client, dest_root)[0]
    streams = [read_record_file(client, posixpath.join(dest_root, name)) for name in names]
    for rel, records in align(*streams):
        yield rel, next(r for r in reversed(records) if r is not None)


class RecordWriter:
    """Writes this run's checksum records, in path order, to a segment of its own, as files settle.

    The segment, DEST/.upload-checksums.jsonl.N._COPYING_, is appended to in batches (every
    `every_files` records or `every_seconds`), so a killed run leaves what it verified for the next
    (`read_recorded` merges it). A run that completes renames its segment to DEST/.upload-checksums.jsonl,
    which then holds every record, and removes the segments it read. Where appends are not supported
    (object stores) or keep failing, the records wait in a local temporary file, not in memory, and the
    segment is written whole at the end.
    """

    def __init__(self, client, dest_root: str, number: int, every_files: int, every_seconds: float):
        self.client, self.root = client, dest_root
        self.segment = posixpath.join(dest_root, segment_name(number))
        self.every_files, self.every_seconds = every_files, every_seconds
        self.pending: list[bytes] = []
        self.spool = None  # a local temporary file, once appends have failed
        self.last = time.monotonic()
        client.write(self.segment, [header_line(number)])

    def add(self, rel: str, record: Record) -> None:
        line = record_line(rel, record)
        if self.spool is not None:
            self.spool.write(line)
            return
        self.pending.append(line)
        if len(self.pending) >= self.every_files or time.monotonic() - self.last >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        """Appends the pending records; a failed append keeps them for the next flush, up to a point."""
        self.last = time.monotonic()
        if not self.pending:
            return
        try:
            self.client.append(self.segment, b"".join(self.pending))
            self.pending = []
        except NotImplementedError:
            self.spill()
        except OSError:
            # A record only saves a re-run's read-back: try again at the next flush, but hold only so many.
            if len(self.pending) >= SPILL_AFTER_BATCHES * self.every_files:
                self.spill()

    def spill(self) -> None:
        self.spool = tempfile.TemporaryFile()
        self.spool.write(b"\n")  # a failed append may have left half a line in the segment
        self.spool.writelines(self.pending)
        self.pending = []

    def close(self, complete: bool, superseded: Iterable[str] = ()) -> None:
        """Saves the records still pending; if the run is `complete`, makes its segment the record and
        removes the `superseded` segments. Failing that, says so: the next run reads those files back."""
        self.flush()
        if self.pending:
            self.spill()
        try:
            if self.spool is not None:
                self.spool.seek(0)
                whole = posixpath.join(self.root, CHECKSUMS + TMP_SUFFIX)
                spooled = iter(partial(self.spool.read, CHUNK_BYTES), b"")
                self.client.write(whole, chain(self.client.read_chunks(self.segment), spooled))
                self.client.replace(whole, self.segment)
                self.spool.close()
            if complete:
                self.client.replace(self.segment, posixpath.join(self.root, CHECKSUMS))
                for name in superseded:
                    self.client.delete(posixpath.join(self.root, name))
        except OSError as e:
            print(f"upload: warning: checksum records not saved ({first_line(e)}); a re-run reads back the files "
                  "this run verified", file=sys.stderr)


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
        PermissionError: `src` cannot be listed, or `dest` cannot be created.
        hdfs_io.fs.filesystem.FilesystemUnavailable: the destination cannot be reached.
    """
    if not Path(src).is_dir():
        raise ValueError(f"source {src} is not a local folder")
    try:
        local = walk_local(src)
    except PermissionError:
        raise PermissionError(f"permission denied: cannot list the source folder {src}") from None
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
    to_read, superseded, number = record_files(client, dest_root)
    writer = RecordWriter(client, dest_root, number, record_every, record_seconds)
    jobs = copy_list(local, walk_remote(client, dest_root), read_recorded(client, dest_root, to_read))
    summary = Summary()
    bar = tqdm(unit=" files", disable=not progress, desc="upload", file=sys.stderr)

    def start(job: Job) -> Outcome | Future:
        if job.action in SETTLED_AT_ONCE:
            return transfer(None, dest_root, job, retries)
        return submit(dest_root, job, retries)

    def settle(outcome: Outcome) -> None:
        summary.retried += outcome.retried
        if outcome.record:
            writer.add(outcome.rel, outcome.record)
        if outcome.status == "copied":
            summary.files += 1
            summary.bytes += outcome.size
        elif outcome.status == "skipped":
            summary.skipped += 1
        elif outcome.status == "failed":
            summary.failed[printable(outcome.rel)] = outcome.error
        if outcome.status != "kept":
            bar.update(1)

    complete = False
    try:
        with pool:
            for outcome in in_order(jobs, start, IN_FLIGHT_PER_WORKER * max(1, workers), ORDER_WINDOW):
                settle(outcome)
        complete = True
    finally:
        bar.close()
        writer.close(complete, superseded)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("hdfs_io.upload"), description=__doc__.split("\n")[0])
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
