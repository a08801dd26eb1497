"""Input corpora: LibriSpeech trees, DS2 JSON-lines manifests and Kaldi lists, read into utterance entries.

Reading a corpus is two steps, both on plain iterators so Spark can run them as
tasks (spark_jobs.pack_stages) and tests can run them on lists:
  1. `*_entries` turn lines and file listings into entries: audio files,
     transcript lines, speakers, manifest lines (audio and transcript together),
     and rejects found without opening any audio (bad lines, unknown files,
     names that pack cannot open: see `unreadable`).
  2. `resolve` takes the entries of one key at a time, in input order, and
     returns a candidate (key, audio URI, normalized transcript, speaker) or
     rejects: duplicate keys (the first in input order wins), audio without
     transcript, transcript without audio, empty transcripts.
Audio itself is checked later, in Spark (spark_jobs.packing).

`discover(uri)` does both in this process, for tests and small inputs.
"""

from __future__ import annotations

import itertools
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlparse, urlsplit

from pyarrow import fs as pafs

from hdfs_io.format import dataset_format as F
from hdfs_io.fs.filesystem import first_line, hdfs_user, is_unicode, printable, probe_uri, uri_base

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".sph")
TRANS_SUFFIX = ".trans.txt"
KALDI_FILES = ("wav.scp", "text", "utt2spk")
KALDI_SEGMENTS = "segments"
# Kaldi ends a key at the first of these (SplitStringOnFirstSpace); other Unicode spaces belong to the key.
KALDI_SPACES = " \t\r\f\v"
_KALDI_SPACE_RUN = re.compile(f"[{KALDI_SPACES}]+")
_SPACES = re.compile(r"\s+")
BOM = "\ufeff".encode()  # a UTF-8 byte order mark, which some editors put before a text file's first line
# What pack reads audio from (hdfs_io.fs.filesystem.open_filesystem); a URI with another scheme is rejected.
URI_SCHEMES = ("hdfs", "file")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?")
_NOT_IN_URI_PATHS = "#?\t\r\n"

# Entry fields besides the format's own (F.KEY, F.TRANSCRIPT, F.SPEAKER, F.SOURCE, F.REASON).
KIND = "kind"
ORDER = "order"  # a string that sorts in input order: the first of duplicate keys wins
URI = "uri"
ENTRY_FIELDS = (KIND, ORDER, F.KEY, URI, F.TRANSCRIPT, F.SPEAKER, F.SOURCE, F.REASON)

# Entry kinds.
AUDIO = "audio"  # an audio file of a list-based corpus (LibriSpeech, Kaldi wav.scp)
TEXT = "text"  # a transcript line of a list-based corpus
SPEAKER = "speaker"  # a Kaldi utt2spk line
PAIR = "pair"  # a manifest line: audio and transcript together
TRANS_FILE = "trans_file"  # a LibriSpeech *.trans.txt was found (proves the layout; not an utterance)
REJECT = "reject"
CANDIDATE = "candidate"


class InputError(ValueError):
    """The input cannot be used at all (missing, unknown layout); the message says why."""


@dataclass(frozen=True)
class Candidate:
    order: str
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


def entry(kind: str, order: str = "", key: str | None = None, uri: str | None = None, transcript: str | None = None,
          speaker: str | None = None, source: str | None = None, reason: str | None = None) -> dict:
    return {KIND: kind, ORDER: order, F.KEY: key, URI: uri, F.TRANSCRIPT: transcript, F.SPEAKER: speaker,
            F.SOURCE: source, F.REASON: reason}


def reject(source: str, reason: str, order: str = "") -> dict:
    return entry(REJECT, order, source=source, reason=reason)


# ---- audio URIs, and what their names alone say pack cannot read

def audio_uri(value: str, folder: str, base: str) -> str:
    """Returns the URI of the audio a list names by `value`: a URI as it is, else a path relative to `folder`
    on the filesystem of `base` (hdfs_io.fs.filesystem.uri_base).

    A value is a URI where it starts with `scheme://`, `hdfs:` or `file:`; a relative file
    name may hold a colon (`u:1.flac`).
    """
    found = _SCHEME.match(value)
    if found and (found.group(2) or found.group(1).lower() in URI_SCHEMES):
        return value
    return f"{base}{posixpath.join(folder, value)}"


def unreadable(uri: str) -> str | None:
    """Returns why pack cannot read the audio at `uri`, as its name alone shows, or None if it may.

    hdfs_io.fs.filesystem.open_filesystem takes a plain local path whole, but splits a URI
    with a scheme by RFC 3986 (urllib.parse), which ends its path at the first `#` or `?`
    and drops tabs and line breaks: such a file would be looked for under another name.
    """
    found = _SCHEME.match(uri)
    if not found:
        return None
    scheme = found.group(1).lower()
    if scheme not in URI_SCHEMES:
        return f"unsupported URI scheme {scheme!r} (pack reads hdfs://, file:// and local paths)"
    lost = next((c for c in uri if c in _NOT_IN_URI_PATHS), None)
    if lost:
        return f"pack opens this file by URI, and a URI's path cannot hold {lost!r} (rename it)"
    if scheme == "hdfs" and ":" in urlsplit(uri).path:
        return "HDFS allows no ':' in a file name"
    return None


# ---- the input's kind, decided on the driver from one listing

def input_kind(fs: pafs.FileSystem, path: str, info: pafs.FileInfo, base: str = "") -> str:
    """Returns "manifest" (a file), "kaldi" (a folder with wav.scp and text) or "librispeech" (any other folder).

    Raises:
        InputError: a Kaldi folder with a `segments` file. Its utterances are stretches of
            longer recordings, and a dataset stores each utterance's audio file whole.
    """
    if info.type == pafs.FileType.File:
        return "manifest"
    names = folder_names(fs, path)
    if not {"wav.scp", "text"} <= names:
        return "librispeech"
    if KALDI_SEGMENTS in names:
        raise InputError(f"{base}{posixpath.join(path, KALDI_SEGMENTS)}: this Kaldi folder's utterances are segments "
                         "of longer recordings, and pack stores whole audio files; cut the recordings into one "
                         "file per utterance first (sox, or Kaldi's extract-segments) and list those files in "
                         "wav.scp, without segments")
    return "kaldi"


# ---- lines of text files, read in byte ranges so that many tasks can share one large file

def byte_ranges(size: int, range_bytes: int) -> list[tuple[int, int]]:
    """Returns [start, end) ranges of at most `range_bytes` covering `size` bytes (none for an empty file)."""
    return [(start, min(start + range_bytes, size)) for start in range(0, size, max(range_bytes, 1))]


def count_lines(fs: pafs.FileSystem, path: str, start: int, end: int, block: int = 1 << 22) -> int:
    """Returns how many lines start in [start, end): the lines `lines_in_range` yields for that range."""
    if end <= start:
        return 0
    count = 1 if start == 0 else 0
    with fs.open_input_file(path) as f:  # a line starts after each newline at positions start-1 .. end-2
        pos = max(start - 1, 0)
        f.seek(pos)
        while pos < end - 1:
            data = f.read(min(block, end - 1 - pos))
            if not data:
                break
            count += data.count(b"\n")
            pos += len(data)
    return count


def lines_in_range(fs: pafs.FileSystem, path: str, start: int, end: int,
                   block: int = 1 << 22) -> Iterator[tuple[int, bytes]]:
    """Yields `(offset, line)` for each line that starts in [start, end), without its newline.

    A line that starts in the range is read to its end, past `end` if need be, so
    the ranges of `byte_ranges` together yield every line of the file once.
    """
    with fs.open_input_file(path) as f:
        size = f.size()
        end = min(end, size)
        if start >= end:
            return
        buf_at = start - 1 if start else 0  # file offset of buf[0]
        f.seek(buf_at)
        buf, p = f.read(block), 0
        if start:  # the first line starts after the first newline at or after start - 1
            while (i := buf.find(b"\n", p)) < 0:
                more = f.read(block)
                if not more:
                    return
                buf_at, buf, p = buf_at + len(buf), more, 0
            p = i + 1
        while buf_at + p < end:
            i = buf.find(b"\n", p)
            while i < 0:  # the line goes on past this block
                more = f.read(block)
                if not more:
                    break
                buf_at, buf, p = buf_at + p, buf[p:] + more, 0
                i = buf.find(b"\n", p)
            if i < 0:  # the last line, with no newline after it
                if p < len(buf):
                    yield buf_at + p, buf[p:]
                return
            yield buf_at + p, buf[p:i]
            p = i + 1
            if p >= len(buf):
                more = f.read(block)
                if not more:
                    return
                buf_at, buf, p = buf_at + len(buf), more, 0


def numbered(lines: Iterable[tuple[int, bytes]], first_lineno: int) -> Iterator[tuple[int, int, bytes]]:
    """Yields `(offset, lineno, line)`, numbering lines from `first_lineno`."""
    for lineno, (offset, raw) in enumerate(lines, first_lineno):
        yield offset, lineno, raw


def order_of(offset: int, prefix: str = "") -> str:
    return f"{prefix}{offset:016d}"


def without_bom(lineno: int, raw: bytes) -> bytes:
    """Returns a text file's line without the byte order mark that may open line 1."""
    return raw.removeprefix(BOM) if lineno == 1 else raw


# ---- entries: manifests

def manifest_entries(lines: Iterable[tuple[int, int, bytes]], path: str, base: str) -> Iterator[dict]:
    """Yields a PAIR or a REJECT for every DS2 JSON-lines manifest line that says something.

    A line is {"audio_filepath", "text", optional "speaker"}; the key is the audio
    path without its extension; relative paths are relative to the manifest.
    """
    folder = posixpath.dirname(path)
    for offset, lineno, raw in lines:
        source, order = f"{base}{path}:{lineno}", order_of(offset)
        raw = without_bom(lineno, raw)
        if not raw.strip():
            continue
        try:
            fields = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            yield reject(source, "manifest line is not valid JSON", order)
            continue
        if not isinstance(fields, dict) or not isinstance(fields.get("audio_filepath"), str) \
                or not isinstance(fields.get("text"), str):
            yield reject(source, "manifest line needs string fields 'audio_filepath' and 'text'", order)
            continue
        audio_path = fields["audio_filepath"]
        if not audio_path:
            yield reject(source, "manifest line has an empty 'audio_filepath'", order)
            continue
        speaker = fields.get("speaker")
        values = {"audio_filepath": audio_path, "text": fields["text"], "speaker": str(speaker)}
        bad = next((name for name, value in values.items() if not is_unicode(value)), None)
        if bad:  # Arrow, and the dataset, hold UTF-8 only
            yield reject(source, f"manifest line has a lone surrogate (not Unicode text) in {bad!r}", order)
            continue
        text = normalize_transcript(fields["text"])
        key = posixpath.splitext(audio_path)[0]
        if not text:
            yield reject(source, f"empty transcript: {key!r}", order)
            continue
        uri = audio_uri(audio_path, folder, base)
        problem = unreadable(uri)
        if problem:
            yield reject(source, f"{problem}: {audio_path!r}", order)
            continue
        speaker = str(speaker) if speaker is not None else posixpath.basename(posixpath.dirname(urlparse(uri).path))
        yield entry(PAIR, order, key, uri, text, speaker, source)


# ---- entries: KEY VALUE lines (Kaldi lists, LibriSpeech transcripts)

def keyed_lines(lines: Iterable[tuple[int, int, bytes]], source: str,
                allow_empty: bool = True) -> Iterator[tuple[int, str, str, str] | dict]:
    """Yields `(offset, key, rest, source:line)` for each `KEY REST` line, or a REJECT for a bad line.

    As in Kaldi, the key ends at the first run of spaces or tabs (KALDI_SPACES), and a
    byte order mark before line 1 is not part of it.
    """
    for offset, lineno, raw in lines:
        where = f"{source}:{lineno}"
        raw = without_bom(lineno, raw).rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield reject(where, "line is not valid UTF-8")
            continue
        key, *rest = _KALDI_SPACE_RUN.split(line.strip(KALDI_SPACES), maxsplit=1)
        rest = rest[0] if rest else ""
        if not rest and not allow_empty:
            yield reject(where, f"line has no value: key {key!r}")
            continue
        yield offset, key, rest, where


def kaldi_entries(lines: Iterable[tuple[int, int, bytes]], name: str, folder: str, base: str) -> Iterator[dict]:
    """Yields the entries of one Kaldi list: `name` is "wav.scp" (AUDIO), "text" (TEXT) or "utt2spk" (SPEAKER)."""
    prefix = f"{KALDI_FILES.index(name)}:"
    for item in keyed_lines(lines, f"{base}{folder}/{name}", allow_empty=name != "wav.scp"):
        if isinstance(item, dict):
            yield item
            continue
        offset, key, rest, where = item
        order = order_of(offset, prefix)
        if name == "text":
            yield entry(TEXT, order, key, transcript=normalize_transcript(rest), source=where)
        elif name == "utt2spk":
            yield entry(SPEAKER, order, key, speaker=rest, source=where)
        elif rest.endswith("|"):
            yield reject(where, f"piped wav.scp entry not supported: {key!r}; write the audio to files first", order)
        else:
            uri = audio_uri(rest, folder, base)
            problem = unreadable(uri)
            if problem:
                yield reject(where, f"{problem}: {rest!r}", order)
            else:
                yield entry(AUDIO, order, key, uri, source=uri)


# ---- entries: LibriSpeech trees

def tree_entries(fs: pafs.FileSystem, files: Iterable[str], base: str) -> Iterator[dict]:
    """Yields the entries of a LibriSpeech tree's files: every file of any folder it names must be in `files`.

    SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt gives TEXT entries, any file with an
    audio extension an AUDIO entry keyed by its name; another file in a folder
    that holds a transcript is rejected, and so is any file whose path is not
    UTF-8 (a local name, given with surrogate escapes: see `folder_entries`).
    """
    files = sorted(files)
    chapters = {posixpath.dirname(p) for p in files if p.endswith(TRANS_SUFFIX)}
    for path in files:
        uri = f"{base}{path}"
        if not is_unicode(path):
            yield reject(printable(uri), "file name is not valid UTF-8; rename it", printable(path))
            continue
        if path.endswith(TRANS_SUFFIX):
            yield entry(TRANS_FILE, path, source=uri)
            try:
                with fs.open_input_stream(path) as f:
                    data = f.read()
            except OSError as e:
                yield reject(uri, f"cannot read transcript file: {first_line(e)}", path)
                continue
            lines = ((lineno, lineno, raw) for lineno, raw in enumerate(data.split(b"\n"), 1))
            for item in keyed_lines(lines, uri):
                if isinstance(item, dict):
                    yield item
                else:
                    lineno, key, rest, where = item
                    yield entry(TEXT, f"{path}\x00{lineno:012d}", key, transcript=normalize_transcript(rest),
                                source=where)
            continue
        stem, ext = posixpath.splitext(posixpath.basename(path))
        if ext.lower() in AUDIO_EXTENSIONS:
            speaker = posixpath.basename(posixpath.dirname(posixpath.dirname(path)))
            problem = unreadable(uri)
            yield reject(uri, problem, path) if problem else entry(AUDIO, path, stem, uri, speaker=speaker,
                                                                   source=uri)
        elif posixpath.dirname(path) in chapters:
            yield reject(uri, "not an audio file name (unknown extension)", path)


def folder_entries(fs: pafs.FileSystem, folder: str) -> Iterator[tuple[str, bool]]:
    """Yields `(path, is_folder)` for each entry of `folder`.

    pyarrow fails a whole local listing on one name that is not UTF-8, so local
    folders are read with os.scandir, which gives such a name with surrogate escapes
    (as os.fsdecode does). A link counts as what it points to, as in pyarrow, except
    a link to a folder its own path goes through: all under it is listed already,
    and following it would list the same folders round and round.
    """
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            with os.scandir(folder) as found:
                for e in found:
                    path, is_folder = posixpath.join(folder, e.name), e.is_dir()
                    if not (is_folder and e.is_symlink() and links_back(path)):
                        yield path, is_folder
            return
        infos = fs.get_file_info(pafs.FileSelector(folder))
    except PermissionError:
        raise listing_denied(folder) from None
    for info in infos:
        yield info.path, info.type == pafs.FileType.Directory


def links_back(link: str) -> bool:
    """Returns True if the local folder link `link` points to a folder that its own path goes through."""
    target, parent = os.path.realpath(link), posixpath.dirname(link)
    while True:
        if os.path.realpath(parent) == target:
            return True
        if posixpath.dirname(parent) == parent:
            return False
        parent = posixpath.dirname(parent)


def folder_names(fs: pafs.FileSystem, folder: str) -> set[str]:
    """Returns the names in `folder`, files and folders."""
    return {posixpath.basename(path) for path, _ in folder_entries(fs, folder)}


def listing_denied(folder: str) -> PermissionError:
    """Returns the error for a folder the storage refuses to list to this user, naming both."""
    return PermissionError(f"permission denied: user {hdfs_user()} may not list {printable(folder)}")


def list_tree(fs: pafs.FileSystem, folder: str, recursive: bool = True) -> list[str]:
    """Returns the paths of the files in `folder`, and if `recursive` in every folder below it."""
    if not isinstance(fs, pafs.LocalFileSystem):
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive))
        except PermissionError:
            raise listing_denied(folder) from None
        return [i.path for i in infos if i.type == pafs.FileType.File]
    files, folders = [], [folder]
    while folders:
        for path, is_folder in folder_entries(fs, folders.pop()):
            if not is_folder:
                files.append(path)
            elif recursive:
                folders.append(path)
    return files


def split_tree(fs: pafs.FileSystem, root: str, want: int) -> tuple[list[str], list[str]]:
    """Returns `(trees, folders)`: the tree at `root` cut, level by level, into at least `want` listings.

    Each of `trees` is listed whole by one task, each of `folders` alone (its files,
    not its subfolders); together they list every file under `root` once. The cut
    goes as deep as it must, so a tree under a chain of single folders
    (/corpora/LibriSpeech/train-960/SPEAKER/CHAPTER) still splits; a tree with fewer
    than `want` folders at every level is listed folder by folder (`trees` empty).
    This process lists one folder at a time and keeps folder names only.
    """
    level, folders = [root], []
    while level and len(level) < want:
        deeper = []
        for folder in level:
            has_files = False
            for path, is_folder in folder_entries(fs, folder):
                if is_folder:
                    deeper.append(path)
                else:
                    has_files = True
            if has_files:
                folders.append(folder)
        level = sorted(deeper)
    return level, folders


# ---- resolve: one key's entries, in input order, to a candidate and rejects

def resolve(entries: Iterable[dict]) -> Iterator[dict]:
    """Yields a CANDIDATE or REJECT for each key, from entries sorted by (key, order).

    REJECT and TRANS_FILE entries must be taken out before; nothing else is dropped.
    """
    for key, group in itertools.groupby(entries, key=lambda e: e[F.KEY]):
        by_kind: dict[str, list[dict]] = {}
        for e in group:
            by_kind.setdefault(e[KIND], []).append(e)
        yield from _resolve_key(key, by_kind)


def _resolve_key(key: str, by_kind: dict[str, list[dict]]) -> Iterator[dict]:
    for kind in (PAIR, AUDIO, TEXT):  # the first in input order wins, the rest are duplicates
        first, *rest = by_kind.get(kind) or [None]
        for e in rest:
            yield reject(e[F.SOURCE], f"duplicate key: {key!r} first seen at {first[F.SOURCE]}", e[ORDER])
    if PAIR in by_kind:
        first = by_kind[PAIR][0]
        yield dict(first, **{KIND: CANDIDATE, F.SOURCE: None})
        return
    audio, text = (by_kind.get(AUDIO) or [None])[0], (by_kind.get(TEXT) or [None])[0]
    if audio is None:
        if text is not None:
            yield reject(text[F.SOURCE], f"transcript line with no audio: {key!r}", text[ORDER])
        return
    if text is None:
        yield reject(audio[URI], "audio with no transcript line", audio[ORDER])
    elif not text[F.TRANSCRIPT]:
        yield reject(audio[URI], f"empty transcript: at {text[F.SOURCE]}", audio[ORDER])
    else:
        speaker = audio[F.SPEAKER] or (by_kind[SPEAKER][0][F.SPEAKER] if SPEAKER in by_kind else key.split("-")[0])
        yield entry(CANDIDATE, audio[ORDER], key, audio[URI], text[F.TRANSCRIPT], speaker)


# ---- the whole input in this process (tests, small inputs)

def discover(uri: str) -> Discovery:
    """Returns the candidates (in input order) and rejects of the corpus at `uri`, read in this process.

    Raises:
        InputError: the input does not exist or has no recognizable layout.
        hdfs_io.fs.filesystem.FilesystemUnavailable: its filesystem cannot be reached.
    """
    fs, path, info = probe_uri(uri)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist")
    kind = input_kind(fs, path, info, uri_base(uri))
    return {"manifest": read_manifest, "kaldi": read_kaldi, "librispeech": read_librispeech}[kind](
        fs, path, uri_base(uri))


def whole_file(fs: pafs.FileSystem, path: str) -> Iterator[tuple[int, int, bytes]]:
    with fs.open_input_file(path) as f:
        size = f.size()
    return numbered(lines_in_range(fs, path, 0, size), 1)


def read_manifest(fs: pafs.FileSystem, path: str, base: str) -> Discovery:
    """Reads a DS2 JSON-lines manifest: {"audio_filepath", "text", optional "duration", "speaker"}."""
    return resolved("manifest", manifest_entries(whole_file(fs, path), path, base))


def read_kaldi(fs: pafs.FileSystem, folder: str, base: str) -> Discovery:
    """Reads a Kaldi data folder: wav.scp (KEY PATH), text (KEY TRANSCRIPT), optional utt2spk."""
    names = folder_names(fs, folder)
    entries = itertools.chain.from_iterable(
        kaldi_entries(whole_file(fs, posixpath.join(folder, name)), name, folder, base)
        for name in KALDI_FILES if name in names)
    return resolved("kaldi", entries)


def read_librispeech(fs: pafs.FileSystem, root: str, base: str) -> Discovery:
    """Reads a SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.<ext> tree with SPEAKER-CHAPTER.trans.txt files."""
    entries = list(tree_entries(fs, list_tree(fs, root), base))
    if not any(e[KIND] == TRANS_FILE for e in entries):
        raise no_transcripts(f"{base}{root}")
    return resolved("librispeech", entries)


def no_transcripts(where: str) -> InputError:
    return InputError(f"no *{TRANS_SUFFIX} files under {where}: not a LibriSpeech-layout tree, "
                      "a Kaldi folder (wav.scp + text) or a JSON-lines manifest")


def resolved(kind: str, entries: Iterable[dict]) -> Discovery:
    found = Discovery(kind)
    keyed = []
    for e in entries:
        if e[KIND] == REJECT:
            found.rejects.append(Reject(e[F.SOURCE], e[F.REASON]))
        elif e[KIND] != TRANS_FILE:
            keyed.append(e)
    keyed.sort(key=lambda e: (e[F.KEY], e[ORDER]))
    out = list(resolve(keyed))
    for e in sorted(out, key=lambda e: e[ORDER]):
        if e[KIND] == CANDIDATE:
            found.candidates.append(Candidate(e[ORDER], e[F.KEY], e[URI], e[F.TRANSCRIPT], e[F.SPEAKER]))
        else:
            found.rejects.append(Reject(e[F.SOURCE], e[F.REASON]))
    return found
