"""hdfs_io.reader.work and hdfs_io.reader.batches on plain lists: a worker's share, and batches formed under each
error policy."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import soundfile

from hdfs_io.reader.batches import form_batches, prepare
from hdfs_io.reader.chunks import CorruptRecord, Record
from hdfs_io.reader.decode_ahead import DecodeAhead
from hdfs_io.reader.planner import RankPlan
from hdfs_io.reader.work import work_for, worker_positions
from hdfs_io.speech.features import FeatureConfig

FEATURE = FeatureConfig()


def flac(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="FLAC")
    return out.getvalue()


def fields(ids: np.ndarray) -> dict:
    return {"shards": np.zeros(len(ids), np.int32), "chunks": np.zeros(len(ids), np.int32), "rows": ids,
            "durations": np.ones(len(ids), np.float32)}


def test_a_worker_takes_every_kth_position_from_the_start_and_only_those_batches():
    plan = RankPlan([np.array([0, 1]), np.array([2]), np.array([3, 4, 5]), np.array([2])], [False, False, False, True])

    work = work_for(7, plan, worker_positions(4, 1, 1, 2), fields)

    assert work.positions.tolist() == [2] and work.epoch == 7
    assert work.rows.tolist() == [3, 4, 5] and list(work.items(0)) == [0, 1, 2]
    assert work_for(0, plan, worker_positions(4, 0, 0, 2), fields).repeated.tolist() \
        == [False, False]
    assert worker_positions(4, 0, 1, 2).tolist() == [1, 3]


@pytest.mark.parametrize("ahead", [False, True], ids=["decoded-here", "decoded-ahead"])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_damaged_or_missing_record_fails_or_is_skipped_and_named(on_error, ahead):
    audio = [flac(0.5), flac(0.7), flac(0.4)]
    plan = RankPlan([np.array([0, 1]), np.array([2])], [False, False])
    work = work_for(0, plan, worker_positions(2, 0, 0, 1), fields)
    records = {0: Record("a", "x", audio[0], zlib.crc32(audio[0])),
               1: Record("b", "y", audio[1][:-9] + b"\0" * 9, zlib.crc32(audio[1]))}  # 2 is missing
    where = lambda s, r: f"shard {s} row {r}"  # noqa: E731
    get = DecodeAhead(records.get, work, where) if ahead else records.get

    def to_input(record, where, uid):
        return prepare(record, where, uid, feature=FEATURE, output="waveform", stats=None)

    batches = form_batches(work, get, to_input, where, on_error, "waveform")

    if on_error == "fail":
        with pytest.raises(CorruptRecord, match="shard 0 row 1: checksum mismatch"):
            list(batches)
        return
    first, second = list(batches)
    assert first["keys"] == ["a"] and first["skipped"] == ["shard 0 row 1: checksum mismatch (key b)"]
    assert second["keys"] == [] and second["skipped"] == ["shard 0 row 2: record missing from its chunk"]
    assert first["lengths"].tolist() == [8000]


def test_features_are_normalized_with_the_given_statistics():
    audio = flac(1.0)
    record = Record("a", "x", audio, zlib.crc32(audio))
    mean, std = np.full(FEATURE.num_bins, 2.0, np.float32), np.full(FEATURE.num_bins, 4.0, np.float32)

    raw, _, _ = prepare(record, "here", 0, feature=FEATURE, output="features",
                        stats=(np.zeros_like(mean), np.ones_like(std)))
    normalized, masks, speed = prepare(record, "here", 0, feature=FEATURE, output="features", stats=(mean, std))

    assert raw.shape[1] == FEATURE.num_bins and np.allclose(normalized, (raw - 2.0) / 4.0)
    assert masks.shape == (0, 3) and speed == 1.0  # augmentation is off unless configured
