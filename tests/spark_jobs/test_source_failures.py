"""spark_jobs.packing: only a file's own fault is quarantined; storage that fails to serve it fails the task.

A quarantine line says "this input is bad, and packing it again will not help". An
unreachable NameNode, a refused permission or an expired token says nothing about the
file, so it must fail the task (Spark retries it) and then the job, in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hdfs_io.format import dataset_format as F
from hdfs_io.speech.features import FeatureConfig
from spark_jobs import packing
from spark_jobs.packing import IN_SAMPLE, MOMENTS, SourceUnreadable, probe_one, write_shard
from spark_jobs.sources import URI

ROOT = Path(__file__).resolve().parents[2]
DEAD_NAMENODE = "hdfs://127.0.0.1:9/corpus/1-2-0003.flac"  # nothing listens on port 9 (discard)


def tone_file(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def test_a_missing_file_is_quarantined(tmp_path):
    out = probe_one({URI: str(tmp_path / "gone.flac")})

    assert out[packing.ERROR].startswith("transcript line with no audio")


def test_a_namenode_that_does_not_answer_fails_the_probe_instead_of_quarantining(cluster):
    # libhdfs answers a stat with "not found" when no NameNode listens: that must not read as a missing file.
    with pytest.raises(SourceUnreadable) as raised:
        probe_one({URI: DEAD_NAMENODE})

    assert DEAD_NAMENODE in str(raised.value) and "\n" not in str(raised.value)


def test_a_namenode_that_does_not_answer_fails_the_write_instead_of_quarantining(cluster, tmp_path):
    row = {URI: DEAD_NAMENODE, F.KEY: "1-2-0003", F.SHARD: 0, F.CHECKSUM: 0, F.NUM_BYTES: 1}
    for f in (F.SHARD_DIR, F.INDEX_DIR, packing.QUARANTINE_PARTS):
        (tmp_path / "ds" / f).mkdir(parents=True)

    with pytest.raises(SourceUnreadable):
        write_shard(0, [row], dataset_uri=str(tmp_path / "ds"), fmt="parquet", row_group_bytes=1 << 20)

    assert not list((tmp_path / "ds" / packing.QUARANTINE_PARTS).iterdir())


def test_a_retried_write_that_succeeds_leaves_no_quarantine_part_of_the_failed_attempt(tmp_path):
    audio = tone_file(tmp_path / "a.wav", 1.0)
    probed = probe_one({URI: str(audio), F.KEY: "a", F.TRANSCRIPT: "A", F.SPEAKER: "s"})
    row = dict(probed, **{F.SHARD: 0})
    ds = tmp_path / "ds"
    for f in (F.SHARD_DIR, F.INDEX_DIR, packing.QUARANTINE_PARTS):
        (ds / f).mkdir(parents=True)
    stale = ds / packing.QUARANTINE_PARTS / "write-00000.jsonl"
    stale.write_text(json.dumps({F.SOURCE: str(audio), F.REASON: "audio vanished during packing: x"}) + "\n")

    summary = write_shard(0, [row], dataset_uri=str(ds), fmt="parquet", row_group_bytes=1 << 20)

    assert summary["rows"] == 1 and summary["failed"] == 0
    assert not stale.exists(), "the failed attempt's quarantine part would be counted with the finished job"


def test_statistics_of_an_hour_long_recording_are_taken_in_bounded_memory(tmp_path):
    long_file = tone_file(tmp_path / "long.wav", 20 * 60.0)  # 20 minutes: about 2 GB of features when whole
    cfg = FeatureConfig()

    tracemalloc.start()
    out = probe_one({URI: str(long_file), IN_SAMPLE: True}, feature_config=vars(cfg))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert out[packing.ERROR] is None and out[F.DURATION_S] == pytest.approx(1200.0)
    frames = np.frombuffer(out[MOMENTS], "<f8")[0]
    assert frames == pytest.approx(packing.STATS_SECONDS * 100, rel=0.01)  # 10 ms hop
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MB above the file's own bytes"


@pytest.mark.parametrize("uri", ["http://example.invalid/a.flac", "s3x://bucket/a.flac"])
def test_a_path_no_filesystem_serves_is_quarantined_with_its_reason(uri):
    out = probe_one({URI: uri})

    assert out[packing.ERROR].startswith("unsupported path: ")


@pytest.mark.parametrize("case", ["audio refused", "folder refused", "namenode unreachable"])
def test_a_pack_whose_audio_the_storage_does_not_serve_fails_in_one_line_and_writes_nothing(
        cluster, hdfs_dir, tmp_path, case):
    from tests.corpora import good_librispeech

    good_librispeech(tmp_path / "corpus", 3, seed=7)
    root = hdfs_dir.split("://", 1)[1].split("/", 1)[1]
    cluster.hadoop("dfs", "-put", str(tmp_path / "corpus"), f"/{root}/corpus")
    chapters = sorted(p.relative_to(tmp_path / "corpus") for p in (tmp_path / "corpus").glob("*/*"))
    manifest = tmp_path / "manifest.jsonl"
    base = "hdfs://127.0.0.1:9/corpus" if case == "namenode unreachable" else f"{hdfs_dir}/corpus"
    manifest.write_text("".join(
        json.dumps({"audio_filepath": f"{base}/{p.relative_to(tmp_path / 'corpus')}", "text": "a b"}) + "\n"
        for p in sorted((tmp_path / "corpus").rglob("*.flac"))))
    cluster.hadoop("dfs", "-chmod", "700", f"/{root}/corpus/{chapters[-1]}")  # one chapter mallory may not enter
    env = cluster.env if case == "namenode unreachable" else dict(cluster.env, HADOOP_USER_NAME="mallory")
    source = f"{hdfs_dir}/corpus" if case == "folder refused" else str(manifest)
    argv = cluster.spark_submit_argv(str(ROOT / "spark_jobs" / "pack.py"), "--input", source,
                                     "--output", str(tmp_path / "out"), "--quiet", master="local[2]")

    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    output = result.stdout + result.stderr  # spark-submit passes the driver's stderr on as its stdout
    errors = [line for line in output.splitlines() if line.startswith("pack: error:")]
    assert result.returncode == (1 if case == "namenode unreachable" else 2), output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in result.stdout, "a traceback reached the user (Spark's own log has the task's)"
    if case == "namenode unreachable":
        assert "hdfs://127.0.0.1:9/corpus/" in errors[0]
    else:
        assert "permission denied" in errors[0] and "mallory" in errors[0]
    assert not (tmp_path / "out").exists(), "a dataset of quarantined good audio was published"


def test_a_tree_listing_that_the_namenode_does_not_answer_fails_the_task_instead_of_quarantining(cluster):
    from spark_jobs.pack_stages import tree_task

    item = {"folder": b"/corpus/100", "recursive": True}

    with pytest.raises(SourceUnreadable):
        list(tree_task([item], 0, fs_uri="hdfs://127.0.0.1:9/corpus"))
