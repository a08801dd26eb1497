"""Per-bin feature mean and std for any feature config, so no reader or model is ever left unnormalized.

dataset.json holds them for the feature config the pack job was given. For any
other config the first reader that needs them computes them from a seeded sample
(whole chunks picked at random, a few dozen utterances from each, so it reads a
handful of chunks rather than one per utterance) and stores them beside the
dataset as feature-stats-<digest>.json; every later reader, on any rank, reads
that file. The sample is seeded, so readers that race to compute agree.
"""

from __future__ import annotations

import json
import posixpath
import sys
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
from pyarrow import fs as pafs

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import Dataset
from hdfs_io.fs.filesystem import captured_stderr
from hdfs_io.speech.audio import BadAudio
from hdfs_io.speech.features import FeatureConfig, FeatureMoments, features_from_bytes

SAMPLE_UTTERANCES = 200
UTTERANCES_PER_CHUNK = 25
SAMPLE_SEED = 0


@dataclass(frozen=True)
class FeatureStats:
    mean: np.ndarray
    std: np.ndarray
    source: str  # where they came from, for messages: dataset.json, the stored file, or a fresh sample


def sample_ids(chunk_codes: np.ndarray, count: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Returns up to `count` utterance ids, sorted: at most UTTERANCES_PER_CHUNK from each of random chunks.

    `chunk_codes[u]` names utterance u's chunk (any integer code, equal within a chunk).
    """
    rng = np.random.default_rng(seed)
    order = np.argsort(chunk_codes, kind="stable")
    ordered = chunk_codes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else np.empty(0, np.int64)
    ends = np.r_[starts[1:], len(ordered)]
    picked: list[np.ndarray] = []
    taken = 0
    for c in rng.permutation(len(starts)):
        if taken >= count:
            break
        members = order[starts[c]:ends[c]]
        chosen = rng.choice(members, min(UTTERANCES_PER_CHUNK, len(members), count - taken), replace=False)
        picked.append(chosen)
        taken += len(chosen)
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)


def packed_config(manifest: dict) -> FeatureConfig:
    """Returns the feature config dataset.json holds statistics for.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: that config is malformed.
    """
    try:
        return FeatureConfig(**manifest["stats"]["features"]["config"])
    except (TypeError, ValueError) as e:
        raise F.DatasetError(f"dataset.json: bad 'stats.features.config': {e}") from None


def feature_stats(ds: Dataset, cfg: FeatureConfig, chunk_codes: np.ndarray,
                  read_audio: Callable[[np.ndarray], Iterable[bytes]]) -> FeatureStats:
    """Returns the feature statistics of `cfg` for dataset `ds`, computing and storing them if none exist.

    `read_audio(ids)` yields the verified audio bytes of those utterances.

    Raises:
        hdfs_io.format.dataset_format.DatasetError: dataset.json's statistics are malformed.
    """
    stats = ds.manifest["stats"]["features"]
    if packed_config(ds.manifest) == cfg:
        return FeatureStats(np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32),
                            F.MANIFEST)
    name = F.feature_stats_file(cfg.digest())
    path = posixpath.join(ds.path, name)
    stored = _read_stored(ds.fs, path, cfg)
    if stored is not None:
        return FeatureStats(*stored, name)
    ids = sample_ids(chunk_codes, SAMPLE_UTTERANCES)
    moments, used = FeatureMoments.empty(cfg.num_bins), 0
    for audio in read_audio(ids):
        try:
            moments.add(features_from_bytes(audio, cfg))
            used += 1
        except BadAudio:
            continue  # damaged audio is the reader's to report; the sample does without it
    if used == 0:
        raise F.DatasetError(f"{ds.uri}: no decodable utterance to compute feature statistics from")
    mean, std = (a.astype(np.float32) for a in moments.mean_std())
    record = {"feature_config": asdict(cfg), "digest": cfg.digest(), "utterances": used, "frames": moments.frames,
              "seed": SAMPLE_SEED, "mean": mean.tolist(), "std": std.tolist()}
    if not _store(ds.fs, path, json.dumps(record).encode()):
        print(f"warning: feature statistics for this feature config were computed from {used} utterances but "
              f"could not be stored in {ds.uri}; every reader computes them again", file=sys.stderr)
    return FeatureStats(mean, std, f"{used} sampled utterances")


def _read_stored(fs: pafs.FileSystem, path: str, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """Returns the stored (mean, std) for `cfg`, or None if there are none or they do not fit `cfg`."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:  # no exception path: libhdfs prints those
        return None
    try:
        with fs.open_input_stream(path) as f:
            record = json.loads(f.read())
        mean, std = np.asarray(record["mean"], np.float32), np.asarray(record["std"], np.float32)
        fits = record["feature_config"] == asdict(cfg) and mean.shape == std.shape == (cfg.num_bins,)
    except (ValueError, KeyError, TypeError):
        return None  # damaged: computed again and replaced
    return (mean, std) if fits and np.isfinite(mean).all() and np.isfinite(std).all() else None


def _store(fs: pafs.FileSystem, path: str, data: bytes) -> bool:
    """Writes `data` to `path` through a temporary name; returns False if this user may not write there."""
    tmp = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}.{uuid.uuid4().hex[:12]}"
    with captured_stderr():  # libhdfs prints a Java trace for a refused write
        return _store_quietly(fs, path, tmp, data)


def _store_quietly(fs: pafs.FileSystem, path: str, tmp: str, data: bytes) -> bool:
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)  # a damaged or unfitting file; HDFS does not rename over a file
        fs.move(tmp, path)
        return True
    except OSError:
        try:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
        except OSError:
            pass
        return fs.get_file_info(path).type != pafs.FileType.NotFound  # another reader stored them first
