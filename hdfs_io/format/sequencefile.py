"""Hadoop SequenceFiles (version 6) in pure Python: a writer (uncompressed) and a reader.

The reader handles no compression, record compression and block compression
with DefaultCodec (zlib) and GzipCodec. Any other codec raises
`UnsupportedCodec` naming it. Keys and values are returned as the raw bytes of
their Writable serialization; `writable_bytes` unwraps Text and BytesWritable.

Layout (org.apache.hadoop.io.SequenceFile):
    header  "SEQ" 6, Text keyClass, Text valueClass, bool compressed, bool blockCompressed,
            [Text codecClass], int32 metadata count + Text pairs, 16-byte sync
    record  int32 recordLength, int32 keyLength, key, value    (-1 + sync marks a sync point)
    block   -1 + sync, vint records, 4 x (vint length, compressed buffer):
            key lengths, keys, value lengths, values
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from typing import BinaryIO, Iterator

MAGIC = b"SEQ"
VERSION = 6
SYNC_SIZE = 16
SYNC_INTERVAL = 5 * 1024 * (4 + SYNC_SIZE)  # as Hadoop 3's SequenceFile.SYNC_INTERVAL
TEXT = "org.apache.hadoop.io.Text"
BYTES_WRITABLE = "org.apache.hadoop.io.BytesWritable"
CODECS = {
    "org.apache.hadoop.io.compress.DefaultCodec": "zlib",
    "org.apache.hadoop.io.compress.GzipCodec": "gzip",
}


class SequenceFileError(ValueError):
    """The bytes are not a well-formed SequenceFile; the message says where."""


class UnsupportedCodec(SequenceFileError):
    """The file is compressed with a codec this reader does not implement."""


def write_vint(n: int) -> bytes:
    """Returns `n` in Hadoop's WritableUtils.writeVLong encoding."""
    if -112 <= n <= 127:
        return struct.pack(">b", n)
    length = -112
    if n < 0:
        n = ~n
        length = -120
    payload = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return struct.pack(">b", length - len(payload)) + payload


def read_vint(buf: bytes, pos: int) -> tuple[int, int]:
    """Returns `(value, next position)` of a Hadoop vint at `buf[pos]`."""
    first = struct.unpack_from(">b", buf, pos)[0]
    if first >= -112:
        return first, pos + 1
    negative = first < -120
    size = (-119 - first) if negative else (-111 - first)
    value = int.from_bytes(buf[pos + 1:pos + size], "big")
    return (~value if negative else value), pos + size


def text_bytes(s: str) -> bytes:
    """Returns the Writable serialization of org.apache.hadoop.io.Text."""
    data = s.encode("utf-8")
    return write_vint(len(data)) + data


def writable_bytes(class_name: str, raw: bytes) -> bytes:
    """Returns the payload of a serialized Text or BytesWritable."""
    if class_name == TEXT:
        length, pos = read_vint(raw, 0)
        return raw[pos:pos + length]
    if class_name == BYTES_WRITABLE:
        (length,) = struct.unpack_from(">i", raw, 0)
        return raw[4:4 + length]
    raise SequenceFileError(f"cannot unwrap Writable class {class_name}")


class SequenceFileWriter:
    """Writes an uncompressed SequenceFile of Text keys and BytesWritable values to a binary sink."""

    def __init__(self, sink: BinaryIO, name: str = "", key_class: str = TEXT,
                 value_class: str = BYTES_WRITABLE):
        self.sink = sink
        # A sync marker derived from the name keeps re-runs byte-identical.
        self.sync = hashlib.md5(f"speechpack-sync:{name}".encode()).digest()
        header = (MAGIC + bytes([VERSION]) + text_bytes(key_class) + text_bytes(value_class)
                  + b"\x00\x00" + struct.pack(">i", 0) + self.sync)
        self.pos = 0
        self._write(header)
        self.last_sync = self.pos

    def _write(self, data: bytes) -> None:
        self.sink.write(data)
        self.pos += len(data)

    def append(self, key: str, value: bytes) -> int:
        """Appends a record and returns its byte offset (where a reader can seek to it)."""
        if self.pos >= self.last_sync + SYNC_INTERVAL:
            self._write(struct.pack(">i", -1) + self.sync)
            self.last_sync = self.pos
        offset = self.pos
        key_raw = text_bytes(key)
        value_raw = struct.pack(">i", len(value)) + value
        self._write(struct.pack(">ii", len(key_raw) + len(value_raw), len(key_raw)) + key_raw + value_raw)
        return offset


class SequenceFileReader:
    """Reads records from a seekable binary source; iterate for `(key_raw, value_raw, offset)`."""

    def __init__(self, source: BinaryIO, name: str = "<sequencefile>"):
        self.source, self.name = source, name
        self._header()

    def _read(self, n: int) -> bytes:
        data = self.source.read(n)
        if len(data) != n:
            raise SequenceFileError(f"{self.name}: truncated (wanted {n} bytes, got {len(data)})")
        return data

    def _text(self) -> str:
        return self._read(self._vint()).decode("utf-8")

    def _header(self) -> None:
        magic = self.source.read(4)
        if len(magic) < 4 or magic[:3] != MAGIC:
            raise SequenceFileError(f"{self.name}: not a SequenceFile (no 'SEQ' magic)")
        if magic[3] != VERSION:
            raise SequenceFileError(f"{self.name}: SequenceFile version {magic[3]} is not supported (need 6)")
        self.key_class, self.value_class = self._text(), self._text()
        self.compressed, self.block_compressed = self._read(1) != b"\x00", self._read(1) != b"\x00"
        self.codec = None
        if self.compressed:
            codec_class = self._text()
            if codec_class not in CODECS:
                raise UnsupportedCodec(f"{self.name}: compression codec {codec_class} is not supported "
                                       f"(supported: {', '.join(CODECS)})")
            self.codec = CODECS[codec_class]
        (count,) = struct.unpack(">i", self._read(4))
        self.metadata = {self._text(): self._text() for _ in range(count)}
        self.sync = self._read(SYNC_SIZE)
        self.data_start = self.source.tell()

    def _decompress(self, data: bytes) -> bytes:
        try:
            return zlib.decompress(data, 47 if self.codec == "gzip" else 15)
        except zlib.error as e:
            raise SequenceFileError(f"{self.name}: corrupt {self.codec} data: {e}") from None

    def _record_or_sync(self) -> int | None:
        """Returns the next record length, consuming sync markers; None at end of file."""
        while True:
            head = self.source.read(4)
            if not head:
                return None
            if len(head) < 4:
                raise SequenceFileError(f"{self.name}: truncated record header")
            (length,) = struct.unpack(">i", head)
            if length != -1:
                return length
            if self._read(SYNC_SIZE) != self.sync:
                raise SequenceFileError(f"{self.name}: sync marker mismatch at byte {self.source.tell() - SYNC_SIZE}")

    def read_at(self, offset: int) -> tuple[bytes, bytes]:
        """Returns `(key_raw, value_raw)` of the record at `offset` (non-block files)."""
        if self.block_compressed:
            raise SequenceFileError(f"{self.name}: random access needs a non-block-compressed file")
        self.source.seek(offset)
        record = self._record_or_sync()
        if record is None:
            raise SequenceFileError(f"{self.name}: no record at byte {offset}")
        return self._record(record)

    def _record(self, length: int) -> tuple[bytes, bytes]:
        (key_length,) = struct.unpack(">i", self._read(4))
        if not 0 <= key_length <= length:
            raise SequenceFileError(f"{self.name}: bad key length {key_length} in a {length}-byte record")
        key = self._read(key_length)
        value = self._read(length - key_length)
        return key, (self._decompress(value) if self.compressed else value)

    def __iter__(self) -> Iterator[tuple[bytes, bytes, int]]:
        self.source.seek(self.data_start)
        if self.block_compressed:
            yield from self._blocks()
            return
        while True:
            length = self._record_or_sync()
            if length is None:
                return
            offset = self.source.tell() - 4
            key, value = self._record(length)
            yield key, value, offset

    def _blocks(self) -> Iterator[tuple[bytes, bytes, int]]:
        while True:
            head = self.source.read(4)
            if not head:
                return
            offset = self.source.tell() - 4
            if head != b"\xff\xff\xff\xff" or self._read(SYNC_SIZE) != self.sync:
                raise SequenceFileError(f"{self.name}: expected a sync marker before the block at byte {offset}")
            records = self._vint()
            key_lengths = self._decompress(self._read(self._vint()))
            keys = self._decompress(self._read(self._vint()))
            value_lengths = self._decompress(self._read(self._vint()))
            values = self._decompress(self._read(self._vint()))
            kpos = vpos = kl = vl = 0
            for _ in range(records):
                klen, kl = read_vint(key_lengths, kl)
                vlen, vl = read_vint(value_lengths, vl)
                yield keys[kpos:kpos + klen], values[vpos:vpos + vlen], offset
                kpos, vpos = kpos + klen, vpos + vlen

    def _vint(self) -> int:
        first = self._read(1)
        b = struct.unpack(">b", first)[0]
        extra = 0 if b >= -112 else ((-119 - b) if b < -120 else (-111 - b)) - 1
        value, _ = read_vint(first + self._read(extra), 0)
        return value

    def over(self, source: BinaryIO) -> "SequenceFileReader":
        """Returns a reader of this file's header over another source (e.g. a byte range in memory)."""
        other = object.__new__(SequenceFileReader)
        other.__dict__.update(self.__dict__, source=source)
        return other

    def iter_range(self, start: int, last: int) -> Iterator[tuple[bytes, bytes, int]]:
        """Yields `(key_raw, value_raw, offset)` for the records at offsets start..last (non-block files)."""
        self.source.seek(start)
        while True:
            length = self._record_or_sync()
            if length is None:
                return
            offset = self.source.tell() - 4
            if offset > last:
                return
            key, value = self._record(length)
            yield key, value, offset

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        """Yields `(key, value)` payloads, unwrapped from Text/BytesWritable."""
        for key, value, _ in self:
            yield writable_bytes(self.key_class, key), writable_bytes(self.value_class, value)


class OffsetBytes(io.BytesIO):
    """An in-memory byte range [start, start + len) that seeks and tells in file offsets."""

    def __init__(self, data: bytes, start: int):
        super().__init__(data)
        self.start = start

    def seek(self, pos: int, whence: int = 0) -> int:
        return super().seek(pos - self.start if whence == 0 else pos, whence) + self.start

    def tell(self) -> int:
        return super().tell() + self.start
