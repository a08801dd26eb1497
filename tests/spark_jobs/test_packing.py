"""spark_jobs.packing: shard planning and index assembly, without Spark."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from hdfs_io import dataset_format as F
from spark_jobs.packing import choose_stats_sample, duration_histogram, plan_shards


def rows(sizes_durations):
    return [{F.KEY: f"utt-{i:05d}", F.NUM_BYTES: size, F.DURATION_S: dur, "uri": f"/a/{i}"}
            for i, (size, dur) in enumerate(sizes_durations)]


utterances = st.lists(st.tuples(st.integers(1, 5000), st.floats(0.1, 30, allow_nan=False)), min_size=1, max_size=300)


@settings(max_examples=60, deadline=None)
@given(utterances, st.integers(1000, 20000), st.sampled_from(["duration", "shuffled"]), st.integers(0, 5))
def test_every_utterance_lands_in_one_shard_of_about_the_target_bytes(data, target, layout, seed):
    planned = plan_shards(rows(data), layout, target, seed)

    keys = [r[F.KEY] for shard in planned for r in shard]
    assert sorted(keys) == sorted(r[F.KEY] for r in rows(data))
    biggest = max(size for size, _ in data)
    for shard in planned[:-1]:
        assert target - biggest < sum(r[F.NUM_BYTES] for r in shard) < target + biggest
    if layout == "duration":
        flat = [(r[F.DURATION_S], r[F.KEY]) for shard in planned for r in shard]
        assert flat == sorted(flat)


@given(utterances, st.integers(0, 3))
def test_plans_are_deterministic(data, seed):
    a = plan_shards(rows(data), "shuffled", 4000, seed)
    b = plan_shards(list(reversed(rows(data))), "shuffled", 4000, seed)
    assert [[r[F.KEY] for r in s] for s in a] == [[r[F.KEY] for r in s] for s in b]


def test_duration_histogram_counts_every_utterance_in_one_second_bins():
    hist = duration_histogram([0.2, 0.9, 1.0, 2.5, 2.9])
    assert hist["edges_s"] == [0.0, 1.0, 2.0, 3.0]
    assert hist["counts"] == [2, 1, 2]


def test_stats_sample_is_seeded_and_capped_by_the_corpus():
    assert choose_stats_sample(10, 3, seed=1) == choose_stats_sample(10, 3, seed=1)
    assert len(choose_stats_sample(10, 3, seed=1)) == 3
    assert choose_stats_sample(5, 2000, seed=0) == set(range(5))
    assert choose_stats_sample(5, None, seed=0) == set(range(5))
