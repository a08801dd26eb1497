"""Filesystems by URI: `hdfs://`, `file://` and plain paths, one handle per process.

Everything else in the project takes a `pyarrow.fs.FileSystem` and a path that
`open_filesystem` returned, or a `FilesystemRef` where an object crosses a
process boundary (Spark tasks, DataLoader workers).

HDFS is reached through one of two backends, chosen by `SPEECHPACK_HDFS_BACKEND`:
- `native` (the default): hdfs-native, a Rust client with no JVM, wrapped as a pyarrow
  filesystem through fsspec. It reads `fs.defaultFS` and HA nameservices from
  `HADOOP_CONF_DIR`; replication is passed to it from there as libhdfs's is, and
  block size comes from the NameNode's defaults (README, "Two HDFS clients").
  hdfs-native has no timeout of its own on a NameNode that accepts and never
  answers, so its calls here have a deadline (`NativeCalls`, `native_call_seconds`).
  Its runtime's threads do not survive fork either, so workers start from a
  forkserver once it is open (`worker_start_method()`).
- `libhdfs`: pyarrow's HadoopFileSystem, a JNI client that runs a
  JVM inside this process (about 2.5 s and 300 MB to start). A JVM does not
  survive fork: once one process has opened HDFS, a child forked from it hangs
  on its first HDFS call, even with a new handle. `open_filesystem` refuses
  that case with `ForkedJVMError` instead of hanging; open HDFS only inside
  workers, or start workers with `worker_start_method()`. It needs Java and the
  Hadoop jars (`scripts/hadoop_env.sh`).
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import os
import posixpath
import queue
import re
import socket
import tempfile
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from itertools import islice
from urllib.parse import urlparse

from pyarrow import fs as pafs

from hdfs_io.fs import kerberos

_handles: dict[tuple, pafs.FileSystem] = {}
_jvm_pid: int | None = None  # the process that started libhdfs's JVM, if any
_native_opened = False  # whether this process opened hdfs-native, whose runtime threads a fork does not copy


class ForkedJVMError(RuntimeError):
    """HDFS was opened in a parent process before this one was forked from it."""


class FilesystemUnavailable(OSError):
    """A filesystem could not be reached; the message names it and says why."""


def open_filesystem(uri: str, backend: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Returns `(fs, path)` for a URI or a plain local path.

    `hdfs://host:port/p` gives a HadoopFileSystem (cached per process) and `/p`;
    `hdfs:///p` uses `fs.defaultFS` from `HADOOP_CONF_DIR`. `file:///p` and plain
    paths give the local filesystem and an absolute path. Other schemes go to
    `pyarrow.fs.FileSystem.from_uri`. `backend` picks the HDFS client (see
    `hdfs_backend`, the default).

    Raises:
        ForkedJVMError: HDFS was opened in a parent process before a fork.
        FilesystemUnavailable: HDFS could not be reached.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "hdfs":
        opener = native_hdfs if (backend or hdfs_backend()) == "native" else hdfs
        return opener(*hdfs_address(uri)), parsed.path or "/"
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def hdfs_address(uri: str) -> tuple[str, int]:
    """Returns the (host or nameservice, port) of an `hdfs://` URI: ("default", 0) for `hdfs:///p`, port 0 if none.

    The host keeps its case. Hadoop looks an HA nameservice up by its ID as written
    (`dfs.ha.namenodes.MyCluster`), and `urlparse(...).hostname` lowercases it.
    """
    parsed = urlparse(uri)
    host = parsed.netloc.rpartition("@")[2]  # without user information
    if host.startswith("["):  # an IPv6 address, perhaps with a port after it
        host = host[1:].partition("]")[0]
    else:
        host = host.partition(":")[0]
    return host or "default", parsed.port or 0


def libhdfs_setup() -> str:
    """Returns what to add to a libhdfs error when this environment lacks what libhdfs needs, else ""."""
    unset = [name for name in ("JAVA_HOME", "CLASSPATH", "ARROW_LIBHDFS_DIR") if not os.environ.get(name)
             and not (name == "ARROW_LIBHDFS_DIR" and os.environ.get("HADOOP_HOME"))]  # or HADOOP_HOME/lib/native
    if not unset:
        return ""
    return (f"; {' and '.join(unset)} unset: libhdfs needs Java, the Hadoop jars on CLASSPATH and libhdfs.so, "
            f"which `. scripts/hadoop_env.sh` sets (README, \"Two HDFS clients\"), or use "
            f"{BACKEND_VARIABLE}=native, which needs no Java")


def hdfs(host: str = "default", port: int = 0) -> pafs.HadoopFileSystem:
    """Returns this process's HadoopFileSystem for `host:port`, opening it once.

    Replication comes from the Hadoop configuration, so files get the cluster's replication,
    not pyarrow's 3. Under Kerberos the client logs in from the ticket cache that `KRB5CCNAME`
    names, as Hadoop's login user. The cache is not handed to pyarrow (`kerb_ticket`): that makes
    a separate user that the client never renews nor logs in again, so a read fails once the
    first ticket ends even when the cache holds a renewed one (tests/test_kerberos.py).
    """
    global _jvm_pid
    pid = os.getpid()
    if _jvm_pid is not None and _jvm_pid != pid:
        raise ForkedJVMError(
            f"HDFS was opened in process {_jvm_pid} before process {pid} was forked from it, "
            "and a JVM does not survive fork. Open HDFS only inside the workers, or start them "
            "with multiprocessing_context=hdfs_io.fs.filesystem.worker_start_method()")
    key = (host, port, os.environ.get("HADOOP_USER_NAME"))
    if key not in _handles:
        try:
            handle = pafs.HadoopFileSystem(
                host, port,
                replication=client_replication(),
            )
        except OSError as e:
            where = f"{host}:{port}" if port else host
            raise FilesystemUnavailable(f"cannot open HDFS at {where}: {first_line(e)}{libhdfs_setup()}") from e
        _jvm_pid = pid
        _handles[key] = handle
    return _handles[key]


BACKENDS = ("libhdfs", "native")
DEFAULT_BACKEND = "native"
BACKEND_VARIABLE = "SPEECHPACK_HDFS_BACKEND"


class UnknownBackend(FilesystemUnavailable):
    """SPEECHPACK_HDFS_BACKEND names no backend: a user mistake, reported in one line like an unreachable HDFS."""


def hdfs_backend() -> str:
    """Returns the HDFS backend this process uses: SPEECHPACK_HDFS_BACKEND, else native.

    Raises:
        UnknownBackend: the variable names no backend.
    """
    name = os.environ.get(BACKEND_VARIABLE) or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise UnknownBackend(f"{BACKEND_VARIABLE}={name!r} names no HDFS backend; use one of {', '.join(BACKENDS)}")
    return name


def native_hdfs(host: str = "default", port: int = 0) -> pafs.FileSystem:
    """Returns this process's hdfs-native filesystem for `host:port` (no JVM), opening it once per process.

    Keyed by process too: a client's threads do not survive fork, so a forked worker opens its own.
    Every call the client makes returns or fails within `native_call_seconds()`, and a NameNode that
    refuses connections is retried as a Java client would (`native_retry_policy`).

    Raises:
        FilesystemUnavailable: hdfs-native is not installed or the address is not valid.
    """
    key = ("native", host, port, os.environ.get("HADOOP_USER_NAME"), os.getpid())
    if key not in _handles:
        try:
            literal_paths_fs = literal_paths_fsspec()
        except ImportError as e:
            raise FilesystemUnavailable(f"the HDFS client hdfs-native ({BACKEND_VARIABLE}=native, the default) is not "
                                        f"installed: {e}; install it, or set {BACKEND_VARIABLE}=libhdfs") from None
        conf = hadoop_conf()
        nodes = namenodes(host, port, conf)
        where = nodes.name if nodes else host
        try:
            client = literal_paths_fs(None if host == "default" else host, port or None, skip_instance_cache=True,
                                      **native_retry_policy(nodes, conf))
        except Exception as e:  # hdfs-native raises plain exceptions for configuration errors
            raise FilesystemUnavailable(f"cannot open HDFS at {where}: {first_line(e)}") from e
        client.client = NativeCalls(client.client, native_call_seconds(), where)
        global _native_opened
        _native_opened = True
        _handles[key] = pafs.PyFileSystem(StrictFSSpecHandler(client, client_replication()))
    return _handles[key]


@functools.cache
def literal_paths_fsspec() -> type:
    """Returns hdfs-native's fsspec filesystem class, taking every path it is given literally.

    Its own `_strip_protocol` (hdfs-native 0.14) parses each path as a URL, so a name is cut at
    '#' or '?' and loses its tabs: a file written as `a#2.flac` became `a`, and a listed `a#2.flac`
    was then looked up as `a`. HDFS allows those characters in names, and the client underneath
    takes paths as they are.

    Raises:
        ImportError: hdfs-native is not installed.
    """
    from hdfs_native.fsspec import HdfsFileSystem

    class LiteralPathsHdfsFileSystem(HdfsFileSystem):
        @classmethod
        def _strip_protocol(cls, path: str) -> str:
            return literal_hdfs_path(path)

    return LiteralPathsHdfsFileSystem


def literal_hdfs_path(path: str) -> str:
    """Returns the path of `hdfs://authority/path` (or of a bare path) with every character kept, "/" if none."""
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return path or "/"


class StrictFSSpecHandler(pafs.FSSpecHandler):
    """pyarrow's handler for an fsspec filesystem, without fsspec's reading of an error as "not there",
    and writing files with the client's replication.

    fsspec's `isdir`/`isfile` answer False, and `walk` lists a folder as empty, when the call fails
    with an OSError; through pyarrow's handler a failed listing would come back short and a failed
    lookup as FileNotFoundError. Here only FileNotFoundError means "not there"; other errors raise.

    hdfs-native left to itself creates files with the NameNode's default replication; a Hadoop
    client (and libhdfs here) uses its own `dfs.replication`, so this handler asks for that.
    """

    def __init__(self, fs, replication: int):
        super().__init__(fs)
        self.replication = replication

    def open_output_stream(self, path, metadata):
        from pyarrow import PythonFile

        return PythonFile(self.fs.open(path, mode="wb", replication=self.replication), mode="w")

    def get_file_info_selector(self, selector):
        try:
            kind = self.fs.info(selector.base_dir)["type"]
        except FileNotFoundError:
            if selector.allow_not_found:
                return []
            raise
        if kind != "directory":
            raise NotADirectoryError(selector.base_dir)
        # Not fsspec's find: its walk drops on_error="raise" below the first level.
        found, folders = {}, [selector.base_dir]
        while folders:
            for info in self.fs.ls(folders.pop(), detail=True):
                found[info["name"]] = info
                if selector.recursive and info["type"] == "directory":
                    folders.append(info["name"])
        return [self._create_file_info(path, found[path]) for path in sorted(found)]

    def open_input_stream(self, path):
        return self._open_file(path)

    def open_input_file(self, path):
        return self._open_file(path)

    def _open_file(self, path):
        from pyarrow import PythonFile

        if self.fs.info(path)["type"] != "file":
            raise FileNotFoundError(path)
        return PythonFile(self.fs.open(path, mode="rb"), mode="r")


NATIVE_CALL_BYTES = 64 * 2**20  # the most one hdfs-native write moves: 0.5 MB/s fills the 120 s deadline
_LOCAL_CALLS = frozenset({"seek", "tell", "file_length"})  # a file's position and length, answered from memory
# An open file's bytes come from DataNodes: hdfs-native locates every block when it opens a file, and asks the
# NameNode only for its server defaults, on a client's first read (hdfs-native 0.14.7's debug log). So a client's
# first read runs with the deadline, and later ones on the caller's thread, where the reader's stall watchdog
# bounds a DataNode that hangs (hdfs_io.reader.chunks). On a pool thread a read's bytes come from that thread's malloc
# arena, and freeing them on this one made glibc give pages back and fault them in again: +60% on a 64 MiB read.
_DATANODE_READS = frozenset({"read", "read_range", "read_range_stream"})


class NativeCalls:
    """An hdfs-native object whose calls end within a deadline and raise OSError for HDFS failures that
    hdfs-native gives no Python name.

    hdfs-native raises FileNotFoundError, PermissionError and the like where Python has a name,
    and RuntimeError for the rest: a NameNode in safe mode after a restart, a permission denied,
    a DataNode that broke off, a checksum that did not match. Those are I/O failures, as libhdfs's
    OSErrors for the same causes say (PermissionError for a denial), and the reader retries
    OSError. NotImplementedError (a file hdfs-native cannot read, such as one under an
    erasure-coding policy it lacks) stays as it is: not an outage, and not damage either
    (hdfs_io.reader.chunks.proves_damage). Files and listings that a call returns are wrapped the same way.

    hdfs-native (0.14) waits without end on a NameNode that accepts a connection and never answers
    (one SIGSTOPped, or anything else on that port), whatever `dfs.client.socket-timeout` says. So each
    call runs on a pool thread and its caller waits `seconds` at most (`call_within`), but for reading an
    open file's bytes once the client has read some (`_DATANODE_READS`).
    """

    _listing_batch = 1000  # entries fetched per call while listing: the NameNode's page (dfs.ls.limit)
    _data_reads: frozenset[str] = frozenset()

    def __init__(self, inner, seconds: float, where: str, client: NativeCalls | None = None):
        self._inner, self._seconds, self._where = inner, seconds, where
        self._client = client or self  # the client's wrapper, shared by the files it opens
        self.has_read = False  # on the client's: whether one of its files' reads has returned

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr) or name in _LOCAL_CALLS:
            return attr
        return functools.partial(self._call, name in self._data_reads, attr)

    def _call(self, reads_data: bool, call, *args, **kwargs):
        on_this_thread = reads_data and self._client.has_read
        with _native_errors_as_oserror():
            if on_this_thread:
                result = call(*args, **kwargs)
            else:
                result = call_within(functools.partial(call, *args, **kwargs), self._seconds, self._where)
        if reads_data:
            self._client.has_read = True
        if hasattr(result, "inner"):  # hdfs_native.FileReader / FileWriter over a Rust file
            result.inner = NativeFile(result.inner, self._seconds, self._where, self._client)
        elif hasattr(result, "__next__"):  # a listing or a stream of a file's bytes: fetched while iterating
            return self._iteration(on_this_thread, result, 1 if reads_data else self._listing_batch)
        return result

    def _iteration(self, on_this_thread: bool, iterator, batch_size: int):
        while True:
            take = functools.partial(_take, iterator, batch_size)
            with _native_errors_as_oserror():
                batch = take() if on_this_thread else call_within(take, self._seconds, self._where)
            yield from batch
            if len(batch) < batch_size:
                return


class NativeFile(NativeCalls):
    """An hdfs-native file whose writes hand hdfs-native at most NATIVE_CALL_BYTES per call,
    so that the deadline bounds a stall (a NameNode that does not answer for the next block) rather than
    the size of a write."""

    _data_reads = _DATANODE_READS

    def write(self, buf) -> int:
        view = memoryview(buf).cast("B")
        for start in range(0, len(view), NATIVE_CALL_BYTES):
            self._call(False, self._inner.write, view[start:start + NATIVE_CALL_BYTES])
        return len(view)


def _take(iterator, count: int) -> list:
    return list(islice(iterator, count))


def call_within(call, seconds: float, where: str):
    """Returns `call()`, run on a daemon thread of this process's pool, waiting for it at most `seconds`.

    A call that outlives its deadline is left to finish, or hang, on its thread; a daemon thread
    does not keep the process from exiting. Threads are reused: handing a call to an idle one costs
    half of starting a thread, which a small file's open and read pay about five times.

    Raises:
        TimeoutError: `call` did not return within `seconds`; the message names `where`.
        Whatever `call` raised.
    """
    try:
        runner = _idle_runners.pop()
    except IndexError:  # all busy, or none yet
        runner = _CallRunner()
    outcome: list = []
    finished = threading.Lock()  # held until the call ends: a lock hands over faster than an Event
    finished.acquire()
    runner.calls.put((call, outcome, finished))
    if not finished.acquire(timeout=seconds):
        raise TimeoutError(f"HDFS at {where} did not answer within {seconds:g} s ({RPC_TIMEOUT_KEY})")
    returned, value = outcome[0]
    if not returned:
        raise value
    return value


class _CallRunner:
    """A daemon thread that runs the calls put on its queue, one at a time, and is idle between them."""

    def __init__(self):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="hdfs-native calls", daemon=True).start()

    def _serve(self):
        while True:
            call, outcome, finished = self.calls.get()
            try:
                outcome.append((True, call()))
            except BaseException as e:  # handed to the caller, which raises it
                outcome.append((False, e))
            _idle_runners.append(self)  # also once a call that outlived its deadline ends
            finished.release()  # after: the caller's next call finds this thread idle instead of starting one


_idle_runners: list[_CallRunner] = []
os.register_at_fork(after_in_child=_idle_runners.clear)  # a forked child has none of its parent's threads


RPC_TIMEOUT_KEY = "ipc.client.rpc-timeout.ms"
HADOOP_RPC_TIMEOUT_MS = 120_000  # Hadoop's default (HADOOP-17552), and the reader's default stall_seconds


def native_call_seconds() -> float:
    """Returns how long one hdfs-native call may take before it fails with TimeoutError: `ipc.client.rpc-timeout.ms`
    from HADOOP_CONF_DIR, else Hadoop's default of 120 s.

    A Java client reads 0 as "no timeout"; here it is the default, so that no call waits without end.
    """
    ms = int(hadoop_conf().get(RPC_TIMEOUT_KEY, HADOOP_RPC_TIMEOUT_MS))
    return (ms if ms > 0 else HADOOP_RPC_TIMEOUT_MS) / 1000


HADOOP_NAMENODE_PORT = 8020  # where an hdfs:// URI names no port


@dataclass(frozen=True)
class NameNodes:
    """The NameNodes that an `hdfs://` authority names: one, or an HA nameservice's."""

    name: str  # the nameservice, or host:port of the one NameNode
    addresses: tuple[tuple[str, int], ...]
    nameservice: bool


def namenodes(host: str, port: int, conf: dict[str, str]) -> NameNodes | None:
    """Returns the NameNodes that `(host, port)`, as `hdfs_address` gives them, names under the Hadoop configuration
    `conf`; None where `conf` does not say (`hdfs:///` without an `hdfs://` fs.defaultFS).

    A host without a port that `dfs.ha.namenodes.<host>` lists is an HA nameservice, its NameNodes at
    `dfs.namenode.rpc-address.<host>.<id>`, as Hadoop's ConfiguredFailoverProxyProvider finds them.
    """
    if host == "default":
        default = conf.get("fs.defaultFS", "")
        if urlparse(default).scheme != "hdfs" or hdfs_address(default)[0] == "default":
            return None
        host, port = hdfs_address(default)
    ids = conf.get(f"dfs.ha.namenodes.{host}")
    if ids and not port:
        rpc = (conf.get(f"dfs.namenode.rpc-address.{host}.{i.strip()}") for i in ids.split(","))
        return NameNodes(host, tuple(hdfs_address(f"hdfs://{a}") for a in rpc if a), nameservice=True)
    address = (host, port or HADOOP_NAMENODE_PORT)
    return NameNodes(address_text(address), (address,), nameservice=False)


def address_text(address: tuple[str, int]) -> str:
    """Returns `host:port`, with an IPv6 host in brackets."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def native_retry_policy(nodes: NameNodes | None, conf: dict[str, str]) -> dict[str, str]:
    """Returns the hdfs-native settings that retry an unreachable NameNode as a Java client would.

    hdfs-native retries any NameNode by its HA failover policy (`dfs.client.failover.*`, Hadoop's defaults: 15
    attempts backing off to 15 s apart), a single one too, so a port that refused connections held a call for
    about three minutes. A Java client retries a single NameNode `ipc.client.connect.max.retries` times (default
    10), `ipc.client.connect.retry.interval` apart (1 s): that is what hdfs-native is given for one. An HA
    nameservice keeps its failover policy, as in Java; with every NameNode refusing, a pair gives up in a minute.
    """
    if nodes is None or nodes.nameservice:
        return {}
    retries = conf.get("ipc.client.connect.max.retries", "10")
    interval_ms = conf.get("ipc.client.connect.retry.interval", "1000")
    return {"dfs.client.failover.max.attempts": retries, "dfs.client.failover.sleep.base.millis": interval_ms,
            "dfs.client.failover.sleep.max.millis": interval_ms}


@contextlib.contextmanager
def _native_errors_as_oserror():
    try:
        yield
    except (NotImplementedError, RecursionError):
        raise
    except RuntimeError as e:
        # hdfs-native names the NameNode's Java exception first, its message and trace escaped after it:
        # RPCError("org.apache...Exception", "message\n\tat ...")
        java = re.match(r'RPCError\("([\w.$]+)", "((?:[^"\\]|\\[^n])*)', str(e))
        error = _JAVA_ERRORS.get(java.group(1) if java else "", OSError)
        message = re.sub(r"\\(.)", r"\1", java.group(2)).strip() if java else ""
        raise error(f"HDFS: {java.group(1)}: {message}" if message else f"HDFS: {first_line(e)}") from e


_JAVA_ERRORS = {"org.apache.hadoop.security.AccessControlException": PermissionError}


def jvm_started() -> bool:
    """Returns True if this process (or a parent it was forked from) has opened HDFS."""
    return _jvm_pid is not None


def worker_start_method() -> str | None:
    """Returns the multiprocessing start method that is safe for HDFS workers here.

    None (the platform default, fork) while this process has opened no HDFS client; "forkserver" once
    it has (libhdfs's JVM or hdfs-native's runtime threads, which a fork does not copy), so workers fork
    from a process that never opened one (`hdfs_io.reader.shard_reader.worker_context` preloads it).
    """
    return "forkserver" if jvm_started() or _native_opened else None


@dataclass(frozen=True)
class FilesystemRef:
    """A picklable stand-in for `(fs, path)`: it opens the filesystem in whichever process uses it."""

    uri: str
    backend: str | None = None  # the HDFS backend; None: this process's SPEECHPACK_HDFS_BACKEND

    def open(self) -> tuple[pafs.FileSystem, str]:
        return open_filesystem(self.uri, self.backend)


def join_uri(uri: str, *parts: str) -> str:
    """Returns `uri` with path parts appended, keeping its scheme and authority."""
    return posixpath.join(uri.rstrip("/") if uri.rstrip("/") else "/", *parts)


def uri_base(uri: str) -> str:
    """Returns the scheme and authority of `uri` ('hdfs://nn:8020'); '' for local paths and file:// URIs.

    `uri_base(uri) + path` rebuilds a URI from a path that open_filesystem returned.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return ""
    return f"{parsed.scheme}://{parsed.netloc}"


def hadoop_conf(conf_dir: str | os.PathLike | None = None,
                files: tuple[str, ...] = ("core-site.xml", "hdfs-site.xml")) -> dict[str, str]:
    """Returns the properties of `files` in `conf_dir`, default $HADOOP_CONF_DIR (empty if unset)."""
    conf_dir = conf_dir or os.environ.get("HADOOP_CONF_DIR")
    props: dict[str, str] = {}
    if not conf_dir:
        return props
    for name in files:
        try:
            root = ElementTree.parse(os.path.join(conf_dir, name)).getroot()
        except (OSError, ElementTree.ParseError):
            continue
        for prop in root.iter("property"):
            key, value = prop.findtext("name"), prop.findtext("value")
            if key and value is not None:
                props[key.strip()] = value.strip()
    return props


def client_replication() -> int:
    """Returns the replication a Hadoop client asks for: `dfs.replication` from HADOOP_CONF_DIR, else Hadoop's 3."""
    return int(hadoop_conf().get("dfs.replication", 3))


def probe_uri(uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """Returns `(fs, path, info)` for a URI, checking on the way that its filesystem answers.

    libhdfs prints Java stack traces to stderr on every failed call; they are
    kept out of the user's terminal here and boiled down to one line. An `hdfs://`
    URI whose NameNodes all refuse connections fails at once, not after a client's
    retries (`refuse_if_no_namenode_listens`).

    Raises:
        FilesystemUnavailable: the filesystem cannot be reached.
        PermissionError: HDFS refused this user access to the path.
        ForkedJVMError: see `hdfs`.
    """
    with captured_stderr() as captured:
        try:
            if urlparse(uri).scheme == "hdfs":
                refuse_if_no_namenode_listens(uri)
            fs, path = open_filesystem(uri)
            # libhdfs reports an unreachable NameNode as "not found"; the root always exists.
            if isinstance(fs, pafs.HadoopFileSystem) and fs.get_file_info("/").type != pafs.FileType.Directory:
                raise OSError("the NameNode did not answer (is HDFS running at that host and port?)")
            info = fs.get_file_info(path)
            if isinstance(fs, pafs.HadoopFileSystem) and info.type == pafs.FileType.NotFound:
                refuse_if_denied(fs, path, uri)
            return fs, path, info
        except PermissionError:
            if urlparse(uri).scheme != "hdfs":
                raise
            raise PermissionError(f"permission denied: HDFS refuses user {hdfs_user()} access to {uri}") from None
        except FilesystemUnavailable:
            raise
        except OSError as e:
            ticket = kerberos.ticket_problem() if kerberos_enabled() else None
            if ticket:
                raise FilesystemUnavailable(f"cannot authenticate to {uri}: {ticket}") from None
            cause = java_exception_line(captured.read()) or first_line(e)
            raise FilesystemUnavailable(f"cannot reach {uri}: {cause}") from None


PROBE_CONNECT_SECONDS = 2.0  # a NameNode port that neither accepts nor refuses by then is left to the client


def refuse_if_no_namenode_listens(uri: str) -> None:
    """Raises FilesystemUnavailable if every NameNode that the `hdfs://` URI names refuses TCP connections.

    A client says the same only after its retries: seconds for one NameNode, a minute for an HA pair
    (`native_retry_policy`). A NameNode that accepts the connection, or does not refuse within
    PROBE_CONNECT_SECONDS, is left to the client.
    """
    nodes = namenodes(*hdfs_address(uri), hadoop_conf())
    if nodes is None or not nodes.addresses or not all(map(refuses_connections, nodes.addresses)):
        return
    if nodes.nameservice:
        listed = ", ".join(map(address_text, nodes.addresses))
        raise FilesystemUnavailable(
            f"cannot reach {uri}: every NameNode of {nodes.name} refuses connections ({listed})")
    raise FilesystemUnavailable(f"cannot reach {uri}: the NameNode at {nodes.name} refuses connections "
                                "(is HDFS running at that host and port?)")


def refuses_connections(address: tuple[str, int]) -> bool:
    """Returns True if `address` refuses a TCP connection; False if it accepts one, or neither within
    PROBE_CONNECT_SECONDS, or cannot be looked up."""
    try:
        socket.create_connection(address, timeout=PROBE_CONNECT_SECONDS).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def refuse_if_denied(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """Raises PermissionError if `path` looked missing only because HDFS denied access to it.

    libhdfs reports a path under a folder this user may not enter as "not found";
    listing the path tells the two apart.
    """
    try:
        fs.get_file_info(pafs.FileSelector(path))
    except PermissionError:
        raise PermissionError(f"permission denied: HDFS refuses user {hdfs_user()} access to {uri}") from None
    except OSError:
        pass


def hdfs_user() -> str:
    """Returns whom HDFS takes this process for: where HDFS uses Kerberos, the principal of the ticket cache
    (HDFS maps it to a short name by `hadoop.security.auth_to_local`); under simple authentication
    HADOOP_USER_NAME, else the login name."""
    if kerberos_enabled():
        return kerberos.ticket_principal() or f"{getpass.getuser()} (Kerberos principal unknown)"
    return os.environ.get("HADOOP_USER_NAME") or getpass.getuser()


def kerberos_enabled() -> bool:
    """Returns True if the Hadoop configuration says HDFS authenticates with Kerberos."""
    return hadoop_conf().get("hadoop.security.authentication", "simple").lower() == "kerberos"


def failure_cause(error: BaseException) -> str:
    """Returns the first line of a failed HDFS call's error, and where HDFS uses Kerberos and this process's
    ticket is missing or expired, that too."""
    ticket = kerberos_enabled() and kerberos.ticket_problem()
    return f"{first_line(error)}; {ticket}" if ticket else first_line(error)


@contextlib.contextmanager
def captured_stderr():
    """Redirects file descriptor 2 (where libhdfs writes) into a temp file, yielded for reading."""
    with tempfile.TemporaryFile(mode="w+", errors="replace") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)


def java_exception_line(text: str) -> str | None:
    """Returns the first 'java...Exception: message' line of a captured libhdfs trace, if any."""
    for line in text.splitlines():
        head = line.split(":", 1)[0]
        if "." in head and head.strip().endswith(("Exception", "Error")) and not line.startswith("\t"):
            return line.strip()
    return None


def first_line(error: BaseException) -> str:
    """Returns the first non-empty line of an exception's message (libhdfs appends Java traces)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def is_unicode(text: str) -> bool:
    """Returns False if `text` holds a lone surrogate, which no UTF-8 (nor Arrow) string can hold.

    JSON can spell one ("\\ud800"), and os.fsdecode makes one of each byte of a
    local file name that is not UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """Returns `text` with its lone surrogates spelled out: a non-UTF-8 file name's bytes as `\\xe9`."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

