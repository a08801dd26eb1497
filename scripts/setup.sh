#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine with Python 3.11.
# Idempotent: each step checks what is already there. `make setup` runs it.
#
#   1. Debian packages: JDK 17, Maven, gcc, espeak-ng + sox (test speech),
#      libsndfile, libtirpc-dev (pydoop's build), MIT Kerberos (KDC, admin, client tools).
#   2. The virtualenv .venv with this project and its dev dependencies.
#   3. Hadoop 3.4.x jars from Maven Central into .cache/hadoop/lib (conf/hadoop/pom.xml).
#   4. libhdfs.so, built from the C sources in pydoop's sdist, into .cache/libhdfs.
#   5. pydoop, built against those jars.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CACHE="$ROOT/.cache"
PYTHON="${PYTHON:-python3.11}"
PYDOOP_VERSION=2.0.0
PYDOOP_SHA256=c7eb2ad8c36d2a75dc1c6cee701928334614f2e862a70798b0cb278e3102f77d
mkdir -p "$CACHE"

say() { echo "setup: $*"; }

# 1. Debian packages
need=()
command -v javac >/dev/null 2>&1 && javac -version 2>&1 | grep -q ' 17\.' || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
command -v gcc >/dev/null || need+=(gcc)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox)
[ -e /usr/include/tirpc/rpc/rpc.h ] || need+=(libtirpc-dev)
ldconfig -p | grep -q 'libsndfile\.so\.1' || need+=(libsndfile1)
# Kerberos (tests/test_kerberos.py, scripts/secure_cluster.py): MIT's KDC, kadmin.local, and kinit/klist/kdestroy
command -v kinit >/dev/null || need+=(krb5-user)
[ -x /usr/sbin/krb5kdc ] || need+=(krb5-kdc)
[ -x /usr/sbin/kadmin.local ] || need+=(krb5-admin-server)
if [ ${#need[@]} -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# A machine may carry several JDKs; Hadoop 3.4 and Spark 4.0 are run on 17.
if ! javac -version 2>&1 | grep -q ' 17\.'; then
  jdk17="$(ls -d /usr/lib/jvm/java-17-openjdk-* 2>/dev/null | head -1)"
  [ -n "$jdk17" ] || { echo "setup: no JDK 17 found after install" >&2; exit 1; }
  export JAVA_HOME="$jdk17" PATH="$jdk17/bin:$PATH"
fi

# 2. virtualenv
if [ ! -x .venv/bin/python ]; then
  command -v "$PYTHON" >/dev/null || PYTHON=python3
  say "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
if [ ! -e "$CACHE/venv.stamp" ] || [ pyproject.toml -nt "$CACHE/venv.stamp" ]; then
  say "installing the project into .venv (torch, pyspark, pyarrow: a few minutes the first time)"
  .venv/bin/pip install -q --upgrade "pip>=23" wheel
  .venv/bin/pip install -q -e ".[dev]"
  touch "$CACHE/venv.stamp"
fi

# 3. Hadoop jars
if [ ! -e "$CACHE/hadoop.stamp" ] || [ conf/hadoop/pom.xml -nt "$CACHE/hadoop.stamp" ]; then
  say "resolving Hadoop jars from Maven Central"
  rm -rf "$CACHE/hadoop/lib"
  mvn -q -B -f conf/hadoop/pom.xml dependency:copy-dependencies \
    -DoutputDirectory="$CACHE/hadoop/lib" -DincludeScope=runtime
  touch "$CACHE/hadoop.stamp"
fi

# shellcheck source=scripts/hadoop_env.sh
unset HADOOP_HOME
. scripts/hadoop_env.sh

# 4. pydoop's sdist, pinned and verified; its libhdfs C sources build libhdfs.so
sdist="$CACHE/pydoop/pydoop-$PYDOOP_VERSION.tar.gz"
if [ ! -e "$sdist" ]; then
  say "downloading pydoop $PYDOOP_VERSION sdist from PyPI"
  mkdir -p "$CACHE/pydoop"
  url="$(.venv/bin/python - "$PYDOOP_VERSION" <<'PY'
import json, sys, urllib.request
meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/pydoop/json"))
print(next(u["url"] for u in meta["releases"][sys.argv[1]] if u["packagetype"] == "sdist"))
PY
)"
  .venv/bin/python -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$url" "$sdist.part"
  echo "$PYDOOP_SHA256  $sdist.part" | sha256sum -c --quiet
  mv "$sdist.part" "$sdist"
fi
src="$CACHE/pydoop/src"
if [ ! -d "$src/pydoop-$PYDOOP_VERSION" ]; then
  mkdir -p "$src" && tar -xzf "$sdist" -C "$src"
  # pydoop's MapReduce-pipes Java code calls IOUtils.cleanup(Log, ...), which
  # Hadoop 3.4 removed; we use only pydoop.hdfs, so swap in closeStream.
  sed -i 's/IOUtils\.cleanup(LOG, \([a-z]*\))/IOUtils.closeStream(\1)/' \
    "$src/pydoop-$PYDOOP_VERSION/src/it/crs4/pydoop/mapreduce/pipes/TaskLog.java"
fi
if [ ! -e "$ARROW_LIBHDFS_DIR/libhdfs.so" ]; then
  say "building libhdfs.so from pydoop's libhdfs sources"
  mkdir -p "$ARROW_LIBHDFS_DIR"
  lh="$src/pydoop-$PYDOOP_VERSION/src/libhdfs"
  gcc -O2 -shared -fPIC -DHAVE_BETTER_TLS -w \
    -I"$lh" -I"$lh/include" -I"$lh/include/hdfs" -I"$lh/os/posix" \
    -I"$JAVA_HOME/include" -I"$JAVA_HOME/include/linux" \
    "$lh/hdfs.c" "$lh/jni_helper.c" "$lh/exception.c" "$lh/common/htable.c" "$lh"/os/posix/*.c \
    -L"$JAVA_HOME/lib/server" -ljvm -Wl,-rpath,"$JAVA_HOME/lib/server" -lpthread \
    -o "$ARROW_LIBHDFS_DIR/libhdfs.so.part"
  mv "$ARROW_LIBHDFS_DIR/libhdfs.so.part" "$ARROW_LIBHDFS_DIR/libhdfs.so"
fi

# 5. pydoop (its setup.py asks `hadoop classpath`: scripts/hadoop answers)
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pydoop') is None)"; then
  say "building pydoop against the Maven Hadoop classpath"
  # pydoop's setup.py imports pkg_resources, gone from the setuptools torch wants: build the wheel
  # in a separate build environment with an old setuptools, then install only the wheel.
  buildenv="$CACHE/pydoop/buildenv"
  [ -x "$buildenv/bin/python" ] || .venv/bin/python -m venv "$buildenv"
  "$buildenv/bin/pip" install -q "setuptools>=61,<70" wheel
  rm -rf "$CACHE/pydoop/wheel"
  (cd "$src/pydoop-$PYDOOP_VERSION" && PATH="$ROOT/scripts:$PATH" \
     CFLAGS="-I/usr/include/tirpc" LDFLAGS="-ltirpc" \
     "$buildenv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$CACHE/pydoop/wheel" .)
  .venv/bin/pip install -q --no-deps "$CACHE"/pydoop/wheel/pydoop-*.whl
fi
say "ready"
