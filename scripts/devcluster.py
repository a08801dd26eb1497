"""The local development cluster: a real HDFS, YARN and Spark standalone cluster on 127.0.0.1.

    python -m scripts.devcluster up      # 1 NameNode, 3 DataNodes, 1 ResourceManager,
                                         # 2 NodeManagers, Spark master + 2 workers
    python -m scripts.devcluster down    # stops exactly the processes `up` started
    python -m scripts.devcluster status
    python -m scripts.devcluster kill datanode1 [--signal STOP]   # fault injection
    python -m scripts.devcluster restart datanode1                # and recovery

`up` waits until HDFS has left safe mode with 3 live DataNodes, both NodeManagers
and both Spark workers have registered, then writes `.devcluster/env.sh`. Both commands are
idempotent. Everything lives under `.devcluster/` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".devcluster"
STATE_FILE = STATE_DIR / "state.json"
ENV_FILE = STATE_DIR / "env.sh"
LOG_DIR = STATE_DIR / "logs"
HADOOP = ROOT / "scripts" / "hadoop"

NAMENODE_PORT = 9820  # must match fs.defaultFS in conf/hadoop/core-site.xml
NAMENODE_HTTP_PORT = 9870  # dfs.namenode.http-address
DATANODES = 3
RESOURCEMANAGER_PORTS = (8030, 8031, 8032, 8033)  # YARN's defaults: scheduler, trackers, clients, admin
RESOURCEMANAGER_HTTP_PORT = 8188  # yarn.resourcemanager.webapp.address in conf/hadoop/yarn-site.xml
NODEMANAGERS = 2
SPARK_WORKERS = 2
SPARK_WORKER_MEMORY = "4g"
START_TIMEOUT_S = 180


class ClusterError(Exception):
    """The cluster could not be started or stopped; the message says why."""


def hadoop_env(conf_dir: Path | None = None) -> dict[str, str]:
    """Returns the environment that scripts/hadoop_env.sh exports, on top of this one (for `conf_dir`, if given)."""
    env = dict(os.environ)
    env.pop("HADOOP_HOME", None)
    if conf_dir is not None:
        env["HADOOP_CONF_DIR"] = str(conf_dir)
    out = subprocess.run(
        ["bash", "-c", f'. "{ROOT}/scripts/hadoop_env.sh" && env -0'],
        env=env, check=True, capture_output=True,
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def refuse_taken_ports(*ports: int) -> None:
    """Raises ClusterError naming the first of `ports` that something on 127.0.0.1 already holds."""
    for port in ports:
        if port_in_use(port):
            raise ClusterError(f"port {port} on 127.0.0.1 is taken; stop whatever holds it "
                               "(an old cluster: make cluster-down)")


def start_time(pid: int) -> str | None:
    """Returns the kernel start time of `pid`, or None if it is gone; it tells a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else fields[19]


def alive(proc: dict) -> bool:
    return start_time(proc["pid"]) == proc["start_time"]


def launch(name: str, argv: list[str], env: dict[str, str], kind: str) -> dict:
    """Starts one daemon in its own process group; `kind` ("hdfs": a Hadoop daemon, or "spark") says which environment it needs."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / f"{name}.log", "ab")
    p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    time.sleep(0.05)
    return {"name": name, "pid": p.pid, "start_time": start_time(p.pid), "argv": argv, "kind": kind}


def http_json(url: str, cafile: Path | None = None) -> dict | None:
    """Returns the JSON at `url`, or None while it cannot be had; an https `url` is trusted through `cafile`."""
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def wait_for(what: str, check, procs: list[dict], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        dead = [p["name"] for p in procs if not alive(p)]
        if dead:
            raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}; "
                               f"see {LOG_DIR}/{dead[0]}.log")
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}; see {LOG_DIR}")


def hdfs_ready() -> bool:
    jmx = http_json(f"http://127.0.0.1:{NAMENODE_HTTP_PORT}/jmx?qry=Hadoop:service=NameNode,name=NameNodeInfo")
    if not jmx or not jmx.get("beans"):
        return False
    info = jmx["beans"][0]
    live = json.loads(info.get("LiveNodes") or "{}")
    return not info.get("Safemode") and len(live) >= DATANODES


def start_hdfs(env: dict[str, str]) -> list[dict]:
    refuse_taken_ports(NAMENODE_PORT, NAMENODE_HTTP_PORT)
    name_dir = STATE_DIR / "hdfs" / "name"
    daemon_env = hdfs_daemon_env(env)
    name_opt = ["-D", f"dfs.namenode.name.dir=file://{name_dir}"]
    if not (name_dir / "current" / "VERSION").exists():
        name_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(HADOOP), "namenode", *name_opt, "-format", "-nonInteractive", "-force"],
                       env=env, check=True, capture_output=True)
    procs = [launch("namenode", [str(HADOOP), "namenode", *name_opt], daemon_env, "hdfs")]
    for i in range(DATANODES):
        data_dir = STATE_DIR / "hdfs" / f"data{i}"
        data_dir.mkdir(parents=True, exist_ok=True)
        opts = [f"dfs.datanode.data.dir=file://{data_dir}",
                "dfs.datanode.address=127.0.0.1:0",
                "dfs.datanode.http.address=127.0.0.1:0",
                "dfs.datanode.ipc.address=127.0.0.1:0",
                "dfs.datanode.hostname=127.0.0.1"]
        argv = [str(HADOOP), "datanode"] + [a for o in opts for a in ("-D", o)]
        procs.append(launch(f"datanode{i}", argv, daemon_env, "hdfs"))
    return procs


def yarn_ready() -> bool:
    metrics = http_json(f"http://127.0.0.1:{RESOURCEMANAGER_HTTP_PORT}/ws/v1/cluster/metrics")
    return bool(metrics) and metrics["clusterMetrics"]["activeNodes"] >= NODEMANAGERS


def start_yarn(env: dict[str, str]) -> list[dict]:
    """Starts a ResourceManager on YARN's default ports (web: yarn-site.xml's) and NodeManagers on free ones."""
    refuse_taken_ports(*RESOURCEMANAGER_PORTS, RESOURCEMANAGER_HTTP_PORT)
    daemon_env = hdfs_daemon_env(env)
    procs = [launch("resourcemanager", [str(HADOOP), "resourcemanager"], daemon_env, "hdfs")]
    for i in range(NODEMANAGERS):
        nm_dir = STATE_DIR / "yarn" / f"nm{i}"
        opts = ["yarn.nodemanager.hostname=127.0.0.1",
                "yarn.nodemanager.address=127.0.0.1:0",
                "yarn.nodemanager.localizer.address=127.0.0.1:0",
                "yarn.nodemanager.webapp.address=127.0.0.1:0",
                f"yarn.nodemanager.local-dirs={nm_dir / 'local'}",
                f"yarn.nodemanager.log-dirs={nm_dir / 'logs'}"]
        argv = [str(HADOOP), "nodemanager"] + [a for o in opts for a in ("-D", o)]
        procs.append(launch(f"nodemanager{i}", argv, daemon_env, "hdfs"))
    return procs


def hdfs_daemon_env(env: dict[str, str]) -> dict[str, str]:
    return dict(env, HADOOP_ROOT_LOGGER="INFO,console")


def spark_daemon_env(env: dict[str, str]) -> dict[str, str]:
    return dict(env, SPARK_HOME=str(spark_home()), SPARK_LOCAL_IP="127.0.0.1",
                PYSPARK_PYTHON=sys.executable, SPARK_LOG_DIR=str(LOG_DIR))


MASTER_URL = re.compile(rb"Starting Spark master at (spark://\S+)")
MASTER_UI_PORT = re.compile(rb"Successfully started service 'MasterUI' on port (\d+)")


def master_ports(log: bytes) -> tuple[str, int] | None:
    """Returns (master URL, web UI port) as a Spark master's log says it bound them, or None until it has."""
    url, ui = MASTER_URL.search(log), MASTER_UI_PORT.search(log)
    return (url.group(1).decode(), int(ui.group(1))) if url and ui else None


def start_spark_master(env: dict[str, str], name: str = "spark-master") -> tuple[dict, str, int]:
    """Starts a Spark master; returns it, its URL and its web UI's port once it has bound them.

    The ports asked for are free when chosen, but a daemon starting beside it (a DataNode's or a
    worker's ephemeral port) may take one first; the master then binds the next port up, so the
    ports are read from its log, not assumed.
    """
    log = LOG_DIR / f"{name}.log"
    start = log.stat().st_size if log.exists() else 0
    proc = launch(name, [str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master",
                         "--host", "127.0.0.1", "--port", str(free_port()), "--webui-port", str(free_port())],
                  spark_daemon_env(env), "spark")

    def bound() -> tuple[str, int] | None:
        with open(log, "rb") as f:
            f.seek(start)
            return master_ports(f.read())

    wait_for(f"{name} to bind its ports", lambda: bound() is not None, [proc])
    return proc, *bound()


def start_spark(env: dict[str, str]) -> tuple[list[dict], str, int]:
    spark_class = str(spark_home() / "bin" / "spark-class")
    spark_env = spark_daemon_env(env)
    master_proc, master, ui_port = start_spark_master(env)
    procs = [master_proc]
    for i in range(SPARK_WORKERS):
        work_dir = STATE_DIR / "spark" / f"worker{i}"
        work_dir.mkdir(parents=True, exist_ok=True)
        procs.append(launch(f"spark-worker{i}", [
            spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
            "--cores", "1", "--memory", SPARK_WORKER_MEMORY, "--webui-port", "0",
            "--work-dir", str(work_dir), master], spark_env, "spark"))
    return procs, master, ui_port


def local_spark_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Returns `base` (default: this environment) with what pyspark's spark-submit needs on this machine."""
    return dict(os.environ if base is None else base, SPARK_HOME=str(spark_home()), SPARK_LOCAL_IP="127.0.0.1",
                PYSPARK_PYTHON=sys.executable)


def spark_ready(ui_port: int) -> bool:
    status = http_json(f"http://127.0.0.1:{ui_port}/json/")
    return bool(status) and sum(w.get("state") == "ALIVE" for w in status.get("workers", [])) >= SPARK_WORKERS


def write_env(env: dict[str, str], master: str) -> None:
    exports = {
        "HDFS_URI": f"hdfs://127.0.0.1:{NAMENODE_PORT}",
        "SPARK_MASTER": master,
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PATH": f"{ROOT / 'scripts'}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    for key in ("JAVA_HOME", "HADOOP_CONF_DIR", "CLASSPATH", "ARROW_LIBHDFS_DIR",
                "HADOOP_OPTS", "LIBHDFS_OPTS", "HADOOP_JAVA17_OPENS"):
        exports[key] = env[key]
    lines = ["# Written by `make cluster-up`; source it: . .devcluster/env.sh"]
    lines += [f"export {k}='{v}'" for k, v in exports.items()]
    ENV_FILE.write_text("\n".join(lines) + "\n")


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """Returns the variables that an env.sh written by `write_env` exports."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def read_state() -> list[dict]:
    return read_state_file().get("processes", [])


def read_state_file() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def up() -> None:
    procs = read_state()
    if procs and all(alive(p) for p in procs) and ENV_FILE.exists():
        print(f"devcluster: already up ({len(procs)} processes); . {ENV_FILE.relative_to(ROOT)}")
        return
    if procs:
        down()
    env = hadoop_env()
    if not (Path(env["ARROW_LIBHDFS_DIR"]) / "libhdfs.so").exists():
        raise ClusterError("libhdfs.so is missing; run 'make setup' first")
    STATE_DIR.mkdir(exist_ok=True)
    started: list[dict] = []
    try:
        started += start_hdfs(env)
        STATE_FILE.write_text(json.dumps({"processes": started}, indent=1))
        started += start_yarn(env)
        STATE_FILE.write_text(json.dumps({"processes": started}, indent=1))
        spark_procs, master, ui_port = start_spark(env)
        started += spark_procs
        STATE_FILE.write_text(json.dumps({"processes": started, "spark_master": master, "spark_ui_port": ui_port},
                                         indent=1))
        wait_for("HDFS to leave safe mode with 3 live DataNodes", hdfs_ready, started)
        wait_for("2 Spark workers to register", lambda: spark_ready(ui_port), started)
        wait_for("2 NodeManagers to register", yarn_ready, started)
    except BaseException:
        down()
        raise
    write_env(env, master)
    print(f"devcluster: up (HDFS hdfs://127.0.0.1:{NAMENODE_PORT}, YARN 127.0.0.1:{RESOURCEMANAGER_PORTS[2]}, Spark {master}); "
          f". {ENV_FILE.relative_to(ROOT)}")


def down() -> None:
    running = stop(read_state())
    STATE_FILE.unlink(missing_ok=True)
    ENV_FILE.unlink(missing_ok=True)
    print(f"devcluster: down (stopped {running} processes)")


def stop(procs: list[dict], grace_s: float = 20) -> int:
    """Stops each of `procs` that still runs (SIGTERM to its process group, SIGKILL after `grace_s`); returns how
    many ran."""
    running = [p for p in procs if alive(p)]
    for p in running:
        try:
            os.killpg(p["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in running:
        if alive(p):
            try:
                os.killpg(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    return len(running)


def daemon(name: str) -> dict:
    """Returns the state of the daemon called `name` (namenode, datanode0, spark-worker1, ...)."""
    for p in read_state():
        if p["name"] == name:
            return p
    raise ClusterError(f"no daemon called {name!r}; see `python -m scripts.devcluster status`")


def kill(name: str, sig: int = signal.SIGKILL) -> None:
    """Sends `sig` to a daemon's whole process group (a Spark worker's executors die with it)."""
    p = daemon(name)
    if not alive(p):
        raise ClusterError(f"{name} is not running")
    os.killpg(p["pid"], sig)
    if sig == signal.SIGKILL:
        deadline = time.monotonic() + 10
        while alive(p) and time.monotonic() < deadline:
            time.sleep(0.05)


def restart(name: str) -> None:
    """Starts a killed daemon again with its original command line and waits until the cluster is whole."""
    state = read_state_file()
    procs = state["processes"]
    old = daemon(name)
    if alive(old):
        os.killpg(old["pid"], signal.SIGCONT)  # it may only have been stopped
        kill(name)
    env = hadoop_env()
    env = hdfs_daemon_env(env) if old.get("kind", "hdfs") == "hdfs" else spark_daemon_env(env)
    new = launch(name, old["argv"], env, old.get("kind", "hdfs"))
    state["processes"] = [new if p["name"] == name else p for p in procs]
    STATE_FILE.write_text(json.dumps(state, indent=1))
    wait_for("HDFS to leave safe mode with 3 live DataNodes", hdfs_ready, state["processes"])
    wait_for("2 Spark workers to register", lambda: spark_ready(state["spark_ui_port"]), state["processes"])
    wait_for("2 NodeManagers to register", yarn_ready, state["processes"])


def status() -> int:
    procs = read_state()
    for p in procs:
        print(f"{p['name']:<14} pid {p['pid']:<8} {'running' if alive(p) else 'gone'}")
    return 0 if procs and all(alive(p) for p in procs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "kill", "restart"])
    parser.add_argument("daemon", nargs="?", help="for kill and restart: namenode, datanode0, spark-worker1, ...")
    parser.add_argument("--signal", default="KILL", help="for kill: KILL (default), STOP, TERM, ...")
    args = parser.parse_args(argv)
    if args.command in ("kill", "restart") and not args.daemon:
        parser.error(f"{args.command} needs a daemon name")
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
        elif args.command == "kill":
            kill(args.daemon, signal.Signals[f"SIG{args.signal.upper().removeprefix('SIG')}"])
        elif args.command == "restart":
            restart(args.daemon)
        else:
            return status()
    except (ClusterError, subprocess.CalledProcessError) as e:
        print(f"devcluster: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
