"""A Kerberized Hadoop cluster (scripts/secure_cluster: an MIT KDC, secure HDFS and YARN), end to end.

alice's ticket gets her in, through every client: upload (hdfs-native, libhdfs and pydoop), pack on Spark
(local, and on YARN with delegation tokens), read (hdfs-native and libhdfs), torchrun training with
checkpoints on HDFS. No ticket, an expired ticket, or mallory on alice's private folder: one line naming
the user and the cause, exit 2, nothing written. A ticket that expires mid-read ends the read with a clear error, or the read is whole.
Every block moves over SASL with privacy (`dfs.data.transfer.protection`), which both clients speak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import pytest

from scripts import secure_cluster
from scripts.devcluster import LOG_DIR, alive, read_env_file
from tests.conftest import QUICK_START_JVMS
from tests.corpora import good_librispeech
from tests.test_faults import record

ROOT = Path(__file__).resolve().parent.parent
SECURE_ENV = ROOT / ".devcluster" / "secure" / "env.sh"
UTTERANCES = 12
TINY_TRAINING = ["--conf", str(ROOT / "conf" / "ds2_tiny.yaml"), "--train.batch_seconds=6",
                 "--train.checkpoint_every_steps=5", "--train.num_workers=1", "--model.rnn_hidden=32",
                 "--model.conv_channels=4", "--model.rnn_layers=2"]


@dataclass(frozen=True)
class SecureHdfs:
    uri: str
    env: dict[str, str]  # the secure cluster's client environment, with no ticket cache named
    caches: Path

    def ticket(self, user: str, lifetime: str | None = None, renewable: bool = False) -> dict[str, str]:
        """Returns the environment of `user` after `kinit` from the user's keytab into a cache of its own."""
        cache = self.caches / f"{user}-{time.monotonic_ns()}"
        env = dict(self.env, KRB5CCNAME=f"FILE:{cache}")
        options = (["-l", lifetime] if lifetime else []) + (["-r", "1h"] if renewable else [])
        subprocess.run(["kinit", *options, "-kt", f"{self.env['KEYTAB_DIR']}/{user}.keytab", user],
                       env=env, check=True, capture_output=True)
        return env

    def no_ticket(self) -> dict[str, str]:
        """Returns an environment whose ticket cache does not exist, as after `kdestroy`."""
        return dict(self.env, KRB5CCNAME=f"FILE:{self.caches / 'destroyed'}")

    def hadoop(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "scripts" / "hadoop"), *args], env=env, capture_output=True, text=True,
                              check=True, timeout=120)


@pytest.fixture(scope="module")
def secure(cluster, tmp_path_factory):
    """The secure cluster: started here and stopped at the end, or one already up (`make cluster-up SECURE=1`)."""
    started_here = not (secure_cluster.read_state() and all(alive(p) for p in secure_cluster.read_state()))
    subprocess.run([sys.executable, "-m", "scripts.secure_cluster", "up"], cwd=ROOT, check=True)
    env = dict(cluster.env, **read_env_file(SECURE_ENV))
    for name in ("KRB5CCNAME", "HADOOP_USER_NAME", "SPEECHPACK_HDFS_BACKEND", "SPEECHPACK_HDFS_LOG"):
        env.pop(name, None)
    yield SecureHdfs(env["SECURE_HDFS_URI"], env, tmp_path_factory.mktemp("ccaches"))
    if started_here:
        subprocess.run([sys.executable, "-m", "scripts.secure_cluster", "down"], cwd=ROOT, check=True)


def run(env: dict[str, str], *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def commands(env: dict[str, str], corpus: Path, hdfs_corpus: str, dataset: str, out: str) -> dict[str, tuple]:
    """Returns each user-facing command, run with `env`: {name: (finished process, tool prefix)}.

    `corpus` is local; `hdfs_corpus` and `dataset` are on HDFS; `out` is an HDFS folder the commands
    would write into (upload, pack and train each a folder of their own below it).
    """
    spark_submit = [str(Path(env["SPARK_HOME"]) / "bin" / "spark-submit"), "--master", "local[2]",
                    "--conf", "spark.ui.enabled=false", *(f for o in QUICK_START_JVMS for f in ("--conf", o))]
    py = sys.executable
    return {
        "upload": (run(env, py, "-m", "hdfs_io.upload", "--quiet", str(corpus), f"{out}/upload"), "upload"),
        "upload, libhdfs": (run(dict(env, SPEECHPACK_HDFS_BACKEND="libhdfs"), py, "-m", "hdfs_io.upload", "--quiet",
                                str(corpus), f"{out}/upload-libhdfs"), "upload"),
        "pack": (run(env, *spark_submit, str(ROOT / "spark_jobs" / "pack.py"), "--input", hdfs_corpus,
                     "--output", f"{out}/pack", "--shard-size-mb", "0.05"), "pack"),
        "read": (run(env, py, "-m", "hdfs_io.read", dataset, "--workers", "2"), "read"),
        "read, libhdfs": (run(dict(env, SPEECHPACK_HDFS_BACKEND="libhdfs"), py, "-m", "hdfs_io.read", dataset,
                              "--workers", "2"), "read"),
        "inspect": (run(env, py, "-m", "hdfs_io.inspect", dataset), "inspect"),
        "train": (run(env, py, "-m", "trainer.train", *TINY_TRAINING, "--dataset", dataset, "--out", f"{out}/train",
                      "--max-steps", "2"), "train"),
    }


@dataclass(frozen=True)
class Alices:
    corpus: Path  # local
    private: str  # alice's folder of mode 700 on the secure HDFS: upload/ (the corpus), pack/ (its dataset)
    env: dict[str, str]  # with alice's ticket
    runs: dict[str, tuple]  # `commands` as alice
    keys: list[str]  # the corpus's utterance keys, sorted


@pytest.fixture(scope="module")
def alices(secure, tmp_path_factory) -> Alices:
    """alice's private folder (mode 700): a corpus uploaded and packed into a dataset there, with her ticket."""
    corpus = tmp_path_factory.mktemp("kerberos") / "corpus"
    expected = good_librispeech(corpus, UTTERANCES, seed=21)
    env = secure.ticket("alice")
    private = f"{secure.uri}/user/alice/private-{uuid.uuid4().hex[:8]}"
    secure.hadoop(env, "fs", "-mkdir", private)
    secure.hadoop(env, "fs", "-chmod", "700", private)
    runs = commands(env, corpus, f"{private}/upload", f"{private}/pack", private)
    return Alices(corpus, private, env, runs, sorted(expected.packed))


def audit(cmd: str, path_part: str) -> list[tuple[float, str]]:
    """Returns the secure NameNode's audit lines for `cmd` on paths holding `path_part`, with their times."""
    found = []
    for line in (LOG_DIR / "secure-namenode.log").read_text(errors="replace").splitlines():
        if "FSNamesystem.audit" in line and f"\tcmd={cmd}\t" in line and path_part in line:
            found.append((datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    return found


def error_lines(result: subprocess.CompletedProcess, tool: str) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(f"{tool}:")]


def hdfs_listing(secure: SecureHdfs, env: dict[str, str], path: str) -> list[list[str]]:
    """Returns `hadoop fs -ls -R path` as split lines: permissions, replication, owner, group, size, ..., path."""
    out = secure.hadoop(env, "fs", "-ls", "-R", path).stdout
    return [line.split() for line in out.splitlines() if not line.startswith("Found ")]


def test_alice_with_a_ticket_uploads_packs_reads_and_trains_and_owns_every_file(secure, alices, tmp_path):
    corpus, private, env, runs = alices.corpus, alices.private, alices.env, alices.runs
    for name, (result, _) in runs.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    pydoop = run(env, sys.executable, "-m", "hdfs_io.upload", "--quiet", "--client", "pydoop", str(corpus),
                 f"{private}/upload-pydoop")
    assert pydoop.returncode == 0, pydoop.stderr[-3000:]
    dataset = f"{private}/pack"
    for name in ("read", "read, libhdfs"):
        assert f"read: rank 0/1 epoch 0: {UTTERANCES} utterances" in runs[name][0].stdout, name
    train = run(env, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "trainer.train", *TINY_TRAINING, "--dataset", dataset, "--out", f"{private}/run",
                "--max-steps", "10", timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads(train.stdout.strip().splitlines()[-1])["step"] == 10

    listing = hdfs_listing(secure, env, private)
    paths = {row[-1].split(urlparse(private).path, 1)[-1] for row in listing}
    assert {"/upload", "/upload-libhdfs", "/upload-pydoop", "/pack/dataset.json", "/run/checkpoint.pt",
            "/train"} <= paths, paths
    assert {row[2] for row in listing} == {"alice"}, [row for row in listing if row[2] != "alice"]
    for name, (result, _) in runs.items():
        record(f"Kerberos: alice with a ticket ({name})", outcome=f"exit {result.returncode}", keys_read=None,
               keys_lost=0, error=None)


@pytest.mark.parametrize("ticket", ["none", "expired"])
def test_without_a_valid_ticket_every_command_is_one_line_and_exit_2_and_writes_nothing(secure, alices, ticket):
    corpus, private, alice = alices.corpus, alices.private, alices.env
    if ticket == "none":
        env, cause = secure.no_ticket(), "no Kerberos ticket"
    else:
        env, cause = secure.ticket("alice", lifetime="2s"), "expired"
        time.sleep(3)
    out = f"{secure.uri}/user/alice/{ticket}-ticket-{uuid.uuid4().hex[:8]}"

    runs = commands(env, corpus, f"{private}/upload", f"{private}/pack", out)

    for name, (result, tool) in runs.items():
        errors = error_lines(result, tool)
        record(f"Kerberos: {'no' if ticket == 'none' else ticket} ticket ({name})", outcome=f"exit {result.returncode}", keys_read=None,
               keys_lost=0, error=errors[-1] if errors else None)
        assert result.returncode == 2, (name, result.stderr[-3000:])
        assert len(errors) == 1 and cause in errors[0], (name, result.stderr[-3000:])
        assert "Traceback" not in result.stderr and "\tat " not in result.stderr, (name, result.stderr[-3000:])
    written = [row[-1] for row in hdfs_listing(secure, alice, f"{secure.uri}/user/alice") if out.split("/")[-1] in row[-1]]
    assert written == []


def test_mallory_with_a_ticket_is_refused_alices_private_folder_in_one_line(secure, alices):
    corpus, private, alice = alices.corpus, alices.private, alices.env
    before = hdfs_listing(secure, alice, private)

    runs = commands(secure.ticket("mallory"), corpus, f"{private}/upload", f"{private}/pack", f"{private}/mallory")

    for name, (result, tool) in runs.items():
        errors = error_lines(result, tool)
        record(f"Kerberos: mallory on alice's 700 folder ({name})", outcome=f"exit {result.returncode}",
               keys_read=None, keys_lost=0, error=errors[-1] if errors else None)
        assert result.returncode == 2, (name, result.stderr[-3000:])
        assert len(errors) == 1 and "permission denied" in errors[0] and "mallory" in errors[0], \
            (name, result.stderr[-3000:])
        assert "Traceback" not in result.stderr and "\tat " not in result.stderr, (name, result.stderr[-3000:])
    assert hdfs_listing(secure, alice, private) == before


def test_the_datanode_refuses_a_client_that_does_not_protect_data_transfer(secure, alices):
    """The secure cluster is protected as production runs it: its DataNode speaks SASL with privacy on every
    block transfer (alice's reads and writes above went through it, on both clients). A client configured
    without `dfs.data.transfer.protection`, with a valid ticket and block token, is refused the block."""
    dataset_json = f"{alices.private}/pack/dataset.json"
    assert json.loads(secure.hadoop(alices.env, "fs", "-cat", dataset_json).stdout)
    log = LOG_DIR / "secure-datanode.log"
    logged = log.stat().st_size

    plain = subprocess.run([str(ROOT / "scripts" / "hadoop"), "fs", "-D", "dfs.data.transfer.protection=",
                            "-D", "dfs.client.max.block.acquire.failures=0", "-cat", dataset_json],
                           env=alices.env, capture_output=True, text=True, timeout=120)

    assert plain.returncode != 0 and not plain.stdout, plain.stdout[-2000:]
    with log.open(errors="replace") as f:
        f.seek(logged)
        refusals = [line for line in f if "Failed to read expected SASL data transfer protection handshake" in line]
    assert refusals, "the DataNode logged no refused SASL handshake"


# hdfs_io.read with a pause after its first batch
READ_ACROSS_EXPIRY = """
import json, sys, time
from hdfs_io.fs import client_log
from hdfs_io.reader.planner import PlanConfig
from hdfs_io.reader.shard_reader import (CorruptRecord, ReaderConfig, ShardDataset, ShardLoader, StorageUnavailable,
                                         error_message)
client_log.send_native_stderr()  # as `python -m hdfs_io.read` does
uri, resume_at = sys.argv[1], float(sys.argv[2])
config = ReaderConfig(plan=PlanConfig(batch_seconds=4.0), prefetch_chunks=1, retry_seconds=10, stall_seconds=60)
keys = []
try:
    for batch in ShardLoader(ShardDataset(uri, 0, 1, config), num_workers=2):
        keys += batch["keys"]
        time.sleep(max(0.0, resume_at - time.time()))
except (CorruptRecord, StorageUnavailable) as e:
    print(f"read: error: {error_message(e)}", file=sys.stderr)
    sys.exit(1)
print(json.dumps(keys))
"""


@pytest.mark.parametrize("backend, renewable", [("libhdfs", False), ("native", False), ("libhdfs", True)])
def test_a_ticket_that_expires_mid_read_ends_it_with_a_clear_error_or_the_read_is_whole(secure, alices, backend,
                                                                                        renewable):
    """The reader takes one batch, waits past the ticket's end and the client's idle connection time (2 s here),
    then reads on: the shards it opens next need the NameNode, on a new connection, with a ticket that is gone.

    A renewable ticket is renewed by the Hadoop client itself (`kinit -R` at 80% of its life), and then
    the read must be whole."""
    lifetime_s = 10
    env = dict(secure.ticket("alice", lifetime=f"{lifetime_s}s", renewable=renewable), SPEECHPACK_HDFS_BACKEND=backend)
    resume_at = time.time() + lifetime_s + 4  # the secure cluster's clients drop a connection idle for 2 s
    started = time.monotonic()

    result = run(env, sys.executable, "-c", READ_ACROSS_EXPIRY, f"{alices.private}/pack", str(resume_at), timeout=240)

    errors = error_lines(result, "read")
    keys = json.loads(result.stdout) if result.returncode == 0 else None
    record(f"Kerberos: {'renewable ' if renewable else ''}ticket expires mid-read ({backend})", hdfs_backend=backend,
           outcome=f"exit {result.returncode} after "
           f"{time.monotonic() - started:.0f} s", keys_read=len(keys) if keys else None,
           keys_lost=len(set(alices.keys) - set(keys)) if keys else None, error=errors[-1] if errors else None)
    assert time.time() > resume_at, "the read ended before the ticket did: it tested nothing"
    assert result.returncode == 0 or not renewable, result.stderr[-3000:]
    if result.returncode == 0:
        assert sorted(keys) == alices.keys, "success reported with data missing or repeated"
        opened_after = [line for when, line in audit("open", f"{urlparse(alices.private).path}/pack/shards/")
                        if when > resume_at]
        assert opened_after, "every shard was opened before the ticket ended: the test tested nothing"
    else:
        assert result.returncode == 1 and len(errors) == 1 and "expired" in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "\tat " not in result.stderr, result.stderr[-3000:]


def test_pack_on_secure_yarn_gives_executors_delegation_tokens_from_principal_and_keytab(secure, alices):
    """The driver (client mode) uses alice's ticket; the executors get no ticket cache, only the HDFS delegation
    tokens that Spark obtains from --principal/--keytab: the NameNode's audit log says which each call used."""
    output = f"{alices.private}/yarn"
    spark_submit = [str(Path(secure.env["SPARK_HOME"]) / "bin" / "spark-submit"), "--master", "yarn",
                    "--deploy-mode", "client", "--principal", f"alice@{secure.env['KERBEROS_REALM']}",
                    "--keytab", f"{secure.env['KEYTAB_DIR']}/alice.keytab", "--conf", "spark.ui.enabled=false",
                    "--conf", f"spark.yarn.jars=local:{secure.env['SPARK_HOME']}/jars/*", "--num-executors", "1",
                    "--executor-cores", "1", "--executor-memory", "1g", "--driver-memory", "1g",
                    "--conf", f"spark.pyspark.python={sys.executable}", *(f for o in QUICK_START_JVMS for f in ("--conf", o))]

    pack = run(alices.env, *spark_submit, str(ROOT / "spark_jobs" / "pack.py"), "--input", f"{alices.private}/upload",
               "--output", output, "--shard-size-mb", "0.05", timeout=600)

    assert pack.returncode == 0, pack.stderr[-3000:]
    read = run(alices.env, sys.executable, "-m", "hdfs_io.read", output, "--workers", "0", "--json")
    assert json.loads(read.stdout)["utterances"] == UTTERANCES, read.stderr[-3000:]
    parent, name = urlparse(output).path.rsplit("/", 1)
    created = [line for _, line in audit("create", f"{parent}/.{name}.pack-")]
    shards = [line for line in created if "/shards/" in line]
    manifests = [line for line in created if line.split("\tsrc=")[1].split("\t")[0].endswith("/dataset.json")]
    record("Kerberos: pack on secure YARN, --principal/--keytab", outcome=f"exit {pack.returncode}",
           keys_read=UTTERANCES, keys_lost=0, error=None)
    assert shards and all("ugi=alice@" in line and "(auth:TOKEN)" in line for line in shards), shards[:3]
    assert manifests and all("(auth:KERBEROS)" in line for line in manifests), manifests  # the driver's own call
    assert {row[2] for row in hdfs_listing(secure, alices.env, output)} == {"alice"}
