"""Where a batch is formed: a Work's records -> verify -> decode -> resample -> features -> collate.

Each stage is a plain function of what it needs. The error policy ("fail" raises
CorruptRecord naming shard and row, "skip" drops the record and counts it) is
applied in one place, `form_batches`.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterator

import numpy as np
import torch

from hdfs_io.audio import BadAudio, decode, resample, to_mono
from hdfs_io.chunks import CorruptRecord, Record
from hdfs_io.features import FeatureConfig, log_features
from hdfs_io.work import Work


def verified_decode(data: bytes, crc: int, where: str, key: str) -> tuple[np.ndarray, int]:
    """Returns the decoded (samples, rate) of audio bytes that match their CRC32.

    Raises:
        CorruptRecord: naming `where` and the key, if the bytes fail their checksum or do not decode.
    """
    if zlib.crc32(data) != crc:
        raise CorruptRecord(f"{where}: checksum mismatch (key {key})")
    try:
        return decode(data)
    except BadAudio as e:
        raise CorruptRecord(f"{where}: {e}") from None


def verified_features(data: tuple[bytes, int], bins: int, where: str, key: str) -> np.ndarray:
    """Returns feature-cache features (frames, bins) as float32, if their bytes match their CRC32.

    Raises:
        CorruptRecord: naming `where` and the key, if they do not.
    """
    feats, crc = data
    if zlib.crc32(feats) != crc:
        raise CorruptRecord(f"{where}: feature checksum mismatch (key {key})")
    return np.frombuffer(feats, "<f2").reshape(-1, bins).astype(np.float32)


def prepare(record: Record, where: str, *, feature: FeatureConfig, output: str,
            stats: tuple[np.ndarray, np.ndarray] | None, cache_dir: str | None = None) -> np.ndarray:
    """Returns one record's model input: normalized features (frames, bins), or its waveform at the model's rate.

    `stats` is the per-bin (mean, std) features are normalized with (None for waveforms).

    Raises:
        CorruptRecord: the record fails its checksum or does not decode.
    """
    if isinstance(record.data, tuple):  # from the feature cache
        feats = verified_features(record.data, feature.num_bins, f"{cache_dir}/ {where}", record.key)
    else:
        samples, rate = verified_decode(record.data, record.checksum, where, record.key)
        signal = resample(to_mono(samples), rate, feature.sample_rate)
        if output == "waveform":
            return signal
        feats = log_features(signal, feature)
    mean, std = stats
    return (feats - mean) / std


def collate(position: int, epoch: int, items: list[tuple[str, str, float, np.ndarray]], repeated: bool,
            skipped: list[str], output: str) -> dict:
    """Returns a padded batch: features (B, T, F) or waveforms (B, S), with lengths and transcripts."""
    lengths = [len(x) for *_, x in items]
    longest = max(lengths, default=0)
    if output == "features":
        bins = items[0][3].shape[1] if items else 0
        padded = np.zeros((len(items), longest, bins), np.float32)
    else:
        padded = np.zeros((len(items), longest), np.float32)
    for i, (*_, x) in enumerate(items):
        padded[i, :len(x)] = x
    return {"position": position, "epoch": epoch, "keys": [k for k, *_ in items],
            "transcripts": [t for _, t, *_ in items], "durations": [d for _, _, d, _ in items],
            output: torch.from_numpy(padded), "lengths": torch.tensor(lengths, dtype=torch.int64),
            "repeated": repeated, "skipped": skipped}


def form_batches(work: Work, get: Callable[[int], Record | None], to_input: Callable[[Record, str], np.ndarray],
                 where: Callable[[int, int], str], on_error: str, output: str) -> Iterator[dict]:
    """Yields the Work's batches in order, applying the error policy to each record.

    `get(item)` returns the item's record (None if its chunk lacks it); `to_input(record, where)`
    returns its model input; `where(shard, row)` names it in errors.
    """
    for i in range(len(work)):
        items, skipped = [], []
        for j in work.items(i):
            try:
                here = where(int(work.shards[j]), int(work.rows[j]))
                record = get(j)
                if record is None:
                    raise CorruptRecord(f"{here}: record missing from its chunk")
                items.append((record.key, record.transcript, float(work.durations[j]),
                              to_input(record, here)))
            except CorruptRecord as e:
                if on_error == "fail":
                    raise
                skipped.append(str(e))
        yield collate(int(work.positions[i]), work.epoch, items, bool(work.repeated[i]), skipped, output)

