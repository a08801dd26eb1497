"""A Kerberized Hadoop cluster on 127.0.0.1 beside the dev cluster: an MIT KDC, HDFS and YARN.

    python -m scripts.secure_cluster up     # realm, principals, keytabs; 1 NameNode, 1 DataNode, 1 ResourceManager,
                                            # 1 NodeManager; writes .devcluster/secure/env.sh
    python -m scripts.secure_cluster down   # stops exactly the processes `up` started

`make cluster-up SECURE=1` runs it after the dev cluster. Each `up` starts from nothing: a new realm
(SPEECHPACK.TEST), new keytabs, a newly formatted HDFS, all under `.devcluster/secure/`, on ports of
its own (KDC 9788, NameNode 9920 and HTTPS 9970, ResourceManager 9830-9833 and 9188).

- The KDC is MIT's `krb5kdc` (Debian's krb5-kdc), the KDC most Hadoop clusters use, with
  `kadmin.local` to make principals. Its `kinit`, `klist` and `kdestroy` (krb5-user) are what
  users have, and hdfs-native authenticates through the same MIT GSSAPI library. Hadoop's
  MiniKdc (Apache Kerby) would need those client tools too, and a JVM of its own.
- Principals: `nn/localhost`, `dn/localhost`, `HTTP/localhost` (SPNEGO for WebHDFS), `rm/localhost`
  and `nm/localhost` in `keytabs/services.keytab`; users `alice` and `mallory`, each with a keytab.
- HDFS runs as production clusters without root (jsvc) run it: `hadoop.security.authentication=kerberos`,
  RPC encrypted (`hadoop.rpc.protection=privacy`), block access tokens, and the DataNode on an
  unprivileged port with SASL data-transfer protection
  (`dfs.data.transfer.protection=privacy`: every block read or written is authenticated with its
  block token and encrypted). Hadoop allows that only with `dfs.http.policy=HTTPS_ONLY`, so the
  NameNode and DataNode serve their web ports over TLS, from a keystore that `up` makes with the
  JDK's `keytool` (a self-signed certificate for localhost and 127.0.0.1, trusted by
  `tls/truststore.jks` and `tls/localhost.pem`).
- YARN's daemons log in from their keytabs; containers run as the NodeManager's user
  (DefaultContainerExecutor) and reach HDFS with the application's delegation tokens.
- The HDFS superuser is `nn` (the NameNode's principal); `/user/alice` and `/user/mallory` belong
  to their users and `/tmp` is world-writable with the sticky bit.

The env file points HADOOP_CONF_DIR, CLASSPATH and the JVM options at this cluster's
configuration; it sets no ticket cache: `kinit -kt .devcluster/secure/keytabs/alice.keytab alice`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.devcluster import (
    LOG_DIR, ROOT, ClusterError, alive, hadoop_env, http_json, launch, port_in_use, refuse_taken_ports, stop, wait_for,
)

REALM = "SPEECHPACK.TEST"
SECURE_DIR = ROOT / ".devcluster" / "secure"
STATE_FILE = SECURE_DIR / "state.json"
ENV_FILE = SECURE_DIR / "env.sh"
CONF_DIR = SECURE_DIR / "conf"
KEYTAB_DIR = SECURE_DIR / "keytabs"
KRB5_CONF = SECURE_DIR / "krb5.conf"
KDC_PORT = 9788
NAMENODE_PORT = 9920
NAMENODE_HTTPS_PORT = 9970
TLS_DIR = SECURE_DIR / "tls"
CERTIFICATE = TLS_DIR / "localhost.pem"  # the web ports' certificate, for clients outside the JVM
USERS = ("alice", "mallory")
SERVICES = ("nn/localhost", "dn/localhost", "HTTP/localhost", "rm/localhost", "nm/localhost")
SERVICE_KEYTAB = KEYTAB_DIR / "services.keytab"
RESOURCEMANAGER_ADDRESSES = {  # the dev cluster's ResourceManager has YARN's defaults (8030-8033)
    "yarn.resourcemanager.scheduler.address": 9830, "yarn.resourcemanager.resource-tracker.address": 9831,
    "yarn.resourcemanager.address": 9832, "yarn.resourcemanager.admin.address": 9833,
    "yarn.resourcemanager.webapp.address": 9188,
}
# Tickets live 10 hours and renew for 7 days unless kinit asks for less (`kinit -l 30s`).
MAX_LIFE, MAX_RENEW = "10h", "7d"

CORE_SECURITY = {
    "hadoop.security.authentication": "kerberos",
    "hadoop.security.authorization": "true",
    "hadoop.rpc.protection": "privacy",
    # A client re-reads a renewed ticket cache at most this often (Hadoop's default: 60 s). Tickets
    # in the tests live seconds, production ones hours.
    "hadoop.kerberos.min.seconds.before.relogin": "1",
    # A client closes a connection idle this long (Hadoop's default: 10 s); the next call
    # authenticates anew. Short, so that a test of a ticket ending mid-read waits seconds.
    "ipc.client.connection.maxidletime": "2000",
}
HDFS_SECURITY = {
    "dfs.block.access.token.enable": "true",
    "dfs.namenode.kerberos.principal": f"nn/localhost@{REALM}",
    "dfs.namenode.keytab.file": str(SERVICE_KEYTAB),
    "dfs.datanode.kerberos.principal": f"dn/localhost@{REALM}",
    "dfs.datanode.keytab.file": str(SERVICE_KEYTAB),
    "dfs.web.authentication.kerberos.principal": f"HTTP/localhost@{REALM}",
    "dfs.web.authentication.kerberos.keytab": str(SERVICE_KEYTAB),
    # SASL on every data-transfer connection, with encryption, instead of privileged ports; it needs HTTPS.
    "dfs.data.transfer.protection": "privacy",
    "dfs.http.policy": "HTTPS_ONLY",
}
YARN_SECURITY = {
    "yarn.resourcemanager.principal": f"rm/localhost@{REALM}",
    "yarn.resourcemanager.keytab": str(SERVICE_KEYTAB),
    "yarn.nodemanager.principal": f"nm/localhost@{REALM}",
    "yarn.nodemanager.keytab": str(SERVICE_KEYTAB),
}


def kerberos_env(env: dict[str, str]) -> dict[str, str]:
    """Returns `env` pointed at this realm: MIT tools read KRB5_CONFIG, JVMs the krb5.conf option.

    scripts/hadoop rebuilds HADOOP_OPTS from HADOOP_OPTS_EXTRA, so the option goes in both.
    """
    krb = f" -Djava.security.krb5.conf={KRB5_CONF}"
    return dict(env, KRB5_CONFIG=str(KRB5_CONF), KRB5_KDC_PROFILE=str(SECURE_DIR / "kdc.conf"),
                HADOOP_OPTS_EXTRA=env.get("HADOOP_OPTS_EXTRA", "") + krb,
                HADOOP_OPTS=env.get("HADOOP_OPTS", "") + krb, LIBHDFS_OPTS=env.get("LIBHDFS_OPTS", "") + krb,
                SPARK_SUBMIT_OPTS=env.get("SPARK_SUBMIT_OPTS", "") + krb)


def write_kerberos_conf() -> None:
    db = SECURE_DIR / "kdc"
    db.mkdir(parents=True)
    KRB5_CONF.write_text(f"""[libdefaults]
  default_realm = {REALM}
  dns_lookup_realm = false
  dns_lookup_kdc = false
  dns_canonicalize_hostname = false
  rdns = false
  forwardable = true
  udp_preference_limit = 1
[realms]
  {REALM} = {{
    kdc = 127.0.0.1:{KDC_PORT}
  }}
[domain_realm]
  localhost = {REALM}
""")
    (SECURE_DIR / "kdc.conf").write_text(f"""[kdcdefaults]
  kdc_ports = {KDC_PORT}
  kdc_tcp_ports = {KDC_PORT}
[realms]
  {REALM} = {{
    database_name = {db}/principal
    key_stash_file = {db}/stash
    acl_file = {db}/kadm5.acl
    max_life = {MAX_LIFE}
    max_renewable_life = {MAX_RENEW}
    supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
  }}
[logging]
  kdc = FILE:{LOG_DIR}/secure-kdc.log
""")
    (db / "kadm5.acl").write_text("")


def make_principals(env: dict[str, str]) -> None:
    """Creates the realm's database, every principal, and the keytabs."""
    subprocess.run(["kdb5_util", "create", "-s", "-r", REALM, "-P", secrets.token_hex(16)],
                   env=env, check=True, capture_output=True)
    KEYTAB_DIR.mkdir()
    commands = [f"addprinc -randkey -maxlife {MAX_LIFE} -maxrenewlife {MAX_RENEW} {p}"
                for p in (*SERVICES, *USERS)]
    commands.append(f"ktadd -k {SERVICE_KEYTAB} {' '.join(SERVICES)}")
    commands += [f"ktadd -k {KEYTAB_DIR / user}.keytab {user}" for user in USERS]
    for command in commands:
        subprocess.run(["kadmin.local", "-r", REALM, "-q", command], env=env, check=True, capture_output=True)


def write_hadoop_conf(java_home: str) -> None:
    """Writes core-, hdfs- and yarn-site.xml: the dev cluster's settings on this cluster's ports, plus security."""
    from hdfs_io.fs.filesystem import hadoop_conf

    CONF_DIR.mkdir()
    tls_server, tls_client = make_keystores(java_home)
    for name in ("log4j.properties", "hadoop-metrics2.properties"):
        shutil.copy(ROOT / "conf" / "hadoop" / name, CONF_DIR / name)
    shutil.copytree(ROOT / "conf" / "hadoop" / "webapps", CONF_DIR / "webapps")  # the daemons' web servers need it
    core = {**hadoop_conf(ROOT / "conf" / "hadoop", files=("core-site.xml",)), **CORE_SECURITY,
            "fs.defaultFS": f"hdfs://127.0.0.1:{NAMENODE_PORT}"}
    hdfs = {**hadoop_conf(ROOT / "conf" / "hadoop", files=("hdfs-site.xml",)), **HDFS_SECURITY,
            "dfs.namenode.https-address": f"127.0.0.1:{NAMENODE_HTTPS_PORT}", "dfs.replication": "1"}
    yarn = {**hadoop_conf(ROOT / "conf" / "hadoop", files=("yarn-site.xml",)), **YARN_SECURITY,
            **{k: f"127.0.0.1:{port}" for k, port in RESOURCEMANAGER_ADDRESSES.items()}}
    shutil.copy(ROOT / "conf" / "hadoop" / "capacity-scheduler.xml", CONF_DIR / "capacity-scheduler.xml")
    for name, props in (("core-site.xml", core), ("hdfs-site.xml", hdfs), ("yarn-site.xml", yarn),
                        ("ssl-server.xml", tls_server), ("ssl-client.xml", tls_client)):
        body = "".join(f"  <property><name>{k}</name><value>{v}</value></property>\n" for k, v in props.items())
        (CONF_DIR / name).write_text(f'<?xml version="1.0"?>\n<!-- Written by scripts/secure_cluster.py -->\n'
                                     f"<configuration>\n{body}</configuration>\n")


def make_keystores(java_home: str) -> tuple[dict[str, str], dict[str, str]]:
    """Makes the web ports' keystore and truststore with the JDK's keytool; returns ssl-server.xml's and ssl-client.xml's settings.

    One self-signed certificate, for localhost and 127.0.0.1, valid for 30 days: each `up` makes a new one.
    """
    TLS_DIR.mkdir()
    keytool = str(Path(java_home) / "bin" / "keytool")
    password = secrets.token_hex(16)
    keystore, truststore = TLS_DIR / "keystore.jks", TLS_DIR / "truststore.jks"
    for args in (["-genkeypair", "-alias", "localhost", "-keyalg", "RSA", "-keysize", "2048", "-validity", "30",
                  "-dname", "CN=localhost", "-ext", "SAN=dns:localhost,ip:127.0.0.1",
                  "-keystore", str(keystore), "-storepass", password, "-keypass", password],
                 ["-exportcert", "-rfc", "-alias", "localhost", "-keystore", str(keystore), "-storepass", password,
                  "-file", str(CERTIFICATE)],
                 ["-importcert", "-noprompt", "-alias", "localhost", "-file", str(CERTIFICATE),
                  "-keystore", str(truststore), "-storepass", password]):
        subprocess.run([keytool, *args, "-storetype", "JKS"], check=True, capture_output=True)
    server = {"ssl.server.keystore.location": str(keystore), "ssl.server.keystore.password": password,
              "ssl.server.keystore.keypassword": password, "ssl.server.keystore.type": "jks",
              "ssl.server.truststore.location": str(truststore), "ssl.server.truststore.password": password,
              "ssl.server.truststore.type": "jks"}
    client = {"ssl.client.truststore.location": str(truststore), "ssl.client.truststore.password": password,
              "ssl.client.truststore.type": "jks"}
    return server, client


def hdfs_ready() -> bool:
    jmx = http_json(f"https://127.0.0.1:{NAMENODE_HTTPS_PORT}/jmx?qry=Hadoop:service=NameNode,name=NameNodeInfo",
                    cafile=CERTIFICATE)
    if not jmx or not jmx.get("beans"):
        return False
    info = jmx["beans"][0]
    return not info.get("Safemode") and len(json.loads(info.get("LiveNodes") or "{}")) >= 1


def keep(procs: list[dict], proc: dict) -> None:
    """Adds a started process to `procs` and to the state file, so that `down` stops it whatever happens next."""
    procs.append(proc)
    STATE_FILE.write_text(json.dumps({"processes": procs}, indent=1))


def start_kdc(env: dict[str, str], procs: list[dict]) -> None:
    keep(procs, launch("secure-kdc", ["krb5kdc", "-n", "-r", REALM], env, "kdc"))
    wait_for("the KDC to listen", lambda: port_in_use(KDC_PORT), procs, timeout_s=20)


def start_hdfs(env: dict[str, str], procs: list[dict]) -> None:
    """Formats HDFS and starts a NameNode and a DataNode, each logged in from its keytab."""
    hadoop = str(ROOT / "scripts" / "hadoop")
    daemon_env = dict(env, HADOOP_ROOT_LOGGER="INFO,console")
    name_opt = ["-D", f"dfs.namenode.name.dir=file://{SECURE_DIR / 'name'}"]
    subprocess.run([hadoop, "namenode", *name_opt, "-format", "-nonInteractive", "-force"],
                   env=env, check=True, capture_output=True)
    keep(procs, launch("secure-namenode", [hadoop, "namenode", *name_opt], daemon_env, "hdfs"))
    opts = [f"dfs.datanode.data.dir=file://{SECURE_DIR / 'data'}", "dfs.datanode.address=127.0.0.1:0",
            "dfs.datanode.https.address=127.0.0.1:0", "dfs.datanode.ipc.address=127.0.0.1:0",
            "dfs.datanode.hostname=127.0.0.1"]
    keep(procs, launch("secure-datanode", [hadoop, "datanode", *[a for o in opts for a in ("-D", o)]], daemon_env,
                       "hdfs"))


def yarn_ready() -> bool:
    port = RESOURCEMANAGER_ADDRESSES["yarn.resourcemanager.webapp.address"]
    metrics = http_json(f"http://127.0.0.1:{port}/ws/v1/cluster/metrics")
    return bool(metrics) and metrics["clusterMetrics"]["activeNodes"] >= 1


def start_yarn(env: dict[str, str], procs: list[dict]) -> None:
    """Starts a ResourceManager and one NodeManager, each logged in from its keytab."""
    hadoop = str(ROOT / "scripts" / "hadoop")
    daemon_env = dict(env, HADOOP_ROOT_LOGGER="INFO,console")
    keep(procs, launch("secure-resourcemanager", [hadoop, "resourcemanager"], daemon_env, "hdfs"))
    nm = SECURE_DIR / "nm"
    opts = ["yarn.nodemanager.hostname=127.0.0.1", "yarn.nodemanager.address=127.0.0.1:0",
            "yarn.nodemanager.localizer.address=127.0.0.1:0", "yarn.nodemanager.webapp.address=127.0.0.1:0",
            f"yarn.nodemanager.local-dirs={nm / 'local'}", f"yarn.nodemanager.log-dirs={nm / 'logs'}"]
    keep(procs, launch("secure-nodemanager", [hadoop, "nodemanager", *[a for o in opts for a in ("-D", o)]],
                       daemon_env, "hdfs"))


def make_home_folders(env: dict[str, str]) -> None:
    """As the superuser nn: /user/<user> for each user, and a sticky world-writable /tmp."""
    cache = SECURE_DIR / "nn.ccache"
    superuser = dict(env, KRB5CCNAME=f"FILE:{cache}")
    subprocess.run(["kinit", "-kt", str(SERVICE_KEYTAB), f"nn/localhost@{REALM}"],
                   env=superuser, check=True, capture_output=True)
    homes = [f"/user/{user}" for user in USERS]
    fs_shell = [str(ROOT / "scripts" / "hadoop"), "fs"]
    try:
        for args in (["-mkdir", "-p", *homes, "/tmp"], ["-chmod", "1777", "/tmp"],
                     *(["-chown", user, home] for user, home in zip(USERS, homes))):
            subprocess.run([*fs_shell, *args], env=superuser, check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        raise ClusterError(f"could not make the home folders: {e.stderr.decode(errors='replace')[-2000:]}") from None
    finally:
        cache.unlink(missing_ok=True)


def write_env(env: dict[str, str]) -> None:
    exports = {"SECURE_HDFS_URI": f"hdfs://127.0.0.1:{NAMENODE_PORT}", "KERBEROS_REALM": REALM,
               "KEYTAB_DIR": str(KEYTAB_DIR)}
    for key in ("JAVA_HOME", "HADOOP_CONF_DIR", "CLASSPATH", "ARROW_LIBHDFS_DIR", "HADOOP_OPTS", "LIBHDFS_OPTS",
                "SPARK_SUBMIT_OPTS", "HADOOP_JAVA17_OPENS", "HADOOP_OPTS_EXTRA", "KRB5_CONFIG"):
        exports[key] = env[key]
    lines = ["# Written by scripts/secure_cluster.py; source it after .devcluster/env.sh, then kinit"]
    lines += [f"export {k}='{v}'" for k, v in exports.items()]
    ENV_FILE.write_text("\n".join(lines) + "\n")


def read_state() -> list[dict]:
    try:
        return json.loads(STATE_FILE.read_text())["processes"]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def up() -> None:
    procs = read_state()
    if procs and all(alive(p) for p in procs) and ENV_FILE.exists():
        print(f"secure_cluster: already up; . {ENV_FILE.relative_to(ROOT)}")
        return
    down()
    for tool in ("krb5kdc", "kadmin.local", "kinit"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise ClusterError(f"{tool} is missing; run 'make setup' (Debian's krb5-kdc, krb5-admin-server, krb5-user)")
    refuse_taken_ports(KDC_PORT, NAMENODE_PORT, NAMENODE_HTTPS_PORT, *RESOURCEMANAGER_ADDRESSES.values())
    shutil.rmtree(SECURE_DIR, ignore_errors=True)
    SECURE_DIR.mkdir(parents=True)
    env = kerberos_env(hadoop_env(CONF_DIR))
    env["PATH"] = f"/usr/sbin:{env.get('PATH', '')}"
    started: list[dict] = []
    try:
        write_kerberos_conf()
        make_principals(env)
        write_hadoop_conf(env["JAVA_HOME"])
        start_kdc(env, started)
        start_hdfs(env, started)
        start_yarn(env, started)
        wait_for("the secure HDFS to leave safe mode with its DataNode", hdfs_ready, started)
        make_home_folders(env)
        wait_for("the secure NodeManager to register", yarn_ready, started)
    except BaseException:
        down()
        raise
    write_env(env)
    print(f"secure_cluster: up (KDC 127.0.0.1:{KDC_PORT} realm {REALM}, HDFS hdfs://127.0.0.1:{NAMENODE_PORT}, "
          f"YARN 127.0.0.1:{RESOURCEMANAGER_ADDRESSES['yarn.resourcemanager.address']}); "
          f". {ENV_FILE.relative_to(ROOT)}")


def down() -> None:
    running = stop(read_state(), grace_s=3)  # nothing to keep: the next `up` starts from nothing
    STATE_FILE.unlink(missing_ok=True)
    ENV_FILE.unlink(missing_ok=True)
    print(f"secure_cluster: down (stopped {running} processes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        up() if args.command == "up" else down()
    except (ClusterError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None)
        print(f"secure_cluster: {e}{': ' + detail.decode(errors='replace').strip() if detail else ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
