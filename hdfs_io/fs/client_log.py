"""The HDFS client's log: where a process sends what is written to its stderr from below Python.

libhdfs prints a Java stack trace for every failed call, and the Hadoop client logs there (log4j's
console appender): dozens of lines per retry, over 2,000 when a Kerberos ticket ends mid-read.
`send_native_stderr` sends file descriptor 2 to a log file and moves Python's `sys.stderr` (error
lines, tracebacks, progress bars) to a copy of the old descriptor, so the terminal keeps those.
Everything else written to descriptor 2 goes to the log too (a C library's messages, a child's
stderr), so only processes that own no such output use it: the `read` command and the reader's
DataLoader workers, not the trainer's ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile

LOG_VARIABLE = "SPEECHPACK_HDFS_LOG"
_sent_to: str | None = None  # where this process's descriptor 2 goes, once sent


def path() -> str:
    """Returns the log of this process and its children: the file SPEECHPACK_HDFS_LOG names, else a new one
    in the temp folder, named to the children in SPEECHPACK_HDFS_LOG and removed at exit if still empty."""
    log = os.environ.get(LOG_VARIABLE)
    if not log:
        handle, log = tempfile.mkstemp(prefix="speechpack-hdfs-", suffix=".log")
        os.close(handle)
        os.environ[LOG_VARIABLE] = log
        atexit.register(_remove_if_empty, log)
    return log


def send_native_stderr(log: str | None = None) -> str | None:
    """Sends file descriptor 2 to `log` (default `path()`), keeping `sys.stderr` on the old descriptor.

    Once per process; a forked child inherits it, and a worker started from a forkserver whose parent
    did it already writes all its stderr to the log. Returns the log, or None where this process has
    no stderr to keep.
    """
    global _sent_to
    if _sent_to is None:
        if sys.stderr is None:
            return None
        try:
            sys.stderr.flush()
            terminal = os.dup(2)
        except OSError:
            return None
        log = log or path()
        sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                               errors="backslashreplace")
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        _sent_to = log
    return _sent_to


def note() -> str:
    """Returns ' (HDFS client log: PATH)' once this process sends its native stderr to a log, else ''."""
    return f" (HDFS client log: {_sent_to})" if _sent_to else ""


def _remove_if_empty(log: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.getsize(log) == 0:
            os.unlink(log)
