"""Filesystems by URI: `hdfs://`, `file://` and plain paths, one handle per process.

Everything else in the project takes a `pyarrow.fs.FileSystem` and a path that
`open_filesystem` returned, or a `FilesystemRef` where an object crosses a
process boundary (Spark tasks, DataLoader workers).

HDFS is reached through one of two backends, chosen by `SPEECHPACK_HDFS_BACKEND`:
- `libhdfs` (the default): pyarrow's HadoopFileSystem, a JNI client that runs a
  JVM inside this process (about 2.5 s and 300 MB to start). A JVM does not
  survive fork: once one process has opened HDFS, a child forked from it hangs
  on its first HDFS call, even with a new handle. `open_filesystem` refuses
  that case with `ForkedJVMError` instead of hanging; open HDFS only inside
  workers, or start workers with `worker_start_method()`.
- `native`: hdfs-native, a Rust client with no JVM, wrapped as a pyarrow
  filesystem through fsspec. It reads `fs.defaultFS` and HA nameservices from
  `HADOOP_CONF_DIR`; replication is passed to it from there as libhdfs's is, and
  block size comes from the NameNode's defaults (README, "Two HDFS clients").
"""

from __future__ import annotations

import contextlib
import getpass
import os
import posixpath
import re
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from urllib.parse import urlparse

from pyarrow import fs as pafs

from hdfs_io import kerberos

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
            "with multiprocessing_context=hdfs_io.filesystem.worker_start_method()")
    key = (host, port, os.environ.get("HADOOP_USER_NAME"))
    if key not in _handles:
        try:
            handle = pafs.HadoopFileSystem(
                host, port,
                replication=client_replication(),
            )
        except OSError as e:
            where = f"{host}:{port}" if port else host
            raise FilesystemUnavailable(f"cannot open HDFS at {where}: {first_line(e)}") from e
        _jvm_pid = pid
        _handles[key] = handle
    return _handles[key]


BACKENDS = ("libhdfs", "native")
BACKEND_VARIABLE = "SPEECHPACK_HDFS_BACKEND"


class UnknownBackend(FilesystemUnavailable):
    """SPEECHPACK_HDFS_BACKEND names no backend: a user mistake, reported in one line like an unreachable HDFS."""


def hdfs_backend() -> str:
    """Returns the HDFS backend this process uses: SPEECHPACK_HDFS_BACKEND, else libhdfs.

    Raises:
        UnknownBackend: the variable names no backend.
    """
    name = os.environ.get(BACKEND_VARIABLE) or "libhdfs"
    if name not in BACKENDS:
        raise UnknownBackend(f"{BACKEND_VARIABLE}={name!r} names no HDFS backend; use one of {', '.join(BACKENDS)}")
    return name


def native_hdfs(host: str = "default", port: int = 0) -> pafs.FileSystem:
    """Returns this process's hdfs-native filesystem for `host:port` (no JVM), opening it once per process.

    Keyed by process too: a client's threads do not survive fork, so a forked worker opens its own.

    Raises:
        FilesystemUnavailable: hdfs-native is not installed or the address is not valid.
    """
    key = ("native", host, port, os.environ.get("HADOOP_USER_NAME"), os.getpid())
    if key not in _handles:
        try:
            from hdfs_native.fsspec import HdfsFileSystem
        except ImportError as e:
            raise FilesystemUnavailable(f"{BACKEND_VARIABLE}=native needs the hdfs-native package: {e}") from None
        try:
            client = HdfsFileSystem(None if host == "default" else host, port or None, skip_instance_cache=True)
        except Exception as e:  # hdfs-native raises plain exceptions for configuration errors
            where = f"{host}:{port}" if port else host
            raise FilesystemUnavailable(f"cannot open HDFS at {where}: {first_line(e)}") from e
        client.client = NativeCalls(client.client)
        global _native_opened
        _native_opened = True
        _handles[key] = pafs.PyFileSystem(StrictFSSpecHandler(client, client_replication()))
    return _handles[key]


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


class NativeCalls:
    """An hdfs-native object whose calls raise OSError for HDFS failures that hdfs-native gives no Python name.

    hdfs-native raises FileNotFoundError, PermissionError and the like where Python has a name,
    and RuntimeError for the rest: a NameNode in safe mode after a restart, a permission denied,
    a DataNode that broke off, a checksum that did not match. Those are I/O failures, as libhdfs's
    OSErrors for the same causes say (PermissionError for a denial), and the reader retries
    OSError. NotImplementedError (a file hdfs-native cannot read, such as one under an
    erasure-coding policy it lacks) stays as it is: not an outage, and not damage either
    (hdfs_io.chunks.proves_damage). Files and listings that a call returns are wrapped the same way.
    """

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        return _native_call(attr) if callable(attr) else attr


def _native_call(call):
    def wrapped(*args, **kwargs):
        with _native_errors_as_oserror():
            result = call(*args, **kwargs)
        if hasattr(result, "inner"):  # hdfs_native.FileReader / FileWriter over a Rust file
            result.inner = NativeCalls(result.inner)
        elif hasattr(result, "__next__"):  # a listing: its pages are fetched while iterating
            return _native_iteration(result)
        return result
    return wrapped


def _native_iteration(iterator):
    while True:
        with _native_errors_as_oserror():
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


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

    None (the platform default, fork) while no JVM runs in this process;
    "forkserver" once one does, so workers start from a clean interpreter.
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
    kept out of the user's terminal here and boiled down to one line.

    Raises:
        FilesystemUnavailable: the filesystem cannot be reached.
        PermissionError: HDFS refused this user access to the path.
        ForkedJVMError: see `hdfs`.
    """
    with captured_stderr() as captured:
        try:
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
