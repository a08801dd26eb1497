"""hdfs_io.reader.decode_ahead: records decoded on a thread of their own, a bounded number ahead, errors at their item."""

from __future__ import annotations

import os
import threading
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch.utils.data

from hdfs_io.format.dataset_format import StorageUnavailable
from hdfs_io.reader.batches import Decoded
from hdfs_io.reader.chunks import Record
from hdfs_io.reader.decode_ahead import DecodeAhead, a_core_to_spare
from hdfs_io.reader.planner import RankPlan
from hdfs_io.reader.work import work_for, worker_positions
from tests.hdfs_io.test_batches import fields, flac


def a_work(items: int):
    plan = RankPlan([np.arange(i, min(i + 3, items)) for i in range(0, items, 3)], [False] * -(-items // 3))
    return work_for(0, plan, worker_positions(len(plan.batches), 0, 0, 1), fields)


def where(shard: int, row: int) -> str:
    return f"shard {shard} row {row}"


def test_records_come_decoded_in_order_and_decoded_on_another_thread():
    audio = [flac(0.1 * (i + 1)) for i in range(7)]
    threads = []

    def get(item):
        threads.append(threading.current_thread())
        return Record(f"k{item}", "t", audio[item], zlib.crc32(audio[item]))

    ahead = DecodeAhead(get, a_work(7), where)
    got = [ahead(item) for item in range(7)]
    ahead.close()

    assert [r.key for r in got] == [f"k{i}" for i in range(7)]
    assert all(isinstance(r.data, Decoded) for r in got)
    assert [len(r.data.samples) for r in got] == [1600 * (i + 1) for i in range(7)]
    assert threading.current_thread() not in threads


def test_it_reads_at_most_its_bound_ahead_of_the_reader():
    asked = []

    def get(item):
        asked.append(item)
        return None  # a missing record passes through as None

    ahead = DecodeAhead(get, a_work(30), where, ahead=2)
    assert ahead(0) is None
    time.sleep(0.5)  # time enough to run ahead without a bound

    assert len(asked) <= 1 + 2 + 1  # the one taken, the two held, the one waiting to be held
    ahead.close()


def test_an_outage_is_raised_at_its_own_item_and_not_before():
    audio = flac(0.2)

    def get(item):
        if item == 2:
            raise StorageUnavailable("shard 0: connection refused")
        return Record(f"k{item}", "t", audio, zlib.crc32(audio))

    ahead = DecodeAhead(get, a_work(6), where)

    assert ahead(0).key == "k0" and ahead(1).key == "k1"
    with pytest.raises(StorageUnavailable, match="connection refused"):
        ahead(2)
    ahead.close()


def test_items_asked_for_out_of_order_are_a_bug_said_as_such():
    ahead = DecodeAhead(lambda item: None, a_work(4), where)

    with pytest.raises(RuntimeError, match="item 1 asked for, item 0 decoded"):
        ahead(1)
    ahead.close()


@pytest.mark.parametrize("cores, ranks, workers, spare", [
    (2, 1, None, True), (2, 2, None, False), (96, 8, None, True),  # each rank reads in-process: one reader a rank
    (2, 1, 1, False), (16, 1, 4, True), (8, 1, 4, False), (64, 8, 4, False), (96, 8, 4, True)])
def test_a_thread_decodes_ahead_only_where_each_reading_process_has_a_core_to_spare(monkeypatch, cores, ranks,
                                                                                     workers, spare):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    info = None if workers is None else SimpleNamespace(num_workers=workers)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)

    assert a_core_to_spare() is spare


def test_closing_ends_the_thread_while_it_waits_for_a_chunk_and_after_an_outage_it_reads_nothing_more():
    asked, release = [], threading.Event()

    def get(item):
        asked.append(item)
        if item == 1:
            raise StorageUnavailable("shard 0: connection refused")
        return None

    ahead = DecodeAhead(get, a_work(9), where)
    assert ahead(0) is None
    with pytest.raises(StorageUnavailable):
        ahead(1)
    ahead.thread.join(timeout=5)

    assert not ahead.thread.is_alive() and asked == [0, 1]
    with pytest.raises(RuntimeError, match="after decoding ahead had ended"):
        ahead(2)

    def waits(item):
        release.wait(30)  # a chunk that does not come
        return None

    stuck = DecodeAhead(waits, a_work(3), where)
    stuck.close()
    release.set()
    stuck.thread.join(timeout=5)
    assert not stuck.thread.is_alive()
