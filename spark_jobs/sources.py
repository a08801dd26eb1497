"""Input corpora: LibriSpeech trees, DS2 JSON-lines manifests and Kaldi lists, read into utterance candidates.

`discover(uri)` returns the candidates (key, audio URI, normalized transcript,
speaker, input order) and the rejects found without opening any audio: bad
transcript lines, transcripts without audio, audio without transcripts,
duplicate keys. Audio itself is checked later, in Spark (spark_jobs.packing).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

from pyarrow import fs as pafs

from hdfs_io.filesystem import probe_uri, uri_base

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".sph")
TRANS_SUFFIX = ".trans.txt"
_SPACES = re.compile(r"\s+")


class InputError(ValueError):
    """The input cannot be used at all (missing, unknown layout); the message says why."""


@dataclass(frozen=True)
class Candidate:
    order: int  # position in input order; the first of duplicate keys wins
    key: str
    uri: str
    transcript: str
    speaker: str


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str


@dataclass
class Discovery:
    kind: str
    candidates: list[Candidate] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def normalize_transcript(text: str) -> str:
    """Returns the transcript upper-cased with runs of whitespace collapsed to one space."""
    return _SPACES.sub(" ", text).strip().upper()


def discover(uri: str) -> Discovery:
    """Returns the candidates and rejects of the corpus at `uri`.

    A file is a DS2 JSON-lines manifest; a folder with `wav.scp` and `text` is a
    Kaldi data folder; any other folder is a LibriSpeech tree found by its
    `*.trans.txt` files.

    Raises:
        InputError: the input does not exist or has no recognizable layout.
        hdfs_io.filesystem.FilesystemUnavailable: its filesystem cannot be reached.
    """
    fs, path, info = probe_uri(uri)
    base = uri_base(uri)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        return read_manifest(fs, path, base)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    if {"wav.scp", "text"} <= names:
        return read_kaldi(fs, path, base)
    return read_librispeech(fs, path, base)


def read_librispeech(fs: pafs.FileSystem, root: str, base: str) -> Discovery:
    """Reads a SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.<ext> tree with SPEAKER-CHAPTER.trans.txt files."""
    files = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                    if i.type == pafs.FileType.File))
    trans_files = [p for p in files if p.endswith(TRANS_SUFFIX)]
    if not trans_files:
        raise InputError(f"no *{TRANS_SUFFIX} files under {base}{root}: not a LibriSpeech-layout tree, "
                         "a Kaldi folder (wav.scp + text) or a JSON-lines manifest")
    found = Discovery("librispeech")
    chapter_dirs = {posixpath.dirname(p) for p in trans_files}
    transcripts: dict[str, tuple[str, str]] = {}  # key -> (text, source)
    for trans in trans_files:
        with fs.open_input_stream(trans) as f:
            data = f.read()
        for key, text, source in parse_keyed_lines(data, f"{base}{trans}", found.rejects):
            add_transcript(transcripts, key, text, source, found.rejects)
    audio: dict[str, str] = {}  # key -> path, first in sorted order
    for p in files:
        if p.endswith(TRANS_SUFFIX):
            continue
        name = posixpath.basename(p)
        stem, ext = posixpath.splitext(name)
        if ext.lower() not in AUDIO_EXTENSIONS:
            if posixpath.dirname(p) in chapter_dirs:
                found.rejects.append(Reject(f"{base}{p}", "not an audio file name (unknown extension)"))
            continue
        if stem in audio:
            found.rejects.append(Reject(f"{base}{p}", f"duplicate key: {stem!r} first seen at {base}{audio[stem]}"))
            continue
        audio[stem] = p
    join(found, transcripts, {k: f"{base}{p}" for k, p in audio.items()},
         lambda key, uri: posixpath.basename(posixpath.dirname(posixpath.dirname(urlparse(uri).path))))
    return found


def read_manifest(fs: pafs.FileSystem, path: str, base: str) -> Discovery:
    """Reads a DS2 JSON-lines manifest: {"audio_filepath", "text", optional "duration", "speaker"}."""
    found = Discovery("manifest")
    folder = posixpath.dirname(path)
    seen: set[str] = set()
    with fs.open_input_stream(path) as f:
        data = f.read()
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        source = f"{base}{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            found.rejects.append(Reject(source, "manifest line is not valid JSON"))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("audio_filepath"), str) \
                or not isinstance(entry.get("text"), str):
            found.rejects.append(Reject(source, "manifest line needs string fields 'audio_filepath' and 'text'"))
            continue
        audio_path = entry["audio_filepath"]
        if not audio_path:
            found.rejects.append(Reject(source, "manifest line has an empty 'audio_filepath'"))
            continue
        text = normalize_transcript(entry["text"])
        key = posixpath.splitext(audio_path)[0]
        if not text:
            found.rejects.append(Reject(source, f"empty transcript: {key!r}"))
            continue
        if key in seen:
            found.rejects.append(Reject(source, f"duplicate key: {key!r}"))
            continue
        uri = audio_path if urlparse(audio_path).scheme else f"{base}{posixpath.join(folder, audio_path)}"
        speaker = entry.get("speaker")
        speaker = str(speaker) if speaker is not None else posixpath.basename(posixpath.dirname(urlparse(uri).path))
        found.candidates.append(Candidate(len(found.candidates), key, uri, text, speaker))
        seen.add(key)
    return found


def read_kaldi(fs: pafs.FileSystem, folder: str, base: str) -> Discovery:
    """Reads a Kaldi data folder: wav.scp (KEY PATH), text (KEY TRANSCRIPT), optional utt2spk."""
    found = Discovery("kaldi")

    def lines(name: str) -> bytes:
        with fs.open_input_stream(posixpath.join(folder, name)) as f:
            return f.read()

    transcripts: dict[str, tuple[str, str]] = {}
    for key, text, source in parse_keyed_lines(lines("text"), f"{base}{folder}/text", found.rejects):
        add_transcript(transcripts, key, text, source, found.rejects)
    audio: dict[str, str] = {}
    for key, where, source in parse_keyed_lines(lines("wav.scp"), f"{base}{folder}/wav.scp", found.rejects,
                                                allow_empty=False):
        if where.endswith("|"):
            found.rejects.append(Reject(source, f"piped wav.scp entry not supported: {key!r}; "
                                                "write the audio to files first"))
        elif key in audio:
            found.rejects.append(Reject(source, f"duplicate key: {key!r}"))
        else:
            audio[key] = where if urlparse(where).scheme else f"{base}{posixpath.join(folder, where)}"
    speakers: dict[str, str] = {}
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(folder))}
    if "utt2spk" in names:
        for key, spk, _ in parse_keyed_lines(lines("utt2spk"), f"{base}{folder}/utt2spk", found.rejects):
            speakers.setdefault(key, spk)
    join(found, transcripts, audio, lambda key, uri: speakers.get(key, key.split("-")[0]))
    return found


def parse_keyed_lines(data: bytes, source: str, rejects: list[Reject],
                      allow_empty: bool = True) -> list[tuple[str, str, str]]:
    """Returns `(key, rest, source:line)` for each `KEY REST` line; bad lines go to `rejects`."""
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{source}:{lineno}"
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            rejects.append(Reject(where, "line is not valid UTF-8"))
            continue
        key, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if not rest and not allow_empty:
            rejects.append(Reject(where, f"line has no value: key {key!r}"))
            continue
        out.append((key, rest, where))
    return out


def add_transcript(transcripts: dict[str, tuple[str, str]], key: str, text: str, source: str,
                   rejects: list[Reject]) -> None:
    if key in transcripts:
        rejects.append(Reject(source, f"duplicate key: {key!r} first seen at {transcripts[key][1]}"))
        return
    transcripts[key] = (normalize_transcript(text), source)


def join(found: Discovery, transcripts: dict[str, tuple[str, str]], audio: dict[str, str], speaker_of) -> None:
    """Pairs transcripts with audio by key, in audio input order; the unpaired become rejects."""
    for key, uri in audio.items():
        if key not in transcripts:
            found.rejects.append(Reject(uri, "audio with no transcript line"))
            continue
        text, source = transcripts[key]
        if not text:
            found.rejects.append(Reject(uri, f"empty transcript: at {source}"))
            continue
        found.candidates.append(Candidate(len(found.candidates), key, uri, text, speaker_of(key, uri)))
    for key, (_, source) in transcripts.items():
        if key not in audio:
            found.rejects.append(Reject(source, f"transcript line with no audio: {key!r}"))
