"""hdfs_io.reader.shard_reader on packed datasets: file:// and the real HDFS, Parquet and SequenceFile shards."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pyarrow import fs as pafs
import pytest
import soundfile
from threadpoolctl import threadpool_info, threadpool_limits

from hdfs_io.augment import main as augment_main
from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.format.sequencefile import SequenceFileReader
from hdfs_io.fs.filesystem import BACKEND_VARIABLE, open_filesystem
from hdfs_io.reader.planner import PlanConfig
from hdfs_io.reader.shard_reader import CorruptRecord, ReaderConfig, ShardDataset, ShardLoader, key_hash
from hdfs_io.speech import augmentation
from hdfs_io.speech.augmentation import AugmentConfig
from hdfs_io.speech.features import FeatureConfig
from hdfs_io.speech.speed import perturbed_length
from scripts.synth_corpus import linked_corpus, tones
from tests.corpora import good_librispeech

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ReaderConfig(plan=PlanConfig(batch_seconds=12.0, segment_batches=2, window_utterances=8))


@pytest.fixture(scope="module")
def packed(cluster, tmp_path_factory):
    """Returns (expected, {name: dataset URI}) for one corpus packed in both formats, on file:// and on HDFS.

    Each format is packed once, to local disk, and copied to HDFS as it is (a dataset's paths are relative):
    packing to HDFS is spark_jobs' tests' concern, reading it is this module's.
    """
    root = tmp_path_factory.mktemp("reader")
    expected = good_librispeech(root / "corpus", 24, seed=5)
    hdfs_base = f"{cluster.hdfs_uri}/tests/reader-{uuid.uuid4().hex[:12]}"
    uris = {"local-parquet": f"file://{root}/parquet", "local-seq": str(root / "seq"),
            "hdfs-parquet": f"{hdfs_base}/parquet", "hdfs-seq": f"{hdfs_base}/seq"}
    small = ["--shard-size-mb", "0.3", "--row-group-mb", "0.05"]
    fs, base = open_filesystem(hdfs_base)
    for fmt, name in (("parquet", "parquet"), ("sequencefile", "seq")):
        cluster.pack("--input", str(root / "corpus"), "--output", str(root / name), "--format", fmt, *small)
        pafs.copy_files(str(root / name), f"{base}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    yield expected, uris
    fs.delete_dir(base)


def read_all(uri: str, world: int, epoch: int, workers: int, config: ReaderConfig = CONFIG) -> list[list[dict]]:
    out = []
    for rank in range(world):
        ds = ShardDataset(uri, rank, world, config)
        loader = ShardLoader(ds, num_workers=workers, timeout=300 if workers else 0)
        loader.set_epoch(epoch)
        out.append(list(loader))
    return out


@pytest.mark.parametrize("name,backend", [("local-parquet", None), ("hdfs-parquet", "libhdfs"),
                                          ("hdfs-parquet", "native"), ("local-seq", None), ("hdfs-seq", "libhdfs"),
                                          ("hdfs-seq", "native")])
def test_every_utterance_read_once_per_epoch_with_two_workers(packed, name, backend, monkeypatch):
    expected, uris = packed
    if backend:
        monkeypatch.setenv(BACKEND_VARIABLE, backend)

    ranks = read_all(uris[name], world=3, epoch=1, workers=2)

    assert len({len(r) for r in ranks}) == 1, "ranks got different batch counts"
    counts = Counter(k for r in ranks for b in r if not b["repeated"] for k in b["keys"])
    assert counts == Counter(list(expected.packed))
    for batch in (b for r in ranks for b in r):
        assert batch["features"].shape[0] == len(batch["keys"]) and batch["features"].shape[2] == 80
        assert batch["lengths"].max() == batch["features"].shape[1]
        assert batch["transcripts"] == [expected.packed[k][1] for k in batch["keys"]]


def test_output_is_the_same_whatever_the_number_of_workers(packed):
    _, uris = packed

    runs = [read_all(uris["hdfs-parquet"], world=2, epoch=2, workers=w) for w in (0, 1, 2)]

    keys = [[[b["keys"] for b in r] for r in run] for run in runs]
    assert keys[0] == keys[1] == keys[2]
    for a, b in zip(runs[0][0], runs[2][0]):
        assert (a["features"] == b["features"]).all()


def test_epoch_zero_is_sortagrad_and_matches_the_plan_cli(packed):
    _, uris = packed
    ranks = read_all(uris["local-parquet"], world=2, epoch=0, workers=2)

    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "hdfs_io.plan", uris["local-parquet"], "--world-size", "2", "--epoch", "0",
         "--batch-seconds", "12"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)

    for rank in ranks:
        longest = [max(b["durations"]) for b in rank]
        assert longest == sorted(longest)
    cli_cfg = ReaderConfig(plan=PlanConfig(batch_seconds=12.0))
    assert plan["ranks"] == [[b["keys"] for b in r] for r in read_all(uris["local-parquet"], 2, 0, 0, cli_cfg)]


# Reads a dataset in this process for four epochs; prints the most minor page faults an utterance of epochs 1-3
FAULTS_PER_UTTERANCE = """
import resource, sys
from hdfs_io.reader.shard_reader import ShardDataset
from tests.hdfs_io.test_shard_reader import CONFIG
ds, faults = ShardDataset(sys.argv[1], 0, 1, CONFIG), []
for epoch in range(4):
    ds.set_epoch(epoch)
    before, n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0
    for batch in ds:
        n += len(batch["keys"])
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n)
print(max(faults[1:]))
"""


def test_a_reader_keeps_what_it_frees_instead_of_faulting_it_in_again_every_chunk(packed):
    # glibc's defaults gave a chunk's freed records, audio and features back to the kernel, so every chunk faulted
    # its pages in again: 900 faults an utterance, a third of a worker's time (bench/README.md, peers)
    _, uris = packed
    run = subprocess.run([sys.executable, "-c", FAULTS_PER_UTTERANCE, uris["local-parquet"]], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout) < 50


def test_a_reading_process_runs_numpys_blas_on_one_thread(packed):
    # OpenBLAS ran a thread per core in every worker: 2 workers on 2 cores read 3.8x slower (bench/README.md, peers)
    _, uris = packed
    threadpool_limits(limits=2, user_api="blas")  # as OpenBLAS starts on a machine of two cores or more

    next(iter(ShardDataset(uris["local-parquet"], 0, 1)))

    openblas = [pool["num_threads"] for pool in threadpool_info() if pool["internal_api"] == "openblas"]
    assert openblas and all(threads == 1 for threads in openblas)


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(packed):
    _, uris = packed
    uri = uris["hdfs-seq"]
    whole = read_all(uri, world=2, epoch=3, workers=2)[1]

    first = ShardLoader(ShardDataset(uri, 1, 2, CONFIG), num_workers=2, timeout=300)
    first.set_epoch(3)
    seen = []
    for batch in first:
        seen.append(batch["keys"])
        if len(seen) == 2:
            break
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    second = ShardLoader(ShardDataset(uri, 1, 2, CONFIG), num_workers=2, timeout=300)
    second.load_state_dict(state)
    rest = [b["keys"] for b in second]

    assert seen + rest == [b["keys"] for b in whole]
    assert rest and not set(map(tuple, seen)) & set(map(tuple, rest))


@pytest.mark.parametrize("fmt", ["parquet", "sequencefile"])
def test_a_one_chunk_memory_limit_reads_chunks_again_and_yields_the_same_batches(cluster, tmp_path, fmt):
    expected = good_librispeech(tmp_path / "corpus", 24, seed=9)
    uri = str(tmp_path / "ds")
    # a shuffled layout read in SortaGrad order (epoch 0) needs every chunk again and again
    cluster.pack("--input", str(tmp_path / "corpus"), "--output", uri, "--format", fmt, "--layout", "shuffled",
                 "--shard-size-mb", "0.6", "--row-group-mb", "0.3")
    limited = ReaderConfig(plan=CONFIG.plan, max_held_chunks=1)

    free = read_all(uri, world=1, epoch=0, workers=2)[0]
    bounded = read_all(uri, world=1, epoch=0, workers=2, config=limited)[0]

    assert [b["keys"] for b in bounded] == [b["keys"] for b in free]
    assert sorted(k for b in bounded for k in b["keys"]) == sorted(expected.packed)
    for a, b in zip(bounded, free):
        assert (a["features"] == b["features"]).all() and a["transcripts"] == b["transcripts"]
    assert sum(b["chunk_rereads"] for b in free) == 0
    assert sum(b["chunk_rereads"] for b in bounded) > 0


def test_get_returns_the_source_bytes_through_the_index(packed):
    expected, uris = packed
    key = sorted(expected.packed)[7]
    for name in ("hdfs-parquet", "local-seq"):
        got = ShardDataset(uris[name], 0, 1).get(key)
        assert got["audio"] == expected.packed[key][0]
        assert got["transcript"] == expected.packed[key][1]
        assert got["samples"].shape[0] > 0
    with pytest.raises(KeyError):
        ShardDataset(uris["local-seq"], 0, 1).get("no-such-key")


@pytest.mark.parametrize("name", ["local-parquet", "local-seq"])
def test_get_reads_every_row_sharing_a_hash_and_returns_the_one_with_the_key(packed, name):
    expected, uris = packed
    ds = ShardDataset(uris[name], 0, 1)
    wanted, other = sorted(expected.packed)[3], sorted(expected.packed)[11]
    hashes, rows = ds._key_hashes(*ds.ref.open())
    row_of = {h: int(u) for h, u in zip(hashes.tolist(), rows)}
    collide = np.array([key_hash(wanted), key_hash(wanted)])  # `other`'s row first, under `wanted`'s hash
    ds._keys = (collide, np.array([row_of[key_hash(other)], row_of[key_hash(wanted)]]))

    assert ds.get(wanted)["audio"] == expected.packed[wanted][0]
    ds._keys = (collide[:1], np.array([row_of[key_hash(other)]]))
    with pytest.raises(KeyError):
        ds.get(wanted)


@pytest.mark.parametrize("fmt", ["local-parquet", "local-seq"])
def test_a_flipped_byte_is_named_with_fail_and_counted_with_skip(packed, tmp_path, fmt):
    expected, uris = packed
    copy = tmp_path / "ds"
    shutil.copytree(open_filesystem(uris[fmt])[1], copy)
    ds = open_dataset(str(copy))
    victim = ds.index().to_pylist()[5]
    shard_file = copy / ds.manifest["shards"][victim["shard"]]["path"]
    data = bytearray(shard_file.read_bytes())
    audio = expected.packed[victim["key"]][0]
    at = data.find(audio) + len(audio) // 2
    data[at] ^= 0xFF
    shard_file.write_bytes(bytes(data))

    with pytest.raises(CorruptRecord, match=rf"{ds.manifest['shards'][victim['shard']]['path']} row {victim['row']}"):
        read_all(str(copy), world=1, epoch=0, workers=2)
    skip = ReaderConfig(plan=CONFIG.plan, on_error="skip")
    batches = read_all(str(copy), world=1, epoch=0, workers=2, config=skip)[0]

    assert sum(len(b["skipped"]) for b in batches) == 1
    assert sorted(k for b in batches for k in b["keys"]) == sorted(set(expected.packed) - {victim["key"]})
    with pytest.raises(CorruptRecord, match="checksum mismatch"):  # random access checks the CRC too
        ShardDataset(str(copy), 0, 1).get(victim["key"])


def get_audio(ds: ShardDataset, key: str) -> bytes:
    return ds.get(key)["audio"]


def test_get_works_in_a_spawned_process_after_the_parent_built_its_key_table(packed):
    expected, uris = packed
    ds = ShardDataset(uris["local-parquet"], 0, 1)
    keys = sorted(expected.packed)[:5]
    assert ds.get(keys[0])["audio"] == expected.packed[keys[0]][0]  # the table is built here, then pickled

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.starmap(get_audio, [(ds, k) for k in keys])

    assert got == [expected.packed[k][0] for k in keys]


def damage_a_page_header(dataset: Path) -> tuple[str, int, set[str]]:
    """Overwrites the header of the audio column's first page in row group 1 of shard 0.

    Returns the shard's path, the row group and the keys in it.
    """
    ds = open_dataset(str(dataset))
    shard = ds.manifest["shards"][0]["path"]
    meta = pq.ParquetFile(dataset / shard).metadata
    column = meta.schema.to_arrow_schema().get_field_index(F.AUDIO)
    at = meta.row_group(1).column(column).data_page_offset
    data = bytearray((dataset / shard).read_bytes())
    data[at:at + 12] = b"\xff" * 12
    (dataset / shard).write_bytes(bytes(data))
    index = ds.index([F.KEY, F.SHARD, F.ROW_GROUP]).to_pylist()
    return shard, 1, {r[F.KEY] for r in index if r[F.SHARD] == 0 and r[F.ROW_GROUP] == 1}


def test_a_damaged_parquet_page_is_corruption_with_its_policy_not_an_outage(packed, tmp_path):
    expected, uris = packed
    copy = tmp_path / "ds"
    shutil.copytree(open_filesystem(uris["local-parquet"])[1], copy)
    shard, group, lost = damage_a_page_header(copy)
    assert lost

    started = time.monotonic()
    with pytest.raises(CorruptRecord, match=rf"{shard} row group {group}: damaged"):
        read_all(str(copy), world=1, epoch=0, workers=2)
    failed_after = time.monotonic() - started
    skip = ReaderConfig(plan=CONFIG.plan, on_error="skip")
    batches = read_all(str(copy), world=1, epoch=0, workers=2, config=skip)[0]

    assert failed_after < ReaderConfig.retry_seconds / 2, "it was retried as if the storage were down"
    assert sum(len(b["skipped"]) for b in batches) == len(lost)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(set(expected.packed) - lost)


@pytest.mark.parametrize("name", ["local-parquet", "hdfs-seq"])
def test_a_feature_config_other_than_the_packed_one_is_normalized_too(cluster, packed, tmp_path, name):
    _, uris = packed
    uri = copy_dataset(cluster, uris[name], tmp_path)
    ds2_base = FeatureConfig(kind="log_spectrogram", window_ms=20.0, hop_ms=10.0, n_fft=320)  # conf/ds2_base.yaml
    config = ReaderConfig(plan=CONFIG.plan, feature=ds2_base)

    batches = read_all(uri, 1, 0, 2, config)[0]

    frames = np.concatenate([b["features"][i, :n].numpy() for b in batches for i, n in enumerate(b["lengths"])])
    assert frames.shape[1] == 161
    assert abs(frames.mean()) < 0.1 and 0.9 < frames.std() < 1.1
    fs, path = open_filesystem(uri)
    assert fs.get_file_info(f"{path}/{F.feature_stats_file(ds2_base.digest())}").type.name == "File"
    assert ShardDataset(uri, 0, 1, config).normalization()[2] == F.feature_stats_file(ds2_base.digest())


def test_an_hdfs_dataset_without_a_feature_cache_opens_without_java_traces(packed, capfd):
    _, uris = packed

    ShardDataset(uris["hdfs-parquet"], 0, 1, CONFIG)

    assert "Exception" not in capfd.readouterr().err


def test_sequencefile_shards_larger_than_a_read_range_read_every_record_whole(cluster, tmp_path):
    rng = np.random.default_rng(3)
    corpus, lines, sources = tmp_path / "corpus", [], {}
    corpus.mkdir()
    for i in range(10):  # 10 x 2.6 MB of distinct noise: one 26 MB shard, records across the 16 MB boundary
        path = corpus / f"noise-{i}.wav"
        soundfile.write(path, rng.integers(-3000, 3000, 16000 * 80, dtype=np.int16), 16000, subtype="PCM_16")
        sources[path.stem] = path.read_bytes()
        lines.append(json.dumps({"audio_filepath": path.name, "text": f"noise number {i}"}))
    (corpus / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    uri = str(tmp_path / "ds")
    cluster.pack("--input", str(corpus / "manifest.jsonl"), "--output", uri, "--format", "sequencefile",
                 "--shard-size-mb", "64")
    shards = open_dataset(uri).manifest["shards"]
    assert len(shards) == 1 and shards[0]["bytes"] > 1.5 * F.SEQ_CHUNK_BYTES

    config = ReaderConfig(plan=PlanConfig(batch_seconds=200.0), output="waveform")
    batches = read_all(uri, 1, 0, 2, config)[0]

    assert sorted(k for b in batches for k in b["keys"]) == sorted(sources)
    ds = ShardDataset(uri, 0, 1)
    for key, data in sources.items():
        assert ds.get(key)["audio"] == data


def test_sequencefiles_written_by_hadoop_are_read_with_every_supported_compression(cluster, tmp_path):
    job = tmp_path / "write_seq.py"
    job.write_text(
        "import sys\n"
        "from pyspark import SparkContext\n"
        "sc = SparkContext.getOrCreate()\n"
        "records = [('utt-%04d' % i, bytearray([i % 251]) * (100 + 37 * i)) for i in range(300)]\n"
        "kind, codec, out = sys.argv[1:4]\n"
        "conf = {'mapreduce.output.fileoutputformat.compress.type': kind} if codec != 'none' else {}\n"
        "rdd = sc.parallelize(records, 2)\n"
        "if codec == 'none':\n"
        "    rdd.saveAsSequenceFile(out)\n"
        "else:\n"
        "    rdd.saveAsNewAPIHadoopFile(out, 'org.apache.hadoop.mapreduce.lib.output.SequenceFileOutputFormat',\n"
        "        'org.apache.hadoop.io.Text', 'org.apache.hadoop.io.BytesWritable',\n"
        "        conf=dict(conf, **{'mapreduce.output.fileoutputformat.compress': 'true',\n"
        "                   'mapreduce.output.fileoutputformat.compress.codec': codec}))\n")
    expected = {f"utt-{i:04d}": bytes([i % 251]) * (100 + 37 * i) for i in range(300)}
    cases = [("NONE", "none"), ("RECORD", "org.apache.hadoop.io.compress.DefaultCodec"),
             ("BLOCK", "org.apache.hadoop.io.compress.DefaultCodec"),
             ("RECORD", "org.apache.hadoop.io.compress.GzipCodec"),
             ("BLOCK", "org.apache.hadoop.io.compress.GzipCodec")]
    for kind, codec in cases:
        out = tmp_path / f"{kind}-{codec.rsplit('.', 1)[-1]}"
        cluster.spark_submit(str(job), kind, codec, f"file://{out}", master="local[2]")
        got = {}
        for part in sorted(out.glob("part-*")):
            with open(part, "rb") as f:
                reader = SequenceFileReader(f, name=str(part))
                assert reader.compressed == (codec != "none")
                assert reader.block_compressed == (kind == "BLOCK")
                got.update((k.decode(), v) for k, v in reader.records())
        assert got == expected, (kind, codec)


def test_read_cli_reports_throughput(packed):
    _, uris = packed

    result = subprocess.run([sys.executable, "-m", "hdfs_io.read", uris["hdfs-parquet"], "--rank", "0",
                             "--world-size", "2", "--epoch", "1", "--json"], cwd=ROOT, capture_output=True,
                            text=True, check=True)

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["utterances"] > 0 and report["audio_seconds_per_s"] > 0 and report["skipped"] == 0
    assert report["chunk_reads"] >= 1 and report["chunk_rereads"] == 0 and report["plan_seconds"] >= 0
    assert 0 < report["first_batch_seconds"] <= report["wall_seconds"]
    assert report["peak_rss_mb"]["reader"] > 0 and report["peak_rss_mb"]["largest_worker"] > 0


def copy_dataset(cluster, uri: str, tmp_path: Path) -> str:
    """Returns the URI of a copy of a dataset (beside it on HDFS, in tmp_path locally) that a test may change."""
    if uri.startswith("hdfs://"):
        copy = f"{uri}-copy-{uuid.uuid4().hex[:8]}"
        cluster.hadoop("dfs", "-cp", uri, copy)
        return copy
    copy = str(tmp_path / "ds")
    shutil.copytree(open_filesystem(uri)[1], copy)
    return copy


@pytest.mark.parametrize("name", ["local-parquet", "hdfs-seq"])
def test_feature_cache_serves_the_same_features_without_touching_audio(cluster, packed, tmp_path, name):
    _, uris = packed
    uri = copy_dataset(cluster, uris[name], tmp_path)
    cluster.spark_submit(str(ROOT / "spark_jobs" / "cache_features.py"), "--dataset", uri, master="local[2]")
    decoded = read_all(uri, 1, 1, 2, ReaderConfig(plan=CONFIG.plan, use_feature_cache=False))[0]

    cached = read_all(uri, 1, 1, 2, CONFIG)[0]

    assert ShardDataset(uri, 0, 1, CONFIG).cache_dir is not None
    assert [b["keys"] for b in cached] == [b["keys"] for b in decoded]
    for a, b in zip(cached, decoded):
        assert a["features"].shape == b["features"].shape
        assert (a["features"] - b["features"]).abs().max() < 0.02  # float16 storage
    fs, path = open_filesystem(uri)
    for shard in open_dataset(uri).manifest["shards"]:  # ruin the audio: the cache must not need it
        with fs.open_output_stream(f"{path}/{shard['path']}") as f:
            f.write(b"gone")
    assert [b["keys"] for b in read_all(uri, 1, 1, 2, CONFIG)[0]] == [b["keys"] for b in decoded]
    other = ReaderConfig(plan=CONFIG.plan, feature=FeatureConfig(n_mels=40))
    assert ShardDataset(uri, 0, 1, other).cache_dir is None  # another config falls back to decoding
    cache_json = f"{path}/{F.feature_cache_dir(CONFIG.feature.digest())}/{F.FEATURE_CACHE_MANIFEST}"
    with fs.open_input_stream(cache_json) as f:
        manifest = json.loads(f.read())
    del manifest["columns"]  # as written before caches held transcripts
    with fs.open_output_stream(cache_json) as f:
        f.write(json.dumps(manifest).encode())
    assert ShardDataset(uri, 0, 1, CONFIG).cache_dir is None


def test_workers_persist_across_epochs_and_follow_set_epoch_and_resume(packed):
    _, uris = packed
    uri = uris["local-parquet"]
    loader = ShardLoader(ShardDataset(uri, 0, 1, CONFIG), num_workers=2, timeout=300)

    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        epochs.append(list(loader))
    loader.set_epoch(2)
    partial_epoch = iter(loader)
    first = [next(partial_epoch), next(partial_epoch)]  # the consumer stops mid-epoch ...
    loader.load_state_dict(loader.state_dict())  # ... and resumes where it stopped, on the same loader
    rest = list(loader)

    pids = [{b["worker_pid"] for b in batches} for batches in (*epochs, first + rest)]
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2], "the workers were started again"
    assert [b["keys"] for b in epochs[1]] == [b["keys"] for b in read_all(uri, 1, 1, 0)[0]]
    assert [b["keys"] for b in first + rest] == [b["keys"] for b in read_all(uri, 1, 2, 0)[0]]


def test_each_worker_forms_and_hands_over_its_first_batch_of_the_next_epoch_before_the_epoch_is_asked_for(packed):
    """The next epoch's first batches are formed and handed to the loader's process ahead.

    Forming them ahead is not enough: a batch handed over only once the epoch is asked
    for makes the epoch's first step wait for a round trip to a worker that is busy
    forming its next batch (bench/epoch_start measured 4-6x the other steps' wait).
    """
    _, uris = packed
    for name in ("local-parquet", "hdfs-seq"):
        loader = ShardLoader(ShardDataset(uris[name], 0, 1, CONFIG), num_workers=2, timeout=300)
        loader.set_epoch(0)
        list(loader)
        time.sleep(3.0)  # the trainer's last steps of the epoch: the workers have nothing else to do
        loader.set_epoch(1)
        asked_at = time.time()
        epoch1 = list(loader)

        firsts = [min((b for b in epoch1 if b["worker_pid"] == pid), key=lambda b: b["position"])
                  for pid in {b["worker_pid"] for b in epoch1}]
        assert len(firsts) == 2
        assert all(b["formed_at"] < asked_at for b in firsts), f"{name}: formed after the epoch was asked for"
        assert all(b["sent_at"] < asked_at for b in firsts), f"{name}: handed over after the epoch was asked for"
        assert [b["keys"] for b in epoch1] == [b["keys"] for b in read_all(uris[name], 1, 1, 0)[0]]


def test_a_worker_receives_only_its_own_batches_and_their_index_fields(packed):
    _, uris = packed
    ds = ShardDataset(uris["hdfs-seq"], 0, 1, CONFIG)
    plan = ds.plan(1)

    works = [ds.work(1, 1, w, 2) for w in range(2)]

    assert [w.positions.tolist() for w in works] == [list(range(1, len(plan.batches), 2)),
                                                     list(range(2, len(plan.batches), 2))]
    for work in works:
        ids = np.concatenate([plan.batches[p] for p in work.positions])
        assert len(work.shards) == len(work.durations) == len(ids) == work.bounds[-1]
        assert work.rows.tolist() == ds.rows[ids].tolist() and work.chunks.tolist() == ds.chunks[ids].tolist()
        # keys, transcripts and checksums are not the rank's to hand out: the worker reads them with the chunk
        assert {f for f, v in vars(work).items() if v is not None} == {
            "epoch", "positions", "repeated", "bounds", "shards", "chunks", "rows", "durations", "ids"}
        assert work.ids.tolist() == ids.tolist()  # what augmentation draws by


def test_a_reader_position_saved_by_another_planner_is_refused(packed):
    _, uris = packed
    ds = ShardDataset(uris["local-parquet"], 0, 1, CONFIG)
    saved = dict(ds.state_dict(), position=2)
    del saved["planner"]  # saved before positions were tied to the planner's version

    with pytest.raises(ValueError, match="planner"):
        ds.load_state_dict(saved)


def test_an_epoch_stopped_on_three_ranks_is_finished_by_two_reading_each_utterance_once(packed):
    _, uris = packed
    uri = uris["local-parquet"]
    old = [ShardLoader(ShardDataset(uri, r, 3, CONFIG), num_workers=0) for r in range(3)]
    seen = []
    for r, loader in enumerate(old):  # the ranks stop at different places, as after a lost node
        loader.set_epoch(1)
        for n, batch in zip(range(r + 1), loader):
            seen.append(batch)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    changed = ShardDataset(uri, 0, 2, ReaderConfig(plan=PlanConfig(batch_seconds=7.0, segment_batches=2,
                                                                   window_utterances=8)))

    new = [ShardLoader(ShardDataset(uri, r, 2, CONFIG), num_workers=w) for r, w in ((0, 0), (1, 2))]
    for loader in new:
        loader.load_state_dicts(states)
    rest = [list(loader) for loader in new]
    # a checkpoint written mid-way through the resumed epoch resumes again, on one rank
    again = ShardLoader(ShardDataset(uri, 0, 1, CONFIG), num_workers=0)
    again.load_state_dicts([json.loads(json.dumps(loader.state_dict())) for loader in new])

    assert len(rest[0]) == len(rest[1]) > 0
    assert list(again) == [], "a finished epoch left batches behind"
    keys = [k for b in seen + rest[0] + rest[1] if not b["repeated"] for k in b["keys"]]
    assert Counter(keys) == Counter(open_dataset(uri).index([F.KEY]).column(F.KEY).to_pylist())
    with pytest.raises(ValueError, match="batch_seconds 12.0 -> 7.0"):
        changed.load_state_dicts(states)


def test_a_process_that_stops_reading_mid_epoch_exits(cluster, tmp_path):
    # Once an epoch's first batch is taken, the loader hands each worker the next epoch's Work through a
    # multiprocessing queue: 37 bytes an utterance, 146 KB here, twice a pipe's 64 KB. A process that stops
    # before its worker took that Work (a trainer at --max-steps) must still exit; at 30M utterances on
    # 512 ranks x 4 workers a worker's Work is about 540 KB.
    corpus = linked_corpus(tmp_path / "corpus", 4000, "manifest", tones(tmp_path / "tones", 20, 0.1, 0.3))
    cluster.pack("--input", str(corpus), "--output", str(tmp_path / "ds"), "--shard-size-mb", "4")
    code = ("import sys\n"
            "from hdfs_io.reader.shard_reader import ReaderConfig, ShardDataset, ShardLoader\n"
            "loader = ShardLoader(ShardDataset(sys.argv[1], 0, 1, ReaderConfig(output='waveform')), num_workers=1)\n"
            "for i, batch in enumerate(loader):\n"
            "    if i == 3:\n"
            "        break\n"
            "print('stopped', flush=True)\n")

    try:
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ds")], cwd=ROOT, capture_output=True,
                             text=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process did not exit 90 s after it stopped reading; it printed {e.stdout!r}")

    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["stopped"]


WORKER_PARENT = '''
import os
import sys
from hdfs_io.reader.shard_reader import ShardDataset, ShardLoader
from tests.hdfs_io.test_shard_reader import CONFIG

loader = ShardLoader(ShardDataset(sys.argv[1], 0, 1, CONFIG), num_workers=2, timeout=300)
worker = next(iter(loader))["worker_pid"]
with open(f"/proc/{worker}/stat") as f:
    parent = int(f.read().rsplit(")", 1)[1].split()[1])
with open(f"/proc/{parent}/maps") as f:
    maps = f.read()
print(parent != os.getpid(), *(library in maps for library in ("libtorch_cpu", "pandas/_libs/", "hdfs_native/")))
'''


@pytest.mark.parametrize("backend", ["libhdfs", "native"])
def test_hdfs_workers_fork_from_a_forkserver_that_has_imported_the_reader(packed, backend):
    # a worker of a process that opened HDFS cannot be forked from it; started cold, each one imports torch,
    # pyarrow and the reader again (seconds, and pages it does not share): its forkserver imports them once
    _, uris = packed
    env = {**os.environ, BACKEND_VARIABLE: backend}

    run = subprocess.run([sys.executable, "-c", WORKER_PARENT, uris["hdfs-parquet"]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stderr[-3000:]
    # the parent is another process, which has torch, pandas and hdfs-native loaded
    assert run.stdout.split() == ["True"] * 4, run.stdout


NO_JVM = '''
import os
import sys
from hdfs_io.reader.shard_reader import ShardDataset, ShardLoader
from tests.hdfs_io.test_shard_reader import CONFIG

def has_jvm(pid):
    with open(f"/proc/{pid}/maps") as f:
        return "libjvm" in f.read()

processes = {os.getpid(): None}
for batch in ShardLoader(ShardDataset(sys.argv[1], 0, 1, CONFIG), num_workers=2):
    if batch["worker_pid"] not in processes:  # while the worker runs
        processes[batch["worker_pid"]] = has_jvm(batch["worker_pid"])
processes[os.getpid()] = has_jvm(os.getpid())
for pid, jvm in processes.items():
    print(pid, jvm)
'''


def test_by_default_neither_a_reader_nor_its_workers_start_a_jvm(packed):
    _, uris = packed
    env = {k: v for k, v in os.environ.items() if k != BACKEND_VARIABLE}

    run = subprocess.run([sys.executable, "-c", NO_JVM, uris["hdfs-seq"]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)

    assert run.returncode == 0, run.stderr[-3000:]
    processes = dict(line.split() for line in run.stdout.splitlines())
    assert len(processes) == 3 and set(processes.values()) == {"False"}, run.stdout


def augmented_batches(batches: list[dict]) -> dict[str, tuple[bytes, bytes, float, float]]:
    """Returns, per key, the waveform as read (unpadded), its SpecAugment masks, its planned duration and the speed
    it is to be played at."""
    out = {}
    for batch in batches:
        if batch["repeated"]:
            continue
        for i, key in enumerate(batch["keys"]):
            wave = batch["waveform"][i, :batch["lengths"][i]].numpy()
            speed = float(batch["speeds"][i]) if "speeds" in batch else 1.0
            assert key not in out, f"{key} read twice"
            out[key] = (wave.tobytes(), batch["spec_masks"][i].numpy().tobytes(), batch["durations"][i], speed)
    return out


def test_augmentation_perturbs_each_utterance_the_same_on_any_world_size_and_after_an_elastic_resume(packed):
    _, uris = packed
    uri = uris["local-parquet"]
    augment = AugmentConfig(speeds=(0.9, 1.0, 1.1), gain_db=6.0, noise=uris["local-seq"], noise_probability=0.5,
                            frequency_masks=2, time_masks=2)
    config = dataclasses.replace(CONFIG, output="waveform", augment=augment)
    plain = augmented_batches([b for rank in read_all(uri, 1, 1, 0, dataclasses.replace(config, augment=AugmentConfig(
        frequency_masks=1))) for b in rank])

    whole = [b for rank in read_all(uri, 1, 1, 2, config) for b in rank]  # in two workers
    old = [ShardLoader(ShardDataset(uri, r, 3, config), num_workers=0) for r in range(3)]
    seen = []
    for r, loader in enumerate(old):  # stopped at different places
        loader.set_epoch(1)
        seen += [batch for _, batch in zip(range(r + 1), loader)]
    new = [ShardLoader(ShardDataset(uri, r, 2, config), num_workers=w) for r, w in ((0, 0), (1, 1))]
    for loader in new:
        loader.load_state_dicts([json.loads(json.dumps(o.state_dict())) for o in old])
    resumed = seen + [b for loader in new for b in loader]
    epoch2 = augmented_batches(read_all(uri, 1, 2, 0, config)[0])

    reference = augmented_batches(whole)
    assert augmented_batches(resumed) == reference
    assert set(reference) == set(plain)
    changed = [k for k in reference if reference[k][0] != plain[k][0]]
    assert len(changed) == len(reference), "an utterance was read unperturbed"
    assert sum(reference[k][0] != epoch2[k][0] for k in reference) == len(reference), "epoch 2 drew the same"
    assert {round(plain[k][2] / reference[k][2], 2) for k in reference} == {0.9, 1.0, 1.1}
    assert all(round(plain[k][2] / reference[k][2], 2) == reference[k][3] for k in reference), \
        "planned at one speed, read at another"
    for batch in whole:
        assert len(batch["keys"]) == 1 or len(batch["keys"]) * max(batch["durations"]) <= CONFIG.plan.batch_seconds
        speeds = batch["speeds"].tolist() if "speeds" in batch else [1.0] * len(batch["keys"])
        for samples, speed, planned in zip(batch["lengths"].tolist(), speeds, batch["durations"]):
            assert perturbed_length(samples, speed) <= planned * 16000, "longer than planned once played"


def test_a_reader_position_saved_with_other_speed_factors_is_refused(packed):
    _, uris = packed
    saved = ShardDataset(uris["local-parquet"], 0, 1, CONFIG).state_dict()
    augmented = ShardDataset(uris["local-parquet"], 0, 1,
                             dataclasses.replace(CONFIG, augment=AugmentConfig(speeds=(0.9, 1.1))))

    with pytest.raises(ValueError, match=r"speeds \[\] -> \[0.9, 1.1\]"):
        augmented.load_state_dict(saved)


def test_the_augment_command_writes_what_training_reads_to_listen_to_and_look_at(packed, tmp_path, capsys):
    expected, uris = packed
    key = sorted(expected.packed)[0]
    conf = tmp_path / "aug.yaml"
    conf.write_text("augment:\n  speeds: [1.1]\n  frequency_masks: 1\n  time_masks: 1\n")

    code = augment_main([uris["local-parquet"], "--key", key, "--epoch", "3", "--conf", str(conf),
                         "--out", str(tmp_path / "out")])
    missing = augment_main([uris["local-parquet"], "--key", "no-such-key", "--out", str(tmp_path / "out")])

    assert code == 0 and missing == 2
    wav = tmp_path / "out" / f"{key}.e3.wav"
    got = ShardDataset(uris["local-parquet"], 0, 1, CONFIG).get(key)
    assert soundfile.info(wav).frames == int(len(got["samples"]) * 16000 / (got["sample_rate"] * 1.1))
    assert (tmp_path / "out" / f"{key}.e3.png").read_bytes()[:4] == b"\x89PNG"
    assert "has no utterance 'no-such-key'" in capsys.readouterr().err


def test_a_noise_dataset_longer_than_a_worker_should_hold_is_refused_in_one_line(packed, monkeypatch):
    _, uris = packed
    monkeypatch.setattr(augmentation, "NOISE_MAX_SECONDS", 1.0)
    config = dataclasses.replace(CONFIG, augment=AugmentConfig(noise=uris["local-seq"]))

    with pytest.raises(F.DatasetError, match=r"holds \d+ min of audio; every reader worker decodes and holds all "
                                             r"of it, so at most 0 min"):
        ShardDataset(uris["local-parquet"], 0, 1, config)
