"""hdfs_io.format.sequencefile: the pure-Python writer and reader."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given, strategies as st

from hdfs_io.format.sequencefile import (BYTES_WRITABLE, TEXT, SequenceFileReader, SequenceFileWriter,
                                         UnsupportedCodec, read_vint, text_bytes, write_vint)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_vint_round_trips(n):
    encoded = write_vint(n)
    assert read_vint(encoded, 0) == (n, len(encoded))


def test_vint_matches_hadoop_encoding_on_known_values():
    assert write_vint(0) == b"\x00"
    assert write_vint(127) == b"\x7f"
    assert write_vint(-112) == b"\x90"
    assert write_vint(128) == b"\x8f\x80"
    assert write_vint(-113) == b"\x87\x70"


def test_written_records_read_back_with_offsets_and_sync_markers():
    records = [(f"utt-{i:04d}", bytes([i % 256]) * (3000 + 997 * i)) for i in range(60)]
    buf = io.BytesIO()
    writer = SequenceFileWriter(buf, name="part-00000.seq")
    offsets = [writer.append(k, v) for k, v in records]

    reader = SequenceFileReader(io.BytesIO(buf.getvalue()))
    got = [(k.decode(), v) for k, v in reader.records()]

    assert got == records
    assert (reader.key_class, reader.value_class) == (TEXT, BYTES_WRITABLE)
    assert buf.getvalue().count(b"\xff\xff\xff\xff" + writer.sync) > 1  # sync points were written
    for offset, (key, value) in zip(offsets, records):
        raw_key, raw_value = reader.read_at(offset)
        assert raw_key == text_bytes(key) and raw_value[4:] == value


def test_same_name_gives_identical_bytes():
    a, b = io.BytesIO(), io.BytesIO()
    for buf in (a, b):
        SequenceFileWriter(buf, name="x").append("k", b"v")
    assert a.getvalue() == b.getvalue()


def header(codec: str) -> bytes:
    return (b"SEQ\x06" + text_bytes(TEXT) + text_bytes(BYTES_WRITABLE) + b"\x01\x00" + text_bytes(codec)
            + struct.pack(">i", 0) + b"s" * 16)


def test_record_compressed_zlib_values_are_decompressed():
    value = struct.pack(">i", 5) + b"hello"
    compressed = zlib.compress(value)
    key = text_bytes("k1")
    body = struct.pack(">ii", len(key) + len(compressed), len(key)) + key + compressed

    reader = SequenceFileReader(io.BytesIO(header("org.apache.hadoop.io.compress.DefaultCodec") + body))

    assert list(reader.records()) == [(b"k1", b"hello")]


def test_unknown_codec_is_named_in_the_error():
    with pytest.raises(UnsupportedCodec, match="SnappyCodec"):
        SequenceFileReader(io.BytesIO(header("org.apache.hadoop.io.compress.SnappyCodec")))
