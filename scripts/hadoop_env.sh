# Sourced, not run: the one place that sets the Java and Hadoop environment.
#
# Exports JAVA_HOME, HADOOP_CONF_DIR, CLASSPATH (every jar named: JNI does not
# expand wildcards), ARROW_LIBHDFS_DIR, HADOOP_OPTS and LIBHDFS_OPTS (the
# Java 17 --add-opens flags, for the daemons and for libhdfs inside Python).
#
# On a node with a Hadoop distribution (HADOOP_HOME set and bin/hadoop present)
# it uses that distribution's native libhdfs and `hadoop classpath --glob`;
# otherwise the jars resolved from Maven Central into .cache/hadoop/lib and the
# libhdfs.so that scripts/setup.sh builds into .cache/libhdfs.

_hadoop_env_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -z "${JAVA_HOME:-}" ] || [ ! -e "$JAVA_HOME/include/jni.h" ]; then
  if command -v javac >/dev/null 2>&1; then
    JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v javac)")")")"
  fi
fi
export JAVA_HOME

# Hadoop 3.4 reflects into JDK internals; Java 17 refuses without these.
_java17_opens=""
for _pkg in java.lang java.lang.reflect java.io java.net java.nio java.util \
            java.util.concurrent java.util.concurrent.atomic sun.nio.ch \
            sun.nio.cs sun.security.action sun.util.calendar; do
  _java17_opens="$_java17_opens --add-opens=java.base/$_pkg=ALL-UNNAMED"
done
export HADOOP_JAVA17_OPENS="$_java17_opens"
export HADOOP_OPTS="${HADOOP_OPTS_EXTRA:-} $_java17_opens -Djava.net.preferIPv4Stack=true"
# -Xrs: the JVM inside a Python process leaves SIGTERM and SIGINT to Python. Without it the JVM
# catches SIGTERM and runs its shutdown hooks, and a DataLoader worker that is terminated while
# a read hangs never exits (seen: the trainer then waits for it forever).
export LIBHDFS_OPTS="$_java17_opens -Xmx512m -Xrs"

if [ -n "${HADOOP_HOME:-}" ] && [ -x "$HADOOP_HOME/bin/hadoop" ]; then
  export HADOOP_CONF_DIR="${HADOOP_CONF_DIR:-$HADOOP_HOME/etc/hadoop}"
  export CLASSPATH="$("$HADOOP_HOME/bin/hadoop" classpath --glob)"
  export ARROW_LIBHDFS_DIR="${ARROW_LIBHDFS_DIR:-$HADOOP_HOME/lib/native}"
  export HADOOP_LAUNCHER="$HADOOP_HOME/bin/hadoop"
else
  export HADOOP_CONF_DIR="${HADOOP_CONF_DIR:-$_hadoop_env_root/conf/hadoop}"
  _jars=""
  for _jar in "$_hadoop_env_root"/.cache/hadoop/lib/*.jar; do
    [ -e "$_jar" ] && _jars="$_jars:$_jar"
  done
  export CLASSPATH="$HADOOP_CONF_DIR$_jars"
  export ARROW_LIBHDFS_DIR="$_hadoop_env_root/.cache/libhdfs"
  export HADOOP_LAUNCHER="$_hadoop_env_root/scripts/hadoop"
fi
unset _hadoop_env_root _java17_opens _pkg _jar _jars
