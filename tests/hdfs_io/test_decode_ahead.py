"""hdfs_io.reader.decode_ahead: records decoded on a thread of their own, a bounded number ahead, errors at their item."""

from __future__ import annotations

import os
import threading
import time
import zlib

import numpy as np
import pytest

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


@pytest.mark.parametrize("cores, ranks, spare", [(2, 1, True), (2, 2, False), (96, 8, True), (8, 8, False)])
def test_a_thread_decodes_ahead_only_where_each_reading_process_has_a_core_to_spare(monkeypatch, cores, ranks, spare):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))  # each rank reads in-process here: one reader a rank

    assert a_core_to_spare() is spare
