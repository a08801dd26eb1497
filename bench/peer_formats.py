"""The peers' formats for bench/peers: writing WebDataset, Lhotse Shar, LitData and Mosaic (MDS), and reading them back.

Each reader yields the same thing as ours: float32 batches of normalized log-mel
features, padded to the longest utterance, of at most `batch_seconds` of padded
audio. `Batched` does that work wherever it is iterated, so with DataLoader
workers the decode, features and batching happen in the workers, as ours do.
"""

from __future__ import annotations

import json
import multiprocessing
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.fs.filesystem import worker_start_method
from hdfs_io.speech.audio import decode, probe, resample, to_mono
from hdfs_io.speech.features import FeatureConfig, log_features

# An utterance as the peers store it: the audio file's bytes and what a reader needs besides.
FIELDS = {"key": "str", "flac": "bytes", "text": "str", "duration": "float64"}


class Featurizer:
    """The per-utterance work every reader does: decode, mono, 16 kHz, log-mel, normalize."""

    def __init__(self, manifest: dict):
        stats = manifest["stats"]["features"]
        self.cfg = FeatureConfig(**stats["config"])
        self.mean = np.asarray(stats["mean"], np.float32)
        self.std = np.maximum(np.asarray(stats["std"], np.float32), 1e-5)

    def from_samples(self, samples: np.ndarray, rate: int) -> np.ndarray:
        signal = resample(to_mono(samples), rate, self.cfg.sample_rate)
        return (log_features(signal, self.cfg) - self.mean) / self.std

    def from_bytes(self, data: bytes) -> np.ndarray:
        return self.from_samples(*decode(data))


def pad(features: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(features), max(len(f) for f in features), features[0].shape[1]), np.float32)
    for i, f in enumerate(features):
        out[i, :len(f)] = f
    return out


def padded_duration_batches(samples: Iterable[tuple[np.ndarray, float]], batch_seconds: float):
    """(features, duration) items -> lists whose padded duration fits the budget, in stream order."""
    batch, longest = [], 0.0
    for features, duration in samples:
        if batch and max(longest, duration) * (len(batch) + 1) > batch_seconds:
            yield batch
            batch, longest = [], 0.0
        batch.append(features)
        longest = max(longest, duration)
    if batch:
        yield batch


class Batched(torch.utils.data.IterableDataset):
    """A peer's (audio bytes, duration) stream turned into padded feature batches where it is iterated."""

    def __init__(self, samples: Callable[[], Iterable[tuple[bytes, float]]], featurizer: Featurizer,
                 batch_seconds: float):
        self.samples, self.featurizer, self.batch_seconds = samples, featurizer, batch_seconds

    def __iter__(self) -> Iterator[np.ndarray]:
        items = ((self.featurizer.from_bytes(audio), duration) for audio, duration in self.samples())
        for batch in padded_duration_batches(items, self.batch_seconds):
            yield pad(batch)


def count_utterances(batches: Iterable[np.ndarray]) -> int:
    return sum(len(b) for b in batches)


def through_workers(dataset: Batched, workers: int) -> Iterable[np.ndarray]:
    """Iterates `dataset` in this process (0) or in `workers` DataLoader workers, started as ours are."""
    if workers == 0:
        return dataset
    context = multiprocessing.get_context(worker_start_method())
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, multiprocessing_context=context)


# -- sources: what the conversions start from --------------------------------------

def sources(root: Path) -> list[dict]:
    """Returns {"path", "key", "text"} for every utterance of a LibriSpeech tree, in key order."""
    out = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            key, text = line.split(" ", 1)
            out.append({"path": str(trans.parent / f"{key}.flac"), "key": key, "text": text})
    return out


def checked_sample(source: dict) -> dict:
    """Reads one source file and checks it as pack.py does (every frame decodes, CRC32); returns its sample."""
    data = Path(source["path"]).read_bytes()
    info = probe(data)
    zlib.crc32(data)
    return {"key": source["key"], "flac": data, "text": source["text"], "duration": info.duration_s}


def plain_sample(source: dict) -> dict:
    """Reads one source file and checks nothing; the duration is unknown (0)."""
    return {"key": source["key"], "flac": Path(source["path"]).read_bytes(), "text": source["text"],
            "duration": 0.0}


def our_samples(uri: str, shards: Iterable[int] | None = None) -> Iterator[dict]:
    """Yields the utterances of our dataset's `shards` (default: all) as peer samples, from the shards' own bytes."""
    ds = open_dataset(uri)
    for shard in range(len(ds.manifest["shards"])) if shards is None else shards:
        meta = ds.index_part(shard, [F.KEY, F.TRANSCRIPT, F.DURATION_S]).to_pylist()  # this shard's rows only
        by_key = {m[F.KEY]: m for m in meta}
        for key, audio in ds.shard_records(shard):
            m = by_key[key]
            yield {"key": key, "flac": audio, "text": m[F.TRANSCRIPT], "duration": m[F.DURATION_S]}


# -- WebDataset ----------------------------------------------------------------------

def write_webdataset(samples: Iterable[dict], out: Path, shard_bytes: int) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=shard_bytes, maxcount=10**9, verbose=0) as sink:
        for s in samples:
            sink.write({"__key__": s["key"], "flac": s["flac"], "txt": s["text"].encode(),
                        "json": json.dumps({"duration": s["duration"]}).encode()})


class WebDatasetSamples:
    """`urls`: tar paths, or `pipe:COMMAND` URLs (WebDataset's route to HDFS). Made where it is iterated."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __call__(self) -> Iterator[tuple[bytes, float]]:
        import webdataset as wds

        pipeline = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False).to_tuple("flac", "json")
        return ((flac, json.loads(meta)["duration"]) for flac, meta in pipeline)


# -- Lhotse Shar ---------------------------------------------------------------------

def write_shar(utterances: list[dict], out: Path) -> None:
    """Lhotse's own route from `sources()`: Recording.from_file (a header probe), then to_shar (re-encodes FLAC)."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    recordings, supervisions = [], []
    for s in utterances:
        recording = Recording.from_file(s["path"], recording_id=s["key"])
        recordings.append(recording)
        supervisions.append(SupervisionSegment(id=s["key"], recording_id=s["key"], start=0.0,
                                               duration=recording.duration, text=s["text"]))
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                                 supervisions=SupervisionSet.from_segments(supervisions))
    out.mkdir(parents=True)
    cuts.to_shar(out, fields={"recording": "flac"}, shard_size=1000)


def read_shar(folder: Path, featurizer: Featurizer, batch_seconds: float) -> Iterator[np.ndarray]:
    """Lhotse's own batching: DynamicCutSampler (it budgets total, not padded, duration: a little kinder)."""
    from lhotse import CutSet
    from lhotse.dataset import DynamicCutSampler

    cuts = CutSet.from_shar(in_dir=folder)
    for batch in DynamicCutSampler(cuts, max_duration=batch_seconds, shuffle=False):
        yield pad([featurizer.from_samples(c.load_audio().T, c.sampling_rate) for c in batch])


# -- LitData ---------------------------------------------------------------------------

def write_litdata(fn: Callable[[dict], dict], inputs: list, out: Path, workers: int, chunk_bytes: int) -> None:
    """LitData's `optimize`: `fn` runs on each input in `workers` processes, its samples go into chunks."""
    from litdata import optimize

    optimize(fn=fn, inputs=inputs, output_dir=str(out), num_workers=workers, chunk_bytes=chunk_bytes,
             mode="overwrite")


class LitDataSamples:
    """LitData's StreamingDataset, made in this process and handed to the workers, as LitData's docs do."""

    def __init__(self, folder: Path):
        from litdata import StreamingDataset

        self.dataset = StreamingDataset(str(folder))

    def __call__(self) -> Iterator[tuple[bytes, float]]:
        return ((s["flac"], s["duration"]) for s in self.dataset)


# -- MosaicML Streaming (MDS) ------------------------------------------------------------

def write_mosaic(samples: Iterable[dict], out: Path, shard_bytes: int) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns=FIELDS, size_limit=shard_bytes) as sink:
        for s in samples:
            sink.write(s)


class MosaicSamples:
    """Mosaic's StreamingDataset over a local folder, made in this process and handed to the workers."""

    def __init__(self, folder: Path):
        from streaming import StreamingDataset

        self.dataset = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)

    def __call__(self) -> Iterator[tuple[bytes, float]]:
        return ((s["flac"], s["duration"]) for s in self.dataset)
