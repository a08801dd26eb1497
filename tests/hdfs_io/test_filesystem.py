"""hdfs_io.fs.filesystem on the local filesystem and on the real local HDFS."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hdfs_io.fs.filesystem import (BACKEND_VARIABLE, BACKENDS, FilesystemRef, ForkedJVMError, hdfs_address, join_uri,
                                   open_filesystem, worker_start_method)
from scripts.devcluster import ROOT


class FileBytes(IterableDataset):
    """Yields (worker id, bytes) for each file, each worker reading its share through its own handle."""

    def __init__(self, folder: FilesystemRef, names: list[str]):
        self.folder, self.names = folder, names

    def __iter__(self):
        info = get_worker_info()
        fs, path = self.folder.open()
        for name in self.names[info.id::info.num_workers]:
            with fs.open_input_stream(f"{path}/{name}") as f:
                yield info.id, name, f.read()


def write_files(uri: str, count: int) -> dict[str, bytes]:
    fs, path = open_filesystem(uri)
    files = {f"utt-{i:04d}.bin": bytes([i]) * (100 + i) for i in range(count)}
    for name, data in files.items():
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(data)
    return files


def test_plain_path_and_file_uri_resolve_to_the_same_local_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")

    fs1, p1 = open_filesystem(str(tmp_path / "a.txt"))
    fs2, p2 = open_filesystem(f"file://{tmp_path}/a.txt")

    assert isinstance(fs1, pafs.LocalFileSystem) and isinstance(fs2, pafs.LocalFileSystem)
    assert p1 == p2 == str(tmp_path / "a.txt")
    assert fs2.open_input_stream(p2).read() == b"abc"


def test_join_uri_keeps_scheme_and_authority():
    assert join_uri("hdfs://nn:8020/data/", "shards", "part-00000.parquet") == \
        "hdfs://nn:8020/data/shards/part-00000.parquet"
    assert join_uri("/local/x", "y") == "/local/x/y"


def test_an_hdfs_address_keeps_the_case_of_its_nameservice():
    assert [hdfs_address(uri) for uri in ("hdfs://MyCluster/data", "hdfs://alice@MyCluster:8020/data",
                                          "hdfs:///data", "hdfs://[::1]:9820/data")] == [
        ("MyCluster", 0), ("MyCluster", 8020), ("default", 0), ("::1", 9820)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hdfs_file_is_read_back_listed_and_seen_by_the_hadoop_cli(cluster, hdfs_dir, backend):
    fs, path = open_filesystem(f"{hdfs_dir}/hello.bin", backend)
    payload = bytes(range(256)) * 1000

    with fs.open_output_stream(path) as f:
        f.write(payload)

    assert fs.open_input_stream(path).read() == payload
    listed = fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0]))
    assert [(i.base_name, i.size) for i in listed] == [("hello.bin", len(payload))]
    ls = cluster.hadoop("dfs", "-ls", hdfs_dir).stdout
    assert f"{len(payload)}" in ls and "hello.bin" in ls
    # the cluster's replication (2), not pyarrow's default of 3
    assert cluster.hadoop("dfs", "-stat", "%r", f"{hdfs_dir}/hello.bin").stdout.strip() == "2"


@pytest.mark.parametrize("backend", BACKENDS)
def test_names_with_a_hash_a_question_mark_a_tab_or_a_percent_are_taken_literally(hdfs_dir, backend):
    # HDFS allows them in a name, and a URI parser reads '#' and '?' as its end and drops tabs
    fs, path = open_filesystem(hdfs_dir, backend)
    names = ["a#2.flac", "b?x.flac", "t\there.flac", "c%20d.flac", "sp ace.flac"]
    for name in names:
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(name.encode())

    listed = fs.get_file_info(pafs.FileSelector(path))

    assert sorted(info.base_name for info in listed) == sorted(names)
    for info in listed:
        assert fs.get_file_info(info.path).size == len(info.base_name.encode())
        with fs.open_input_file(info.path) as f:
            assert f.read() == info.base_name.encode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_hdfs_refusal_without_a_python_name_is_an_oserror_on_both_backends(cluster, hdfs_dir, backend):
    # The reader retries OSError and takes anything else for damage: a NameNode in safe mode is an outage.
    fs, path = open_filesystem(hdfs_dir, backend)
    cluster.hadoop("dfsadmin", "-safemode", "enter")
    try:
        with pytest.raises(OSError) as made:
            fs.create_dir(f"{path}/made-in-safe-mode")
        with pytest.raises(OSError) as written:
            with fs.open_output_stream(f"{path}/written-in-safe-mode.bin") as f:
                f.write(b"x")
    finally:
        cluster.hadoop("dfsadmin", "-safemode", "leave")
    for error in (made.value, written.value):
        assert not isinstance(error, (FileNotFoundError, PermissionError)), error  # an outage, not an answer
        assert "\tat " not in str(error)  # no Java traces


LIST_AS_ANOTHER_USER = """
import sys
from pyarrow import fs as pafs
from hdfs_io.fs.filesystem import open_filesystem
fs, path = open_filesystem(sys.argv[1])
try:
    print(len(fs.get_file_info(pafs.FileSelector(path, recursive=True))))
except OSError as e:
    print(type(e).__name__)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_listing_that_hdfs_refuses_in_part_raises_instead_of_coming_back_short(cluster, hdfs_dir, backend):
    # fsspec lists a folder it may not read as empty; a pack or an upload resumed from that would miss files
    fs, path = open_filesystem(hdfs_dir, backend)
    for name in ("open/a.bin", "closed/b.bin"):
        fs.create_dir(f"{path}/{name.split('/')[0]}")
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(b"x")
    cluster.hadoop("dfs", "-chmod", "700", f"{path}/closed")
    env = dict(cluster.env, HADOOP_USER_NAME="mallory", **{BACKEND_VARIABLE: backend})

    listed = subprocess.run([sys.executable, "-c", LIST_AS_ANOTHER_USER, hdfs_dir], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)

    assert listed.stdout.strip() == "PermissionError", listed.stdout + listed.stderr[-2000:]


def client_conf(folder: Path, core_site: dict[str, str], hdfs_site: dict[str, str]) -> dict[str, str]:
    """Writes a client HADOOP_CONF_DIR and returns the environment that points both backends at it.

    hdfs-native reads HADOOP_CONF_DIR; libhdfs's JVM reads the configuration folder on its CLASSPATH.
    """
    def site(properties: dict[str, str]) -> str:
        return "<configuration>" + "".join(f"<property><name>{k}</name><value>{v}</value></property>"
                                           for k, v in properties.items()) + "</configuration>\n"

    folder.mkdir()
    (folder / "core-site.xml").write_text(site(core_site))
    (folder / "hdfs-site.xml").write_text(site(hdfs_site))
    classpath = [str(folder) if entry == os.environ["HADOOP_CONF_DIR"] else entry
                 for entry in os.environ["CLASSPATH"].split(":")]
    assert str(folder) in classpath
    return {**os.environ, "HADOOP_CONF_DIR": str(folder), "CLASSPATH": ":".join(classpath)}


def ha_nameservice(name: str, namenodes: list[str]) -> dict[str, str]:
    """Returns the hdfs-site properties of the HA nameservice `name` served by `namenodes` (host:port, in order)."""
    ids = [f"nn{i}" for i in range(len(namenodes))]
    return {"dfs.nameservices": name, f"dfs.ha.namenodes.{name}": ",".join(ids),
            f"dfs.client.failover.proxy.provider.{name}":
                "org.apache.hadoop.hdfs.server.namenode.ha.ConfiguredFailoverProxyProvider",
            **{f"dfs.namenode.rpc-address.{name}.{i}": a for i, a in zip(ids, namenodes)}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_get_the_clients_replication_not_the_namenodes_default(cluster, hdfs_dir, tmp_path, backend):
    # the NameNode's own dfs.replication is 2 (conf/hadoop); this client asks for 1
    env = client_conf(tmp_path / "conf", {"fs.defaultFS": cluster.hdfs_uri}, {"dfs.replication": "1"})
    env[BACKEND_VARIABLE] = backend
    code = ("import sys\nfrom hdfs_io.fs.filesystem import open_filesystem\n"
            "fs, path = open_filesystem(sys.argv[1])\n"
            "with fs.open_output_stream(path) as f:\n"
            "    f.write(b'x' * 1000)\n")

    subprocess.run([sys.executable, "-c", code, f"{hdfs_dir}/one.bin"], env=env, check=True, timeout=120)

    assert cluster.hadoop("dfs", "-stat", "%r", f"{hdfs_dir}/one.bin").stdout.strip() == "1"


@pytest.mark.parametrize("live", ["first", "second"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ha_nameservice_and_the_default_fs_reach_the_live_namenode(cluster, hdfs_dir, tmp_path, backend, live):
    # an HA nameservice of two NameNodes: the cluster's and an address where nothing listens (a NameNode that is
    # down); the client must fail over to the live one, whichever is listed first
    dead = unused_address()
    live_one = cluster.hdfs_uri.removeprefix("hdfs://")
    namenodes = [live_one, dead] if live == "first" else [dead, live_one]
    env = client_conf(tmp_path / "conf", {"fs.defaultFS": "hdfs://speechns"},
                      {**ha_nameservice("speechns", namenodes), "dfs.replication": "2"})
    env[BACKEND_VARIABLE] = backend
    path = write_hello(hdfs_dir)

    run = read_lengths(env, f"hdfs://speechns{path}/hello.bin", f"hdfs://{path}/hello.bin")

    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["2000", "2000"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ha_nameservice_named_with_capitals_is_reached_by_its_name(cluster, hdfs_dir, tmp_path, backend):
    # Hadoop looks a nameservice up by its ID as written (dfs.ha.namenodes.SpeechNS): hdfs://SpeechNS/ must not
    # become hdfs://speechns/, which no property names
    dead = unused_address()
    live_one = cluster.hdfs_uri.removeprefix("hdfs://")
    env = client_conf(tmp_path / "conf", {"fs.defaultFS": "hdfs://SpeechNS"},
                      {**ha_nameservice("SpeechNS", [live_one, dead]), "dfs.replication": "2"})
    env[BACKEND_VARIABLE] = backend
    path = write_hello(hdfs_dir)

    run = read_lengths(env, f"hdfs://SpeechNS{path}/hello.bin", f"hdfs://{path}/hello.bin")

    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["2000", "2000"]


def unused_address() -> str:
    """Returns a local host:port where nothing listens: a NameNode that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def write_hello(hdfs_dir: str) -> str:
    """Writes `hello.bin` (2,000 bytes) into `hdfs_dir` through the cluster's own address; returns the folder's path."""
    path = urlparse(hdfs_dir).path
    fs, _ = open_filesystem(hdfs_dir)
    with fs.open_output_stream(f"{path}/hello.bin") as f:
        f.write(b"ha" * 1000)
    return path


def read_lengths(env: dict[str, str], *uris: str) -> subprocess.CompletedProcess:
    """Runs a fresh process with `env` that opens each URI and prints the length of what it reads."""
    code = ("import sys\nfrom hdfs_io.fs.filesystem import open_filesystem\n"
            "for uri in sys.argv[1:]:\n"
            "    fs, path = open_filesystem(uri)\n"
            "    print(len(fs.open_input_stream(path).read()))\n")
    return subprocess.run([sys.executable, "-c", code, *uris], env=env, capture_output=True, text=True, timeout=120)


def test_an_unknown_hdfs_backend_is_a_one_line_error_with_exit_2(cluster):
    env = {**os.environ, BACKEND_VARIABLE: "webhdfs"}

    run = subprocess.run([sys.executable, "-m", "hdfs_io.inspect", f"{cluster.hdfs_uri}/anything"], env=env,
                         capture_output=True, text=True, timeout=120)

    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "inspect: error: SPEECHPACK_HDFS_BACKEND='webhdfs' names no HDFS backend; use one of libhdfs, native"]


@pytest.mark.parametrize("unset", [("JAVA_HOME", "CLASSPATH"), ("CLASSPATH",)])
def test_libhdfs_without_a_java_environment_says_in_one_line_what_to_set(cluster, unset):
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env[BACKEND_VARIABLE] = "libhdfs"

    run = subprocess.run([sys.executable, "-m", "hdfs_io.inspect", f"{cluster.hdfs_uri}/anything"], env=env,
                         capture_output=True, text=True, timeout=120)

    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    address = cluster.hdfs_uri.removeprefix("hdfs://")
    assert line.startswith(f"inspect: error: cannot open HDFS at {address}: "), line
    assert f"; {' and '.join(unset)} unset: libhdfs needs Java" in line, line
    assert "`. scripts/hadoop_env.sh` sets" in line and f"{BACKEND_VARIABLE}=native" in line, line


def test_workers_start_from_a_forkserver_once_the_parent_opened_hdfs_native(cluster):
    # in a fresh interpreter: this one may hold a JVM already. A forked child of a process whose hdfs-native
    # client runs read 7x slower than a forkserver's (bench/hdfs_backends, issue note)
    code = ("import sys\nfrom hdfs_io.fs.filesystem import open_filesystem, worker_start_method\n"
            "before = worker_start_method()\nopen_filesystem(sys.argv[1])\nprint(before, worker_start_method())")
    env = {**os.environ, BACKEND_VARIABLE: "native"}

    run = subprocess.run([sys.executable, "-c", code, f"{cluster.hdfs_uri}/"], env=env, capture_output=True, text=True,
                         timeout=120, check=True)

    assert run.stdout.split() == ["None", "forkserver"]


def test_hadoop_cli_reports_three_live_datanodes(cluster):
    report = cluster.hadoop("dfsadmin", "-report").stdout
    assert "Live datanodes (3)" in report


def test_spark_standalone_job_writes_parquet_to_hdfs(cluster, hdfs_dir, tmp_path):
    job = tmp_path / "write_squares.py"
    job.write_text(
        "import sys\n"
        "from pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.appName('write_squares').getOrCreate()\n"
        "spark.range(500).selectExpr('id', 'id * id AS square').write.parquet(sys.argv[1])\n"
        "print('workers', spark.sparkContext.master)\n"
        "spark.stop()\n")

    cluster.spark_submit(str(job), f"{hdfs_dir}/squares")

    fs, path = open_filesystem(f"{hdfs_dir}/squares")
    table = pq.read_table(path, filesystem=fs).sort_by("id")
    assert table.num_rows == 500
    assert table.column("square").to_pylist() == [i * i for i in range(500)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dataloader_workers_each_open_their_own_hdfs_handle(hdfs_dir, backend):
    files = write_files(hdfs_dir, 10)
    open_filesystem(hdfs_dir, backend)  # this process now runs a client that a fork does not copy, as a trainer would
    dataset = FileBytes(FilesystemRef(hdfs_dir, backend), sorted(files))

    loader = DataLoader(dataset, batch_size=None, num_workers=2, timeout=120,
                        multiprocessing_context=worker_start_method())
    got = list(loader)

    assert {name: data for _, name, data in got} == files
    assert {worker for worker, _, _ in got} == {0, 1}


def test_a_libhdfs_handle_inherited_through_fork_fails_fast_instead_of_hanging(hdfs_dir):
    files = write_files(hdfs_dir, 2)
    open_filesystem(hdfs_dir, "libhdfs")
    dataset = FileBytes(FilesystemRef(hdfs_dir, "libhdfs"), sorted(files))

    loader = DataLoader(dataset, batch_size=None, num_workers=1, timeout=120,
                        multiprocessing_context="fork")
    with pytest.raises(ForkedJVMError, match="does not survive fork"):
        list(loader)


def test_filesystem_ref_pickles_without_a_handle(hdfs_dir):
    ref = FilesystemRef(hdfs_dir)
    open_filesystem(hdfs_dir)

    restored = pickle.loads(pickle.dumps(ref))

    assert restored == ref and len(pickle.dumps(ref)) < 200


def test_upload_through_pydoop_reaches_an_ha_nameservice_named_with_capitals(cluster, hdfs_dir, tmp_path):
    dead = unused_address()
    live_one = cluster.hdfs_uri.removeprefix("hdfs://")
    env = client_conf(tmp_path / "conf", {"fs.defaultFS": "hdfs://SpeechNS"},
                      {**ha_nameservice("SpeechNS", [live_one, dead]), "dfs.replication": "2"})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"ha" * 1000)
    path = urlparse(hdfs_dir).path

    run = subprocess.run([sys.executable, "-m", "hdfs_io.upload", "--client", "pydoop", "--quiet",
                          str(tmp_path / "src"), f"hdfs://SpeechNS{path}/up"],
                         env=env, capture_output=True, text=True, timeout=180)

    assert run.returncode == 0, run.stderr[-2000:]
    fs, _ = open_filesystem(hdfs_dir)
    assert fs.get_file_info(f"{path}/up/a.bin").size == 2000
