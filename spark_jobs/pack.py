"""Pack small audio files into large Parquet or SequenceFile shards, with an index, a quarantine and statistics.

    spark-submit [--master local[*]|spark://HOST:7077|yarn] spark_jobs/pack.py \\
        --input URI --output URI [--format parquet|sequencefile] [--shard-size-mb 256] \\
        [--layout duration|shuffled] [--overwrite] [--stats-sample 2000 | --exact-stats]

URIs may be `hdfs://`, `file://` or plain paths. The input is a LibriSpeech-layout
tree, a DS2 JSON-lines manifest or a Kaldi folder (wav.scp + text). The output
folder is written under a temporary name and renamed into place; its
`dataset.json` appears only when the dataset is complete. See hdfs_io.format.dataset_format.

Exit codes: 0 done, 2 a user error (one line on stderr, nothing written), 1 the storage failed to serve an
input file (one line, nothing written) or a bug (a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

if __package__ in (None, ""):  # run as a script by spark-submit from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyarrow import fs as pafs  # noqa: E402
from pyspark import StorageLevel  # noqa: E402
from pyspark.sql import functions as sf  # noqa: E402

from hdfs_io.format import dataset_format as F  # noqa: E402
from hdfs_io.fs.filesystem import BACKEND_VARIABLE, FilesystemUnavailable, hdfs_user, probe_uri, uri_base  # noqa: E402
from hdfs_io.speech.features import FeatureConfig  # noqa: E402
from spark_jobs import pack_stages as stages  # noqa: E402
from spark_jobs import packing, sources  # noqa: E402

PROGRESS_EVERY_S = 30.0
# Passed on to executors so libhdfs finds its jars and JVM there as it does here.
EXECUTOR_ENV = ("CLASSPATH", "ARROW_LIBHDFS_DIR", "LIBHDFS_OPTS", "JAVA_HOME", "HADOOP_CONF_DIR",
                "HADOOP_USER_NAME", "KRB5CCNAME", BACKEND_VARIABLE)
# Masters whose executors run in containers on other nodes: a ticket cache here is not there, and YARN
# hands them HDFS delegation tokens instead (spark-submit --principal/--keytab, or the submitter's ticket).
CONTAINER_MASTERS = ("yarn", "k8s://")


class UserError(Exception):
    """A mistake in the command: reported in one line with exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pack.py", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="LibriSpeech tree, JSON-lines manifest or Kaldi folder")
    p.add_argument("--output", required=True, help="dataset folder to create")
    p.add_argument("--format", choices=sorted(F.FORMATS), default="parquet")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (default 256)")
    p.add_argument("--row-group-mb", type=float, default=16.0,
                   help="Parquet row group size: the unit a reader streams (default 16)")
    p.add_argument("--layout", choices=["duration", "shuffled"], default="duration")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=0, help="seeds the shuffled layout and the stats sample")
    p.add_argument("--stats-sample", type=int, default=2000,
                   help="utterances sampled for feature mean/std (default 2000)")
    p.add_argument("--exact-stats", action="store_true",
                   help=f"feature mean/std over every utterance (each its first {packing.STATS_SECONDS:g} s)")
    p.add_argument("--feature", choices=["log_mel", "log_spectrogram"], default="log_mel")
    p.add_argument("--master", default=None, help="Spark master when run without spark-submit")
    p.add_argument("--progress-s", type=float, default=PROGRESS_EVERY_S,
                   help=f"seconds between progress lines on stderr (default {PROGRESS_EVERY_S:.0f})")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.shard_size_mb <= 0 or args.row_group_mb <= 0 or args.stats_sample < 0 or args.progress_s <= 0:
        p.error("--shard-size-mb, --row-group-mb, --stats-sample and --progress-s must be positive")
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Raises UserError if the input is missing, the output exists, or a filesystem is unreachable.

    With --overwrite, it also refuses an output that overlaps the input (replacing it
    would delete the input) and an existing output that is not a dataset of this format.
    """
    try:
        _, in_path, info = probe_uri(args.input)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"input {args.input} does not exist")
        out_fs, out_path, out = probe_uri(args.output)
        if out.type == pafs.FileType.NotFound and restore_replaced(out_fs, out_path):
            out = out_fs.get_file_info(out_path)
        if overlap(args.input, in_path, args.output, out_path):
            raise UserError(f"output {args.output} and input {args.input} overlap: the output folder is "
                            "replaced as a whole, so it may neither hold the input nor lie inside it")
        if out.type != pafs.FileType.NotFound and not args.overwrite:
            raise UserError(f"output {args.output} already exists (pass --overwrite to replace it)")
        if out.type != pafs.FileType.NotFound:
            manifest = posixpath.join(out_path, F.MANIFEST)
            try:
                if out_fs.get_file_info(manifest).type != pafs.FileType.File:
                    raise F.DatasetError(f"no {F.MANIFEST}")
                with out_fs.open_input_stream(manifest) as f:
                    F.parse_manifest(f.read())
            except (OSError, F.DatasetError):
                raise UserError(f"output {args.output} exists and is not a {F.FORMAT_NAME} dataset (no valid "
                                f"{F.MANIFEST}); --overwrite replaces only a dataset, so remove it yourself if "
                                "it must go") from None
    except (FilesystemUnavailable, PermissionError) as e:
        raise UserError(str(e)) from None


def restore_replaced(fs: pafs.FileSystem, out_path: str) -> bool:
    """Puts back the dataset that an interrupted `--overwrite` left beside a missing output; returns True if
    there was one (see hdfs_io.format.dataset_format.replaced_leftovers)."""
    leftovers = F.replaced_leftovers(fs, out_path)
    if not leftovers:
        return False
    fs.move(leftovers[0], out_path)
    log(f"restored {out_path} from {leftovers[0]}, where an earlier --overwrite that stopped between its two "
        "renames had left it")
    return True


def overlap(in_uri: str, in_path: str, out_uri: str, out_path: str) -> bool:
    """Returns True if one of two paths on the same filesystem holds the other (or they are the same).

    Local paths are compared after resolving links; two HDFS URIs count as the same
    filesystem whatever their authority (hdfs:///p and hdfs://nn:8020/p may be one).
    """
    if urlparse(in_uri).scheme not in ("", "file") or urlparse(out_uri).scheme not in ("", "file"):
        if urlparse(in_uri).scheme != urlparse(out_uri).scheme:
            return False
    else:
        in_path, out_path = os.path.realpath(in_path), os.path.realpath(out_path)
    a, b = posixpath.normpath(in_path), posixpath.normpath(out_path)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def ship_code(sc) -> None:
    """Sends hdfs_io and spark_jobs, as this driver imported them, to the executors as a zip.

    From a checkout or an installed copy alike: in YARN cluster mode this driver runs from the
    executor environment's site-packages, not from a checkout.
    """
    import hdfs_io
    import spark_jobs

    bundle = Path(tempfile.mkdtemp(prefix="speechpack-")) / "speechpack_code.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        for package in (hdfs_io, spark_jobs):
            root = Path(package.__file__).resolve().parent.parent
            for f in sorted(Path(package.__file__).resolve().parent.rglob("*.py")):
                z.write(f, f.relative_to(root).as_posix())
    sc.addPyFile(str(bundle))


def executor_env(environ: Mapping[str, str], master: str) -> dict[str, str]:
    """Returns what `spark.executorEnv` passes on: EXECUTOR_ENV's variables that are set, less KRB5CCNAME for
    a master whose executors run in containers elsewhere (they get delegation tokens instead)."""
    in_containers = master.startswith(CONTAINER_MASTERS)
    return {key: environ[key] for key in EXECUTOR_ENV
            if environ.get(key) and not (key == "KRB5CCNAME" and in_containers)}


def spark_session(master: str | None):
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    submitted = ""
    if os.environ.get("PYSPARK_GATEWAY_PORT"):  # under spark-submit: its JVM already runs and holds --master
        SparkContext._ensure_initialized()
        submitted = SparkConf().get("spark.master", "")
    else:  # plain `python`: workers use this interpreter
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    master = master or submitted or "local[*]"
    builder = (SparkSession.builder.appName("speechpack-pack").config("spark.ui.showConsoleProgress", "false")
               # lets adaptive execution size the shuffles after a persisted DataFrame (metadata of any size)
               .config("spark.sql.optimizer.canChangeCachedPlanOutputPartitioning", "true")
               .master(master))
    for key, value in executor_env(os.environ, master).items():
        builder = builder.config(f"spark.executorEnv.{key}", value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def log(message: str) -> None:
    print(f"pack: {message}", file=sys.stderr, flush=True)


def pack(spark, args: argparse.Namespace, command: list[str]) -> dict:
    """Runs the pack job on `spark` and returns the manifest it wrote.

    The driver holds a few numbers per input range, Spark partition and shard;
    every per-utterance row stays on the executors (spark_jobs.pack_stages).
    """
    started = time.perf_counter()
    sc = spark.sparkContext
    out_fs, out_path = probe_uri(args.output)[:2]
    parent, name = posixpath.split(out_path.rstrip("/"))
    tmp_path = posixpath.join(parent, F.staging_name(name, uuid.uuid4().hex[:12]))
    tmp_uri = uri_base(args.output) + tmp_path
    try:
        for folder in (F.SHARD_DIR, F.INDEX_DIR, packing.QUARANTINE_PARTS):
            out_fs.create_dir(posixpath.join(tmp_path, folder), recursive=True)
    except PermissionError:
        raise PermissionError(f"permission denied: user {hdfs_user()} may not create {args.output}") from None
    progress = stages.Progress(spark, args.progress_s, enabled=not args.quiet)
    cached = []
    try:
        progress.stage = "discover"
        kind, entries = stages.discover(spark, args.input)
        entries = entries.persist(StorageLevel.MEMORY_AND_DISK)  # listed once, split in two by kind
        resolved = stages.resolve(entries).persist(StorageLevel.MEMORY_AND_DISK)
        cached += [entries, resolved]
        kinds = dict(tuple(r) for r in resolved.groupBy(sources.KIND).count().collect())
        if kind == "librispeech" and not kinds.get(sources.TRANS_FILE):
            raise sources.no_transcripts(args.input)
        candidates_n = kinds.get(sources.CANDIDATE, 0)
        quarantined = stages.write_rejects(resolved.filter(sf.col(sources.KIND) == sources.REJECT), tmp_uri,
                                           "discover", sc.defaultParallelism)
        log(f"{kind} input: {candidates_n} candidates, {quarantined} rejected while reading lists")

        progress.stage = "probe"
        feature_config = FeatureConfig(kind=args.feature)
        candidates = stages.with_stats_sample(resolved.filter(sf.col(sources.KIND) == sources.CANDIDATE),
                                              candidates_n, None if args.exact_stats else args.stats_sample,
                                              args.seed)
        probed = stages.probe(candidates, candidates_n, sc.defaultParallelism, asdict(feature_config))
        probed = probed.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(probed)
        bad = stages.write_rejects(probed.filter(sf.col(packing.ERROR).isNotNull()).select(
            sf.col(sources.URI).alias(F.SOURCE), sf.col(packing.ERROR).alias(F.REASON)), tmp_uri, "probe",
            sc.defaultParallelism)
        quarantined += bad
        usable = candidates_n - bad
        log(f"probed {candidates_n} files: {usable} usable")
        moments, stats_utterances = stages.moments(probed, feature_config.num_bins, sc.defaultParallelism)
        probed_at = time.perf_counter()

        progress.stage = "lay out"
        layout = stages.lay_out(probed.filter(sf.col(packing.ERROR).isNull()), args.layout, usable,
                                int(args.shard_size_mb * 2**20), args.seed)
        progress.stage = "write"
        log(f"writing {layout.shards} shards")
        totals = packing.merge_summaries(stages.write(layout, tmp_uri, args.format, int(args.row_group_mb * 2**20),
                                                       sc.defaultParallelism))
        quarantined += totals["failed"]
        progress.stage = "index"
        index_rows, quarantine_lines = stages.consolidate(spark, tmp_uri, layout.shards)
        if (index_rows, quarantine_lines) != (totals["utterances"], quarantined):
            raise RuntimeError(f"pack: the index has {index_rows} rows and the quarantine {quarantine_lines} "
                               f"lines; the shards hold {totals['utterances']} and {quarantined} were rejected")
        written_at = time.perf_counter()
        manifest = packing.build_manifest(
            fmt=args.format, totals=totals, quarantined=quarantined,
            feature_config=feature_config, moments=moments, stats_utterances=stats_utterances,
            exact_stats=args.exact_stats, command=command,
            config={k: v for k, v in vars(args).items() if k not in ("master", "quiet", "progress_s")},
            timing_s={"discover_and_probe": probed_at - started, "write_shards": written_at - probed_at,
                      "total_in_spark": written_at - started})
        out_fs.delete_dir(posixpath.join(tmp_path, packing.WORK_DIR))
        with out_fs.open_output_stream(posixpath.join(tmp_path, F.MANIFEST)) as f:
            f.write(json.dumps(manifest, indent=1).encode())
        publish(out_fs, tmp_path, out_path)
    except BaseException:
        if out_fs.get_file_info(tmp_path).type != pafs.FileType.NotFound:
            out_fs.delete_dir(tmp_path)
        raise
    finally:
        progress.close()
        for df in cached:
            df.unpersist()
    log(f"wrote {manifest['utterances']} utterances ({manifest['hours']:.3f} h) in "
        f"{len(manifest['shards'])} shards to {args.output}; quarantined {quarantined}")
    return manifest


def publish(fs: pafs.FileSystem, tmp_path: str, out_path: str) -> None:
    """Renames the finished temporary folder into place, replacing an old output if there is one.

    The old output is renamed aside first (`F.replaced_name`) and put back if the second
    rename fails; a driver that dies between the two leaves it there, where the next
    pack restores it (`restore_replaced`) and readers name it (`open_dataset`).
    """
    old = None
    if fs.get_file_info(out_path).type != pafs.FileType.NotFound:
        old = F.replaced_name(tmp_path)
        fs.move(out_path, old)
    try:
        fs.move(tmp_path, out_path)
    except BaseException:
        if old:
            fs.move(old, out_path)
        raise
    if old:
        fs.delete_dir(old)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ["spark_jobs/pack.py", *(sys.argv[1:] if argv is None else argv)]
    try:
        check_paths(args)
        spark = spark_session(args.master)
        try:
            ship_code(spark.sparkContext)
            pack(spark, args, command)
        finally:
            spark.stop()
    except (UserError, sources.InputError, FilesystemUnavailable, PermissionError) as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a Spark job failed: a limit the user set is their mistake, anything else a bug
        failure = source_failure(e)
        if failure is not None:
            code, line = failure
            print(f"pack: error: {line}", file=sys.stderr)
            return code
        limit = spark_limit(e)
        if limit is None:
            raise
        print(f"pack: error: {limit}", file=sys.stderr)
        return 2
    return 0


# How a task's Python exception reaches the driver: as its traceback's text, inside Spark's own error.
_SOURCE_FAILURE = re.compile(r"^spark_jobs\.packing\.(SourceDenied|SourceUnreadable): (.*)$", re.MULTILINE)


def source_failure(error: BaseException) -> tuple[int, str] | None:
    """Returns (exit code, one line) if a Spark job failed because the storage did not serve a source file
    (spark_jobs.packing.SourceUnreadable, after Spark's task retries), else None. A refusal is the user's to
    mend (2); an outage is not (1)."""
    found = _SOURCE_FAILURE.search(str(error))
    if found is None:
        return None
    kind, line = found.groups()
    return (2 if kind == "SourceDenied" else 1), f"{line.strip()} (the storage failed, not the file: nothing " \
        "was quarantined or written; run the pack again once it serves the file)"


_RESULT_LIMIT = re.compile(r"Total size of serialized results of \d+ tasks \(([^)]*)\) is bigger than "
                           r"spark\.driver\.maxResultSize \(([^)]*)\)")


def spark_limit(error: BaseException) -> str | None:
    """Returns one line naming the Spark limit a failed job ran into, or None if it was not a limit."""
    found = _RESULT_LIMIT.search(str(error))
    if found:
        return (f"Spark refused {found.group(1)} of task results, over spark.driver.maxResultSize "
                f"({found.group(2)}); this job sends the driver a few numbers per shard and per Spark partition, "
                "so raise the limit (--conf spark.driver.maxResultSize=64m)")
    return None


if __name__ == "__main__":
    sys.exit(main())
