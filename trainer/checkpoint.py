"""Checkpoints and the metrics history in --out, on any filesystem: replaced so that one always exists.

A checkpoint is written to NAME.tmp, the previous one is renamed to NAME.prev, the
new one is renamed to NAME, and only then NAME.prev is deleted. A crash at any
point leaves NAME or NAME.prev whole, and `load` finds whichever is there. HDFS
cannot rename over an existing file, so no step relies on that.

metrics.jsonl is appended to at each checkpoint, before the checkpoint is
written; at a resume, the lines after the checkpoint's step (written by the
attempt that died) are cut off, so the history holds every step once.
"""

from __future__ import annotations

import io
import json
import posixpath

import torch
from pyarrow import fs as pafs

from hdfs_io.fs.filesystem import open_filesystem

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
TMP_SUFFIX = ".tmp"
PREVIOUS_SUFFIX = ".prev"


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_atomically(uri: str, data: bytes) -> None:
    """Replaces the file at `uri` with `data`; a crash at any point leaves the old or the new file whole."""
    fs, path = open_filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp, previous = path + TMP_SUFFIX, path + PREVIOUS_SUFFIX
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    if _exists(fs, path):
        if _exists(fs, previous):
            fs.delete_file(previous)
        fs.move(path, previous)
    fs.move(tmp, path)
    if _exists(fs, previous):
        fs.delete_file(previous)


def read_latest(uri: str) -> tuple[str, bytes] | None:
    """Returns (the URI read, its bytes) of the file at `uri`, or of its previous version if a replace was cut off.

    None when neither exists. A NAME.tmp is never read: it may be incomplete.
    """
    fs, path = open_filesystem(uri)
    for suffix in ("", PREVIOUS_SUFFIX):
        if _exists(fs, path + suffix):
            with fs.open_input_stream(path + suffix) as f:
                return uri + suffix, f.read()
    return None


def save(out: str, checkpoint: dict) -> None:
    """Writes `checkpoint` to OUT/checkpoint.pt, keeping the previous one until the new one is in place."""
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    write_atomically(f"{out.rstrip('/')}/{CHECKPOINT}", buf.getvalue())


def load(out: str) -> tuple[dict, str] | None:
    """Returns (the checkpoint in OUT, the URI it came from), or None when there is none."""
    return load_file(f"{out.rstrip('/')}/{CHECKPOINT}")


def load_file(uri: str) -> tuple[dict, str] | None:
    """Returns (the checkpoint at `uri` or its previous version, the URI read), or None when neither exists."""
    found = read_latest(uri)
    if found is None:
        return None
    where, data = found
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False), where


def append_metrics(out: str, lines: list[str]) -> None:
    """Appends JSON lines to OUT/metrics.jsonl, creating it if needed: the bytes written are the new lines only."""
    if not lines:
        return
    fs, path = open_filesystem(f"{out.rstrip('/')}/{METRICS}")
    data = "".join(lines).encode()
    if _exists(fs, path):
        with fs.open_append_stream(path) as f:
            f.write(data)
    else:
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def cut_metrics(out: str, last_step: int) -> None:
    """Keeps the lines of OUT/metrics.jsonl up to step `last_step` (the checkpoint a run resumes from).

    Lines past it were written by an attempt that died after appending them and
    before its checkpoint landed; the resumed run writes those steps again.
    """
    found = read_latest(f"{out.rstrip('/')}/{METRICS}")
    if found is None:
        return
    kept = [line for line in found[1].decode("utf-8", "replace").splitlines(keepends=True)
            if _step(line) is not None and _step(line) <= last_step]
    write_atomically(f"{out.rstrip('/')}/{METRICS}", "".join(kept).encode())


def _step(line: str) -> int | None:
    """Returns the step of a metrics line; None for a line torn by a crash mid-append."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def start_metrics(out: str) -> None:
    """Starts an empty history in OUT/metrics.jsonl for a run that does not resume."""
    write_atomically(f"{out.rstrip('/')}/{METRICS}", b"")
