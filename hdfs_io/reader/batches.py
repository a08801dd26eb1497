"""Where a batch is formed: a Work's records -> verify -> decode -> perturb and resample -> features -> collate.

Each stage is a plain function of what it needs. The error policy ("fail" raises
CorruptRecord naming shard and row, "skip" drops the record and counts it) is
applied in one place, `form_batches`.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from hdfs_io.reader.chunks import CorruptRecord, Record
from hdfs_io.reader.work import Work
from hdfs_io.speech.audio import BadAudio, decode, resample, to_mono
from hdfs_io.speech.augmentation import AugmentConfig, perturbed_audio, spec_masks, zero_masks
from hdfs_io.speech.features import FeatureConfig, num_frames
from hdfs_io.speech.speed import features_at, perturbed_length


class Decoded(NamedTuple):
    """A record's audio, verified against its CRC32 and decoded (hdfs_io.reader.decode_ahead)."""
    samples: np.ndarray  # (frames, channels) float32
    rate: int


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


def prepare(record: Record, where: str, uid: int | None, *, feature: FeatureConfig, output: str,
            stats: tuple[np.ndarray, np.ndarray] | None, cache_dir: str | None = None,
            augment: AugmentConfig = AugmentConfig(), seed: int = 0, epoch: int = 0
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns one record's model input, its SpecAugment masks (speech.augmentation.spec_masks; none when off)
    and the speed the input is still to be played at.

    The input is normalized features (frames, bins), at their drawn speed and with their masks set to 0
    (speech.augmentation.zero_masks), or the waveform at the model's
    rate, which the trainer's features play at the speed returned (hdfs_io.speech.speed), as augmentation
    perturbs utterance `uid` in `epoch`. `stats` is the per-bin (mean, std) features are normalized with
    (None for waveforms).

    Raises:
        CorruptRecord: the record fails its checksum or does not decode.
        ValueError: augmentation is on and the Work did not say which utterance this is (`uid` None).
    """
    if uid is None and (augment.changes_audio or augment.masks):
        raise ValueError("augmentation draws by utterance id, and this Work has no ids")
    cached = isinstance(record.data, tuple) and not isinstance(record.data, Decoded)
    if cached:  # from the feature cache (not used when augmentation changes audio)
        feats = verified_features(record.data, feature.num_bins, f"{cache_dir}/ {where}", record.key)
    else:  # audio bytes, or audio decoded ahead (hdfs_io.reader.decode_ahead)
        samples, rate = (record.data if isinstance(record.data, Decoded)
                         else verified_decode(record.data, record.checksum, where, record.key))
        if augment.changes_audio:
            signal, speed = perturbed_audio(augment, seed, epoch, uid, to_mono(samples), rate, feature.sample_rate)
        else:
            signal, speed = resample(to_mono(samples), rate, feature.sample_rate), 1.0
        if output == "waveform":
            frames = num_frames(perturbed_length(len(signal), speed), feature)
            return signal, spec_masks(augment, seed, epoch, uid, frames, feature.num_bins), speed
        feats = features_at(signal, feature, speed)
    mean, std = stats
    masks = spec_masks(augment, seed, epoch, uid, len(feats), feature.num_bins)
    return zero_masks((feats - mean) / std, masks), masks, 1.0


def collate(position: int, epoch: int, items: list[tuple[str, str, float, np.ndarray, np.ndarray, float]],
            repeated: bool, skipped: list[str], output: str) -> dict:
    """Returns a padded batch: features (B, T, F) or waveforms (B, S), with lengths and transcripts.

    Items are (key, transcript, duration, input, SpecAugment masks, speed). Features come with their
    masks applied (`prepare`); waveforms take theirs along ("spec_masks", (B, M, 3)), for the features the
    trainer computes on its device, and their speeds ("speeds", (B,) float64) where one is not 1.
    """
    lengths = [len(x) for _, _, _, x, _, _ in items]
    longest = max(lengths, default=0)
    if output == "features":
        bins = items[0][3].shape[1] if items else 0
        padded = np.zeros((len(items), longest, bins), np.float32)
    else:
        padded = np.zeros((len(items), longest), np.float32)
    for i, (_, _, _, x, _, _) in enumerate(items):
        padded[i, :len(x)] = x
    masks = torch.from_numpy(np.stack([item[4] for item in items]) if items else np.zeros((0, 0, 3), np.int64))
    batch = {"position": position, "epoch": epoch, "keys": [k for k, *_ in items],
             "transcripts": [t for _, t, *_ in items], "durations": [item[2] for item in items],
             output: torch.from_numpy(padded), "lengths": torch.tensor(lengths, dtype=torch.int64),
             "repeated": repeated, "skipped": skipped}
    if output == "waveform" and masks.shape[1]:
        batch["spec_masks"] = masks
    speeds = [item[5] for item in items]
    if any(s != 1.0 for s in speeds):
        batch["speeds"] = torch.tensor(speeds, dtype=torch.float64)
    return batch


def form_batches(work: Work, get: Callable[[int], Record | None], to_input: Callable[[Record, str], np.ndarray],
                 where: Callable[[int, int], str], on_error: str, output: str) -> Iterator[dict]:
    """Yields the Work's batches in order, applying the error policy to each record.

    `get(item)` returns the item's record (None if its chunk lacks it); `to_input(record, where, uid)`
    returns its model input, masks and speed (see `prepare`); `where(shard, row)` names it in errors.
    """
    for i in range(len(work)):
        items, skipped = [], []
        for j in work.items(i):
            try:
                here = where(int(work.shards[j]), int(work.rows[j]))
                record = get(j)
                if record is None:
                    raise CorruptRecord(f"{here}: record missing from its chunk")
                uid = int(work.ids[j]) if work.ids is not None else None
                items.append((record.key, record.transcript, float(work.durations[j]),
                              *to_input(record, here, uid)))
            except CorruptRecord as e:
                if on_error == "fail":
                    raise
                skipped.append(str(e))
        yield collate(int(work.positions[i]), work.epoch, items, bool(work.repeated[i]), skipped, output)

