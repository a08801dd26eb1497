"""spark_jobs.packing: shard cutting across partitions, summaries and statistics, without Spark."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hdfs_io.format import dataset_format as F
from hdfs_io.speech.features import FeatureMoments
from spark_jobs.packing import (cut_shards, duration_histogram, merge_moments, merge_summaries, moments_bytes)

sizes = st.lists(st.integers(1, 5000), min_size=1, max_size=300)


def one_list_oracle(sizes: list[int], target: int) -> list[int]:
    """Shard of each utterance computed the obvious way: where its first byte falls, renumbered densely."""
    starts = np.cumsum(sizes) - np.asarray(sizes)
    raw = (starts // target).tolist()
    dense = {v: i for i, v in enumerate(sorted(set(raw)))}
    return [dense[v] for v in raw]


@st.composite
def partitioned(draw):
    data = draw(sizes)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return data, [b - a for a, b in zip(bounds[:-1], bounds[1:])]


@settings(max_examples=80, deadline=None)
@given(partitioned(), st.integers(100, 20000))
def test_shards_cut_partition_by_partition_are_those_of_one_list(data, target):
    values, partitions = data

    shards = cut_shards(values, target, partitions)

    assert shards == one_list_oracle(values, target)
    assert shards == cut_shards(values, target)
    assert shards == sorted(shards) and sorted(set(shards)) == list(range(shards[-1] + 1))
    biggest = max(values)
    totals = np.bincount(shards, weights=values)
    assert all(target - biggest < t < target + biggest for t in totals[:-1])


def test_an_utterance_larger_than_a_shard_leaves_no_shard_number_unused():
    # starts 0, 10, 105, 115: shard numbers 0, 0, 5, 5 before 1 to 4 are squeezed out
    assert cut_shards([10, 95, 10, 10], 20, [1, 2, 1]) == [0, 0, 1, 1]


def test_duration_histogram_counts_every_utterance_in_one_second_bins():
    hist = duration_histogram([0.2, 0.9, 1.0, 2.5, 2.9])
    assert hist["edges_s"] == [0.0, 1.0, 2.0, 3.0]
    assert hist["counts"] == [2, 1, 2]


def summary(shard: int, durations: list[float], text: str) -> dict:
    return {F.SHARD: shard, "path": F.shard_path(shard, "parquet"), "rows": len(durations), "bytes": 100,
            "checksum": "crc32:00000000", "min_duration_s": min(durations), "max_duration_s": max(durations),
            "audio_seconds": sum(durations), "histogram": duration_histogram(durations)["counts"],
            "vocabulary": "".join(sorted(set(text))), "failed": 1}


def test_shard_summaries_merge_to_the_dataset_totals():
    shards = [summary(1, [3.5, 4.2], "CAT"), summary(0, [0.5, 1.5, 1.7], "DOG")]

    totals = merge_summaries(shards)

    assert [s["path"] for s in totals["shards"]] == [F.shard_path(0, "parquet"), F.shard_path(1, "parquet")]
    assert totals["utterances"] == 5 and totals["failed"] == 2
    assert totals["hours"] == pytest.approx((3.5 + 4.2 + 0.5 + 1.5 + 1.7) / 3600)
    assert totals["vocabulary"] == sorted(set("CATDOG"))
    assert totals["duration_histogram"] == duration_histogram([3.5, 4.2, 0.5, 1.5, 1.7])


def test_a_missing_shard_summary_is_a_bug_not_a_smaller_dataset():
    with pytest.raises(RuntimeError, match="every shard"):
        merge_summaries([summary(0, [1.0], "A"), summary(2, [1.0], "B")])


def test_feature_moments_travel_as_bytes_and_sum():
    a, b = FeatureMoments.empty(3), FeatureMoments.empty(3)
    a.add(np.array([[1.0, 2.0, 3.0]]))
    b.add(np.array([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))

    total, count = merge_moments([moments_bytes(a), None, moments_bytes(b)], 3)

    assert count == 2 and total.frames == 3
    assert total.total.tolist() == [5.0, 5.0, 5.0] and total.total_sq.tolist() == [11.0, 9.0, 11.0]
