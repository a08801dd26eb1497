"""hdfs_io.reader.planner: property tests of the epoch planner."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hdfs_io.reader.planner import (PlanConfig, cut, deal, deal_cycles, plan_durations, plan_epoch, plan_rank,
                                    plan_rank_resumed)
from hdfs_io.reader.work import worker_positions

corpora = st.lists(st.floats(0.2, 20.0, allow_nan=False), min_size=1, max_size=400)


def layout(durations: list[float], shard_rows: int = 37):
    d = np.sort(np.asarray(durations))  # a duration-layout index: sorted, cut into shards
    ids = np.arange(len(d))
    return d, ids // shard_rows, ids % shard_rows


configs = st.builds(PlanConfig, batch_seconds=st.sampled_from([20.0, 60.0]),
                    batch_size=st.sampled_from([0, 0, 3]), window_utterances=st.sampled_from([16, 64, 4096]),
                    segment_batches=st.sampled_from([1, 4, 32]), seed=st.integers(0, 3))


@settings(max_examples=150, deadline=None)
@given(corpora, st.integers(1, 64), st.integers(0, 3), configs)
def test_equal_batch_counts_and_every_key_exactly_once_apart_from_counted_repeats(durations, world, epoch, cfg):
    d, shards, rows = layout(durations)

    plan = plan_epoch(d, shards, rows, world, epoch, cfg)

    assert len({len(r.batches) for r in plan.ranks}) == 1
    seen = Counter(int(u) for r in plan.ranks for b, rep in zip(r.batches, r.repeated) if not rep for u in b)
    assert seen == Counter(range(len(d)))
    assert plan.repeated_batches <= world - 1
    assert plan.repeated_utterances == sum(len(b) for r in plan.ranks for b, rep in zip(r.batches, r.repeated) if rep)
    for r in plan.ranks:
        for b in r.batches:
            assert len(b) >= 1
            if cfg.batch_size == 0 and len(b) > 1:
                assert len(b) * d[b].max() <= cfg.batch_seconds + 1e-9


@settings(max_examples=100, deadline=None)
@given(corpora, st.integers(1, 64), configs)
def test_epoch_zero_batches_come_in_non_decreasing_duration_on_every_rank(durations, world, cfg):
    d, shards, rows = layout(durations)

    plan = plan_epoch(d, shards, rows, world, 0, cfg)

    for r in plan.ranks:
        longest = [d[b].max() for b in r.batches]
        shortest = [d[b].min() for b in r.batches]
        assert longest == sorted(longest) and shortest == sorted(shortest)


@settings(max_examples=60, deadline=None)
@given(corpora, st.integers(1, 16), st.integers(0, 4), configs)
def test_plans_are_deterministic_in_seed_and_epoch(durations, world, epoch, cfg):
    d, shards, rows = layout(durations)

    a = plan_epoch(d, shards, rows, world, epoch, cfg)
    b = plan_epoch(d.copy(), shards.copy(), rows.copy(), world, epoch, cfg)

    assert [[x.tolist() for x in r.batches] for r in a.ranks] == [[x.tolist() for x in r.batches] for r in b.ranks]


def test_later_epochs_reorder_and_differ_between_epochs():
    d, shards, rows = layout(list(np.linspace(1, 15, 500)), shard_rows=50)
    cfg = PlanConfig(batch_seconds=30, window_utterances=100)

    e1, e2 = (plan_epoch(d, shards, rows, 2, e, cfg) for e in (1, 2))

    first = [int(b[0]) for b in e1.ranks[0].batches]
    assert first != sorted(first)
    assert [b.tolist() for b in e1.ranks[0].batches] != [b.tolist() for b in e2.ranks[0].batches]


@given(st.integers(0, 500), st.integers(1, 64), st.integers(1, 40))
def test_deal_gives_equal_counts_and_covers_every_position_once(n, world, segment):
    dealt = deal(n, world, segment)

    assert len({len(p) for p in dealt}) == 1
    flat = sorted(p for ps in dealt for p in ps)
    assert flat == list(range(len(flat)))
    assert 0 <= len(flat) - n < world


def greedy_reference(d: list[float], window: int, cfg: PlanConfig) -> list[int]:
    """The batch starts of the plain greedy cut: grow a batch while count x last duration fits."""
    starts, i = [], 0
    while i < len(d):
        starts.append(i)
        end = min(len(d), (i // window + 1) * window)
        m = 1
        while i + m < end and (cfg.batch_size == 0 and (m + 1) * d[i + m] <= cfg.batch_seconds
                               or 0 < m + 1 <= cfg.batch_size):
            m += 1
        i += m
    return starts + [len(d)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.05, 90.0, allow_nan=False), min_size=0, max_size=300),
       st.sampled_from([1, 3, 16, 10_000]), st.sampled_from([0, 0, 4]), st.sampled_from([1.0, 20.0, 60.0]))
def test_the_vectorized_cut_is_the_greedy_cut(durations, window, batch_size, budget):
    cfg = PlanConfig(batch_seconds=budget, batch_size=batch_size)
    d = np.asarray(durations)
    window_of = np.arange(len(d)) // window
    for w in np.unique(window_of):  # non-decreasing inside each window, as the planner sorts them
        d[window_of == w] = np.sort(d[window_of == w])

    starts = cut(d, window, cfg)

    assert starts.tolist() == greedy_reference(d.tolist(), window, cfg)


@settings(max_examples=60, deadline=None)
@given(corpora, st.integers(1, 16), st.integers(0, 2), configs)
def test_one_rank_plans_only_its_share_and_gets_what_the_whole_plan_gives_it(durations, world, epoch, cfg):
    d, shards, rows = layout(durations)

    whole = plan_epoch(d, shards, rows, world, epoch, cfg)

    for rank in range(world):
        mine = plan_rank(d, shards, rows, world, rank, epoch, cfg)
        assert [b.tolist() for b in mine.batches] == [b.tolist() for b in whole.ranks[rank].batches]
        assert mine.repeated == whole.ranks[rank].repeated


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=0, max_size=600), st.integers(1, 32),
       st.integers(1, 8))
def test_balanced_dealing_keeps_ranks_within_one_segment_of_each_other(seconds, world, segment):
    weights = np.asarray(seconds)

    firsts, lengths = deal_cycles(len(weights), world, segment, weights)
    dealt = deal(len(weights), world, segment, weights)

    totals = [weights[[p for p in ps if p < len(weights)]].sum() for ps in dealt]
    heaviest_segment = max((weights[f:f + n].sum() for row, n in zip(firsts, lengths) for f in row), default=0.0)
    assert max(totals) - min(totals) <= heaviest_segment + 1e-9
    assert len({len(p) for p in dealt}) == 1
    assert sorted(p for ps in dealt for p in ps) == list(range(len(dealt[0]) * world))


def test_later_epochs_balance_ranks_by_audio_within_one_percent():
    rng = np.random.default_rng(1)
    d = np.sort(np.clip(rng.gamma(4.0, 3.0, 200_000), 1.0, 35.0))
    ids = np.arange(len(d))

    for epoch in (0, 1):
        plan = plan_epoch(d, ids // 20_000, ids % 20_000, 64, epoch, PlanConfig(batch_seconds=60.0))

        per_rank = np.array([sum(d[b].sum() for b in r.batches) for r in plan.ranks])
        assert (per_rank.max() - per_rank.min()) / per_rank.mean() <= 0.01, epoch


def test_a_window_larger_than_the_dataset_costs_what_the_dataset_does():
    d, shards, rows = layout(list(np.linspace(1, 15, 100)))
    cfg = PlanConfig(batch_seconds=30, window_utterances=10**12)  # "shuffle everything"

    plan = plan_epoch(d, shards, rows, 2, 1, cfg)

    assert sorted(int(u) for r in plan.ranks for b, rep in zip(r.batches, r.repeated) if not rep for u in b) \
        == list(range(100))


@settings(max_examples=150, deadline=None)
@given(corpora, st.lists(st.integers(1, 64), min_size=2, max_size=3), st.integers(0, 1), configs, st.data())
def test_resumes_on_other_world_sizes_read_every_key_once_over_all_runs(durations, worlds, epoch, cfg, data):
    # runs of one epoch on worlds[0], then worlds[1], ...: each stops after a random number of its batches
    d, shards, rows = layout(durations)
    history, read = [], []
    for i, world in enumerate(worlds):
        ranks = [plan_rank_resumed(d, shards, rows, epoch, cfg, history, world, r) for r in range(world)]
        assert len({len(r.batches) for r in ranks}) == 1, f"run {i}: ranks have unequal batch counts"
        assert sum(rep for r in ranks for rep in r.repeated) <= world - 1
        last = i == len(worlds) - 1
        stops = [len(r.batches) if last else data.draw(st.integers(0, len(r.batches)), label=f"run {i} rank {n}")
                 for n, r in enumerate(ranks)]
        read += [(b, rep) for r, p in zip(ranks, stops) for b, rep in zip(r.batches[:p], r.repeated[:p])]
        history.append((world, stops))

    seen = Counter(int(u) for b, rep in read if not rep for u in b)
    assert seen == Counter(range(len(d)))


@given(corpora, st.integers(1, 16), st.integers(0, 2), configs)
def test_a_resume_with_nothing_read_is_the_epochs_own_plan(durations, world, epoch, cfg):
    d, shards, rows = layout(durations)
    whole = [plan_rank(d, shards, rows, world, r, epoch, cfg) for r in range(world)]
    for history in ([], [(world, [0] * world)]):
        resumed = [plan_rank_resumed(d, shards, rows, epoch, cfg, history, world, r) for r in range(world)]
        assert [[b.tolist() for b in r.batches] for r in resumed] == [[b.tolist() for b in r.batches] for r in whole]


def chunked_layout(n: int, shard_rows: int, chunk_rows: int, by_duration: bool, seed: int = 0,
                   chunk_seconds: float | None = None):
    """Returns (durations, shards, rows, chunks) of a packed index: shards of chunks, laid out by duration or not.

    Chunks hold `chunk_rows` rows, or, with `chunk_seconds`, as many as that much audio: pack cuts row
    groups by bytes, so a chunk of long utterances holds fewer of them.
    """
    d = np.random.default_rng(seed).gamma(4.0, 3.0, n).clip(1.0, 35.0)
    d = np.sort(d) if by_duration else d
    ids = np.arange(n)
    shards, rows = ids // shard_rows, ids % shard_rows
    if chunk_seconds is None:
        return d, shards, rows, rows // chunk_rows
    start = np.r_[0.0, np.cumsum(d)][:-1]
    return d, shards, rows, ((start - start[shards * shard_rows]) // chunk_seconds).astype(np.int64)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]), st.integers(1, 3),
       st.booleans(), st.integers(2000, 12000), st.sampled_from([20, 60]), st.integers(0, 3))
def test_each_worker_reads_the_chunks_of_its_own_batches_plus_a_few_boundary_chunks(
        world, lanes_workers, epoch, by_duration, n, chunk_rows, seed):
    lanes, workers = lanes_workers
    d, shards, rows, chunks = chunked_layout(n, 10 * chunk_rows, chunk_rows, by_duration, seed)
    cfg = PlanConfig(batch_seconds=60.0, window_utterances=6 * chunk_rows, lanes=lanes, seed=seed)

    plan = plan_epoch(d, shards, rows, world, epoch, cfg, chunks)

    code = shards.astype(np.int64) << 32 | chunks
    mine = [worker_positions(len(r.batches), 0, w, workers, r.lanes, r.num_lanes) for r in plan.ranks
            for w in range(workers)]
    read = [set(code[np.concatenate([r.batches[p] for p in ps])].tolist())
            for r, ps in zip([r for r in plan.ranks for _ in range(workers)], mine) if len(ps)]
    readers = Counter(c for chunks_read in read for c in chunks_read)
    # a worker's lanes are one run each, the last lane a second one-batch run: 2 ends a run; a run end shares
    # at most the chunks of the window it cuts: about 2 in the duration layout, all of the window's otherwise
    runs = lanes // workers + 1
    per_end = 2 if by_duration else 6 + 2
    for chunks_read in read:
        assert sum(readers[c] > 1 for c in chunks_read) <= 2 * runs * per_end


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 24), min_size=2, max_size=3), st.integers(1, 2), st.booleans(),
       st.integers(1, 3000), st.sampled_from([1, 2, 4]), st.data())
def test_resumes_of_chunked_epochs_on_other_world_sizes_read_every_key_once(worlds, epoch, by_duration, n, lanes,
                                                                            data):
    d, shards, rows, chunks = chunked_layout(n, 200, 20, by_duration)
    cfg = PlanConfig(batch_seconds=60.0, window_utterances=100, lanes=lanes)
    history, read = [], []
    for i, world in enumerate(worlds):
        ranks = [plan_rank_resumed(d, shards, rows, epoch, cfg, history, world, r, chunks) for r in range(world)]
        assert len({len(r.batches) for r in ranks}) == 1
        assert sum(rep for r in ranks for rep in r.repeated) <= world - 1
        stops = [len(r.batches) if i == len(worlds) - 1 else data.draw(st.integers(0, len(r.batches)))
                 for r in ranks]
        read += [(b, rep) for r, p in zip(ranks, stops) for b, rep in zip(r.batches[:p], r.repeated[:p])]
        history.append((world, stops))

    assert Counter(int(u) for b, rep in read if not rep for u in b) == Counter(range(n))


@pytest.mark.parametrize("by_duration", [True, False])
def test_later_epochs_balance_ranks_within_one_percent_with_real_chunks(by_duration):
    d, shards, rows, chunks = chunked_layout(300_000, 1090, 0, by_duration, chunk_seconds=800.0)  # 16 MB of FLAC

    for world in (16, 64):
        for epoch in (1, 2):
            plan = plan_epoch(d, shards, rows, world, epoch, PlanConfig(batch_seconds=60.0), chunks)

            per_rank = np.array([sum(d[b].sum() for b in r.batches) for r in plan.ranks])
            assert (per_rank.max() - per_rank.min()) / per_rank.mean() <= 0.01, (world, epoch)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_every_worker_reads_at_most_15_percent_more_than_it_trains_on_in_sortagrad_and_shuffled_epochs(workers):
    d, shards, rows, chunks = chunked_layout(200_000, 1090, 0, True, chunk_seconds=800.0)
    code = shards.astype(np.int64) << 32 | chunks
    chunk_of = np.unique(code, return_inverse=True)[1]
    chunk_seconds = np.bincount(chunk_of, d)

    for epoch in (0, 1):
        plan = plan_epoch(d, shards, rows, 4, epoch, PlanConfig(batch_seconds=60.0), chunks)

        for r in plan.ranks:
            for w in range(workers):
                ids = np.concatenate([r.batches[p] for p in worker_positions(len(r.batches), 0, w, workers, r.lanes,
                                                                              r.num_lanes)])
                assert chunk_seconds[np.unique(chunk_of[ids])].sum() <= 1.15 * d[ids].sum(), (epoch, w)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 3600), st.floats(0, 1e-30), st.sampled_from([0.0, 1.0, 0.1, 3.4e38, 5e-324])),
                max_size=50))
def test_planned_durations_are_the_least_float32_not_below_each_duration(values):
    durations = np.array(values, np.float64)
    planned = plan_durations(durations)
    rounded = durations.astype(np.float32)
    least = np.where(rounded < durations, np.nextafter(rounded, np.float32(np.inf)), rounded)
    assert planned.dtype == np.float32 and planned.tolist() == least.tolist()
    assert (planned.astype(np.float64) >= durations).all()


def test_negative_durations_are_refused():
    with pytest.raises(ValueError, match="negative"):
        plan_durations(np.array([1.0, -0.5]))
