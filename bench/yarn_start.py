"""bench/yarn_start: what a pack on YARN pays to start, against the same pack on Spark standalone.

    make cluster-up && . .devcluster/env.sh
    python -m bench.yarn_start [--utterances 5000] [--repeats 3]

The same corpus (bench/pack's, on local disk) is packed to HDFS by three
submissions, interleaved: the standalone master (2 workers x 1 core), YARN
client mode and YARN cluster mode (2 executors x 1 core from the executor
environment on HDFS, scripts/executor_env). Start-up is the spark-submit's wall
time less the job's own `timing_s.total_in_spark`: JVMs, the YARN application
master, container localization (the 100 MB environment), executor registration
and Python worker start. Figures are medians.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from bench.common import ROOT, SPARK_SUBMIT, bench_args, corpus, median, write_result
from hdfs_io.format.dataset import open_dataset
from scripts.devcluster import local_spark_env
from scripts.executor_env import build, spark_flags

EXECUTORS = ["--num-executors", "2", "--executor-cores", "1", "--executor-memory", "1g", "--driver-memory", "1g"]


def submissions(env_uri: str) -> dict[str, list[str]]:
    """Returns spark-submit's arguments before the job file, by submission name."""
    spark_home = os.environ["SPARK_HOME"]
    yarn = ["--master", "yarn", "--conf", f"spark.yarn.jars=local:{spark_home}/jars/*", *EXECUTORS]
    return {
        "standalone": ["--master", os.environ["SPARK_MASTER"], "--total-executor-cores", "2",
                       "--executor-memory", "1g", "--driver-memory", "1g"],
        "yarn_client": [*yarn, "--deploy-mode", "client", *spark_flags(env_uri, "client")],
        "yarn_cluster": [*yarn, "--deploy-mode", "cluster", *spark_flags(env_uri, "cluster"),
                         "--conf", "spark.yarn.appMasterEnv.SPEECHPACK_HDFS_BACKEND=native"],
    }


def run(args: list[str], input_uri: str, output_uri: str) -> tuple[float, float]:
    """Returns (wall seconds of spark-submit, the job's seconds inside Spark)."""
    started = time.perf_counter()
    subprocess.run([str(SPARK_SUBMIT), *args, "--conf", "spark.ui.enabled=false",
                    str(ROOT / "spark_jobs" / "pack.py"), "--input", input_uri, "--output", output_uri,
                    "--overwrite", "--shard-size-mb", "16", "--quiet"],
                   check=True, capture_output=True, env=local_spark_env())
    wall = time.perf_counter() - started
    return wall, open_dataset(output_uri).manifest["timing_s"]["total_in_spark"]


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__, argv)
    hdfs = os.environ.get("HDFS_URI")
    if not hdfs:
        print("bench.yarn_start: needs the dev cluster: make cluster-up && . .devcluster/env.sh")
        return 2
    root = corpus(args.utterances)
    archive = build()  # this checkout's code, not an older archive's
    base = f"{hdfs}/bench/yarn-{uuid.uuid4().hex[:8]}"
    hadoop = [str(ROOT / "scripts" / "hadoop"), "dfs"]
    subprocess.run([*hadoop, "-mkdir", "-p", base], check=True)
    subprocess.run([*hadoop, "-put", str(archive), f"{base}/env.tar.gz"], check=True)
    runs = submissions(f"{base}/env.tar.gz")
    walls: dict[str, list[float]] = {name: [] for name in runs}
    inside: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for _ in range(args.repeats):
            for name, submit in runs.items():
                wall, in_spark = run(submit, f"file://{root}", f"{base}/{name}")
                walls[name].append(wall)
                inside[name].append(in_spark)
                print(f"{name}: wall {wall:.1f} s, in Spark {in_spark:.1f} s", flush=True)
    finally:
        subprocess.run([*hadoop, "-rm", "-r", "-skipTrash", base], check=False, capture_output=True)
    result = {"utterances": args.utterances, "repeats": args.repeats, "archive_mb": archive.stat().st_size / 2**20}
    for name in runs:
        start_up = [w - s for w, s in zip(walls[name], inside[name])]
        result[name] = {"wall_s": median(walls[name]), "in_spark_s": median(inside[name]),
                        "start_up_s": median(start_up), "walls_s": walls[name], "in_spark_runs_s": inside[name]}
    for name in ("yarn_client", "yarn_cluster"):
        result[f"{name}_start_up_over_standalone"] = result[name]["start_up_s"] / result["standalone"]["start_up_s"]
        result[f"{name}_wall_over_standalone"] = result[name]["wall_s"] / result["standalone"]["wall_s"]
    path = write_result("yarn_start", result)
    print(f"bench.yarn_start: {path}")
    for name in runs:
        r = result[name]
        print(f"  {name:<13} wall {r['wall_s']:6.1f} s  in Spark {r['in_spark_s']:6.1f} s  "
              f"start-up {r['start_up_s']:5.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
