"""spark_jobs/pack.py end to end: spark-submit on local[2] and on the standalone master, file:// and HDFS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.upload import upload
from scripts.synth_corpus import linked_corpus, tones
from spark_jobs.pack import executor_env
from tests.corpora import Expected, bad_librispeech, ds2_manifest, good_librispeech, kaldi_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, Expected]:
    root = tmp_path_factory.mktemp("bad_corpus")
    return root, bad_librispeech(root)


def to_hdfs(local: Path, hdfs_uri: str) -> str:
    summary = upload(str(local), hdfs_uri, workers=4, progress=False)
    assert not summary.failed
    return hdfs_uri


def run_pack(cluster, master: str, *args: str, check: bool = True):
    return cluster.pack(*args, master=master, check=check)


def transcript_lines(root: Path) -> list[tuple[str, int, str]]:
    out = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for n, raw in enumerate(trans.read_bytes().split(b"\n"), 1):
            if raw.strip():
                out.append((str(trans), n, raw.split(b" ", 1)[0].decode("utf-8", "replace")))
    return out


def check_dataset(uri: str, expected: Expected, source_root: Path | None = None,
                  layout: str = "duration") -> dict:
    """Asserts everything a user would check on a packed dataset; returns its manifest."""
    ds = open_dataset(uri)
    index = ds.index().to_pylist()
    by_key = {r[F.KEY]: r for r in index}
    manifest = ds.manifest

    # every expected key packed, byte for byte, with its normalized transcript
    assert sorted(by_key) == sorted(expected.packed)
    seen = {}
    for shard in range(len(manifest["shards"])):
        for row, (key, audio) in enumerate(ds.shard_records(shard)):
            assert key not in seen, f"{key} packed twice"
            seen[key] = audio
            assert (by_key[key][F.SHARD], by_key[key][F.ROW]) == (shard, row)
            assert audio == expected.packed[key][0], f"{key}: packed bytes differ from the source"
            assert by_key[key][F.CHECKSUM] == zlib.crc32(audio)
            assert by_key[key][F.NUM_BYTES] == len(audio)
            assert by_key[key][F.TRANSCRIPT] == expected.packed[key][1]
    assert set(seen) == set(by_key)

    # the manifest's totals agree with the shards
    assert manifest["utterances"] == len(index) == sum(s["rows"] for s in manifest["shards"])
    assert manifest["hours"] == pytest.approx(sum(r[F.DURATION_S] for r in index) / 3600)
    for shard, info in enumerate(manifest["shards"]):
        with ds.fs.open_input_stream(ds.shard_file(shard)) as f:
            data = f.read()
        assert info["bytes"] == len(data)
        assert info["checksum"] == f"crc32:{zlib.crc32(data):08x}"
        durations = [r[F.DURATION_S] for r in index if r[F.SHARD] == shard]
        assert info["rows"] == len(durations)
        assert (info["min_duration_s"], info["max_duration_s"]) == (min(durations), max(durations))
    assert sum(manifest["stats"]["duration_histogram"]["counts"]) == len(index)
    assert len(manifest["stats"]["features"]["mean"]) == 80
    assert set(manifest["vocabulary"]) == set("".join(t for _, t in expected.packed.values()))

    if layout == "duration":  # shard i is shorter than shard i+1, each sorted by (duration, key)
        ordered = sorted(index, key=lambda r: (r[F.SHARD], r[F.ROW]))
        assert [(r[F.DURATION_S], r[F.KEY]) for r in ordered] == \
            sorted((r[F.DURATION_S], r[F.KEY]) for r in index)

    # every bad input is quarantined with its reason
    quarantine = ds.quarantine()
    assert manifest["quarantined"] == len(quarantine)
    for needle, reason in expected.quarantined:
        assert any((needle in q[F.SOURCE] or needle in q[F.REASON]) and reason in q[F.REASON]
                   for q in quarantine), f"no quarantine record for {needle!r} with {reason!r}: {quarantine}"

    # nothing silently dropped: every audio file and transcript line is packed or quarantined
    if source_root is not None:
        mentioned = "\n".join(f"{q[F.SOURCE]} {q[F.REASON]}" for q in quarantine)
        packed_sources = {r[F.SOURCE].rsplit("/", 1)[-1] for r in index}
        for audio in source_root.rglob("*"):
            if audio.is_file() and not audio.name.endswith(".trans.txt"):
                assert audio.name in packed_sources or str(audio.relative_to(source_root)) in mentioned, audio
        for trans, n, key in transcript_lines(source_root):
            assert key in by_key or key in mentioned or f"{Path(trans).name}:{n}" in mentioned, (trans, n)
    return manifest


def test_pack_local_files_on_local2(cluster, bad_corpus, tmp_path):
    root, expected = bad_corpus
    out = f"file://{tmp_path}/dataset"

    run_pack(cluster, "local[2]", "--input", str(root), "--output", out, "--shard-size-mb", "0.1")

    manifest = check_dataset(out, expected, root)
    assert len(manifest["shards"]) > 2
    stereo = [r for r in open_dataset(out).index().to_pylist() if r[F.KEY] == "900-9000-0007"][0]
    assert (stereo[F.SAMPLE_RATE], stereo[F.CHANNELS], stereo[F.CODEC]) == (44100, 2, "WAV")

    as_json = subprocess.run([sys.executable, "-m", "hdfs_io.inspect", out, "--json"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    as_text = subprocess.run([sys.executable, "-m", "hdfs_io.inspect", out], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    summary = json.loads(as_json)
    assert (summary["utterances"], summary["shards"]) == (manifest["utterances"], len(manifest["shards"]))
    assert summary["quarantine_by_reason"] == {
        "duplicate key": 3, "audio with no transcript line": 2, "line is not valid UTF-8": 1,
        "empty transcript": 1, "transcript line with no audio": 1, "truncated audio": 1,
        "zero-byte audio": 1, "not audio": 1}
    assert f"utterances   {manifest['utterances']}" in as_text and "duplicate key" in as_text
    assert "#" in as_text.split("duration histogram")[1]

    # each shard's index part holds its rows of index.parquet; a version 1 dataset (no parts) reads the same
    v1 = tmp_path / "v1"
    shutil.copytree(tmp_path / "dataset", v1)
    shutil.rmtree(v1 / F.INDEX_DIR)
    (v1 / F.MANIFEST).write_text(json.dumps(dict(manifest, format_version=1)))
    whole = open_dataset(out).index().to_pylist()
    for shard in range(len(manifest["shards"])):
        mine = [r for r in whole if r[F.SHARD] == shard]
        assert open_dataset(out).index_part(shard).to_pylist() == mine
        assert open_dataset(str(v1)).index_part(shard).select(F.INDEX_SCHEMA.names).to_pylist() == mine


def test_pack_hdfs_and_files_on_standalone_master(cluster, bad_corpus, hdfs_dir, tmp_path):
    # HDFS to HDFS on local[2] is test_pack_yarn's reference pack (local2_pack), which YARN's packs must equal
    root, expected = bad_corpus
    source = to_hdfs(root, f"{hdfs_dir}/corpus")

    run_pack(cluster, cluster.spark_master, "--input", source, "--output", f"{hdfs_dir}/dataset",
             "--shard-size-mb", "0.1")
    run_pack(cluster, cluster.spark_master, "--input", f"file://{root}", "--output", str(tmp_path / "ds"))

    check_dataset(f"{hdfs_dir}/dataset", expected, root)
    check_dataset(str(tmp_path / "ds"), expected, root)


def test_rerun_gives_the_same_keys_in_the_same_shards(cluster, bad_corpus, tmp_path):
    root, _ = bad_corpus
    args = ["--input", str(root), "--shard-size-mb", "0.1", "--layout", "shuffled"]

    def placement() -> list[dict]:
        return open_dataset(str(tmp_path / "a")).index([F.KEY, F.SHARD, F.ROW]).to_pylist()

    run_pack(cluster, "local[2]", *args, "--output", str(tmp_path / "a"))
    first = placement()
    run_pack(cluster, "local[2]", *args, "--output", str(tmp_path / "a"), "--overwrite")

    a = placement()
    assert a == first
    assert len({r[F.SHARD] for r in a}) > 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_manifest_and_kaldi_inputs_pack_the_same_utterances(cluster, tmp_path):
    corpus = tmp_path / "corpus"
    expected = good_librispeech(corpus, 6, seed=3)
    manifest, kaldi = ds2_manifest(corpus, expected), kaldi_folder(corpus, expected)

    run_pack(cluster, "local[2]", "--input", str(manifest), "--output", str(tmp_path / "m"))
    run_pack(cluster, "local[2]", "--input", str(kaldi), "--output", str(tmp_path / "k"))

    # manifest keys are the audio paths without extension, relative to the manifest
    m_index = open_dataset(str(tmp_path / "m")).index().to_pylist()
    by_stem = {r[F.KEY].rsplit("/", 1)[-1]: r for r in m_index}
    assert sorted(by_stem) == sorted(expected.packed)
    assert all(by_stem[k][F.TRANSCRIPT] == t for k, (_, t) in expected.packed.items())
    check_dataset(str(tmp_path / "k"), expected)


def test_sequencefile_shards_read_by_spark_and_the_hadoop_cli(cluster, bad_corpus, hdfs_dir, tmp_path):
    root, expected = bad_corpus
    out = f"{hdfs_dir}/seq"
    run_pack(cluster, cluster.spark_master, "--input", str(root), "--output", out,
             "--format", "sequencefile", "--shard-size-mb", "0.1")
    check_dataset(out, expected, root)
    job = tmp_path / "read_seq.py"
    job.write_text(
        "import sys, zlib\n"
        "from pyspark import SparkContext\n"
        "sc = SparkContext.getOrCreate()\n"
        "for k, v in sorted(sc.sequenceFile(sys.argv[1]).collect()):\n"
        "    print('REC', k, len(v), zlib.crc32(bytes(v)))\n"
        "from pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.getOrCreate()\n"
        "print('INDEX', spark.read.parquet(sys.argv[2]).count(), spark.read.parquet(sys.argv[3]).count())\n")

    spark_out = cluster.spark_submit(str(job), f"{out}/shards", f"{out}/{F.INDEX}", f"{out}/{F.INDEX_DIR}").stdout
    text = cluster.hadoop("dfs", "-text", f"{out}/shards/part-00000.seq").stdout

    records = {line.split()[1]: (int(line.split()[2]), int(line.split()[3]))
               for line in spark_out.splitlines() if line.startswith("REC ")}
    assert records == {k: (len(b), zlib.crc32(b)) for k, (b, _) in expected.packed.items()}
    # Spark reads the index and its per-shard parts without this project's code
    assert f"INDEX {len(expected.packed)} {len(expected.packed)}" in spark_out.splitlines()
    first_key = open_dataset(out).index().to_pylist()[0][F.KEY]
    assert text.splitlines()[0].startswith(first_key + "\t")


def test_parquet_audio_column_is_uncompressed_and_row_groups_bounded(cluster, bad_corpus, tmp_path):
    root, _ = bad_corpus
    out = tmp_path / "ds"

    run_pack(cluster, "local[2]", "--input", str(root), "--output", str(out), "--row-group-mb", "0.05")

    meta = pq.ParquetFile(out / "shards" / "part-00000.parquet").metadata
    audio_col = F.SHARD_SCHEMA.get_field_index(F.AUDIO)
    assert meta.num_row_groups > 1
    assert all(meta.row_group(i).column(audio_col).compression == "UNCOMPRESSED"
               for i in range(meta.num_row_groups))
    index = open_dataset(str(out)).index().to_pylist()
    shard0 = [r for r in index if r[F.SHARD] == 0]
    starts = [0]
    for i in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(i).num_rows)
    assert all(starts[r[F.ROW_GROUP]] <= r[F.ROW] < starts[r[F.ROW_GROUP] + 1] for r in shard0)


@pytest.mark.parametrize("case", ["missing input", "existing output", "unreachable hdfs", "driver result limit"])
def test_user_errors_exit_2_with_one_line_and_write_nothing(cluster, case, bad_corpus, tmp_path):
    root, _ = bad_corpus
    (tmp_path / "exists").mkdir()
    args = {
        "missing input": ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")],
        "existing output": ["--input", str(root), "--output", str(tmp_path / "exists")],
        "unreachable hdfs": ["--input", "hdfs://127.0.0.1:1/corpus", "--output", str(tmp_path / "out")],
        "driver result limit": ["--input", str(root), "--output", str(tmp_path / "out")],
    }[case]
    conf = ["--conf", "spark.driver.maxResultSize=1k"] if case == "driver result limit" else []

    result = cluster.spark_submit(*conf, str(ROOT / "spark_jobs" / "pack.py"), *args, master="local[2]", check=False)

    output = result.stdout + result.stderr  # spark-submit sends the driver's stderr to stdout
    errors = [line for line in output.splitlines() if line.startswith("pack: ")]
    assert result.returncode == 2
    assert len(errors) == 1 and errors[0].startswith("pack: error: ")
    assert "Traceback" not in output and "\tat " not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
    assert list((tmp_path / "exists").iterdir()) == []


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["output holds the input", "output inside the input", "output is not a dataset"])
def test_overwrite_never_replaces_the_input_or_a_folder_that_is_not_a_dataset(cluster, case, tmp_path):
    good_librispeech(tmp_path / "work" / "corpus", 2, seed=9)
    (tmp_path / "work" / "notes").mkdir()
    (tmp_path / "work" / "notes" / "todo.txt").write_text("not a dataset\n")
    corpus = tmp_path / "work" / "corpus"
    output, words = {
        "output holds the input": (f"file://{tmp_path / 'work'}", "overlap"),
        "output inside the input": (str(corpus / "100"), "overlap"),
        "output is not a dataset": (str(tmp_path / "work" / "notes"), "is not a speechpack dataset"),
    }[case]
    before = snapshot(tmp_path)

    result = run_pack(cluster, "local[2]", "--input", str(corpus), "--output", output, "--overwrite", check=False)

    output_text = result.stdout + result.stderr
    errors = [line for line in output_text.splitlines() if line.startswith("pack: ")]
    assert result.returncode == 2, output_text[-2000:]
    assert len(errors) == 1 and errors[0].startswith("pack: error: ") and words in errors[0]
    assert snapshot(tmp_path) == before, "a file was deleted or written"


@pytest.mark.parametrize("layout, progress", [("manifest", ["--quiet"]), ("librispeech", ["--progress-s", "2"])])
def test_twenty_thousand_files_pack_under_a_driver_result_limit_of_one_megabyte(cluster, layout, progress, tmp_path):
    # 20,000 utterances at even 100 bytes each would be 2 MB: nothing per utterance may reach the driver
    corpus = linked_corpus(tmp_path / "corpus", 20_000, layout, tones(tmp_path / "tones", 20, 0.1, 0.3))

    result = cluster.spark_submit("--driver-memory", "1g",
                                  "--conf", "spark.driver.maxResultSize=1m", str(ROOT / "spark_jobs" / "pack.py"),
                                  "--input", str(corpus), "--output", str(tmp_path / "ds"), "--shard-size-mb", "16",
                                  *progress, master="local[2]", check=False)

    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    progress_lines = [line for line in (result.stdout + result.stderr).splitlines()
                      if line.startswith("pack: ") and "tasks of the running Spark stages done" in line]
    assert bool(progress_lines) == (progress != ["--quiet"]), progress_lines
    assert all(line.split(":")[1].strip() in ("discover", "probe", "lay out", "write", "index")
               for line in progress_lines)
    ds = open_dataset(str(tmp_path / "ds"))
    keys = ds.index([F.KEY]).column(F.KEY).to_pylist()
    assert ds.manifest["utterances"] == len(set(keys)) == 20_000 and ds.manifest["quarantined"] == 0
    assert sum(len(ds.index_part(s, [F.KEY])) for s in range(len(ds.manifest["shards"]))) == 20_000


WRITE_TASKS_JOB = """
import json, sys
from pyspark.sql import SparkSession
from spark_jobs import pack_stages
spark = SparkSession.builder.getOrCreate()
sizes = json.loads(sys.argv[1])
rows = [(shard, pos) for shard, size in enumerate(sizes) for pos in range(size)]
placed = spark.createDataFrame(rows[::-1], "shard int, pos long").repartition(3)
tasks = pack_stages.write_tasks(len(sizes), len(rows), spark.sparkContext.defaultParallelism)
parts = pack_stages.by_write_task(placed, tasks).rdd.glom().map(lambda rs: [tuple(r) for r in rs]).collect()
print("PARTS " + json.dumps({"tasks": tasks, "parts": parts}))
"""


def test_write_tasks_take_runs_of_whole_shards_and_none_is_empty(cluster, tmp_path):
    # 18 small shards on local[2]: a task costs Spark about 0.15 s even when it has nothing to do, so the
    # shards go to 4 tasks, and hashing 18 shard numbers into partitions left some tasks empty and others 5 shards
    sizes = [5 + 7 * (i % 5) for i in range(18)]
    job = tmp_path / "write_tasks.py"
    job.write_text(WRITE_TASKS_JOB)

    out = cluster.spark_submit(str(job), json.dumps(sizes), master="local[2]").stdout
    got = json.loads(next(line for line in out.splitlines() if line.startswith("PARTS "))[len("PARTS "):])

    parts = [[tuple(r) for r in part] for part in got["parts"]]
    assert got["tasks"] == 4 and len(parts) == 4
    assert all(parts), f"an empty write task: {[len(p) for p in parts]}"
    assert max(map(len, parts)) <= 1.5 * sum(sizes) / 4, [len(p) for p in parts]  # balanced by rows
    assert all(p == sorted(p) for p in parts)  # each task's rows by shard, then position
    shards = [sorted({shard for shard, _ in p}) for p in parts]
    assert all(s == list(range(s[0], s[-1] + 1)) for s in shards), shards  # a run of consecutive shards
    assert sorted(r for p in parts for r in p) == [(i, pos) for i, n in enumerate(sizes) for pos in range(n)]
    assert sorted(x for s in shards for x in s) == list(range(len(sizes)))  # no shard split between tasks


def test_executors_get_the_ticket_cache_only_where_they_run_beside_it():
    environ = {"KRB5CCNAME": "FILE:/tmp/krb5cc_1000", "HADOOP_CONF_DIR": "/etc/hadoop/conf", "HOME": "/home/alice"}

    here = {master: executor_env(environ, master) for master in ("local[2]", "spark://host:7077")}
    away = {master: executor_env(environ, master) for master in ("yarn", "k8s://https://api:6443")}

    assert all(env == {"KRB5CCNAME": "FILE:/tmp/krb5cc_1000", "HADOOP_CONF_DIR": "/etc/hadoop/conf"}
               for env in here.values())
    assert all(env == {"HADOOP_CONF_DIR": "/etc/hadoop/conf"} for env in away.values())  # delegation tokens there
