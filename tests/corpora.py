"""Tiny corpora for tests: espeak-ng speech in a LibriSpeech tree, plus one input of every bad kind.

`bad_librispeech(root)` returns what a correct pack must produce: the keys that
must be packed (with their source bytes and normalized transcripts) and, for
every bad input, where its quarantine record is and what its reason says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from scripts.synth_corpus import librispeech_tree, speak

VOICES = ("en-us", "en-gb", "en-us+f3")


@dataclass
class Expected:
    packed: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # key -> (audio bytes, transcript)
    # (needle, reason substring): some quarantine record has the needle in its source or reason
    quarantined: list[tuple[str, str]] = field(default_factory=list)


def good_librispeech(root: Path, count: int = 9, seed: int = 0) -> Expected:
    """Writes `count` espeak utterances (3 voices) and returns them as expected packed keys."""
    expected = Expected()
    for u in librispeech_tree(root, count, VOICES, seed=seed, per_chapter=2):
        expected.packed[u.key] = (u.path.read_bytes(), u.text.upper())
    return expected


def bad_librispeech(root: Path) -> Expected:
    """Writes good utterances plus one of each bad input the pack job must quarantine."""
    expected = good_librispeech(root, 6)
    chapter = root / "900" / "9000"
    chapter.mkdir(parents=True)
    good_flac = next(iter(expected.packed.values()))[0]
    lines = []

    def utterance(key: str, audio: bytes | None, transcript: bytes | None, reason: str | None,
                  source: str | None = None) -> None:
        if audio is not None:
            (chapter / f"{key}.flac").write_bytes(audio)
        if transcript is not None:
            lines.append(key.encode() + b" " + transcript)
        if reason:
            expected.quarantined.append((source or key, reason))

    utterance("900-9000-0000", good_flac[: len(good_flac) // 2], b"HALF A FILE", "truncated audio")
    utterance("900-9000-0001", b"", b"NOTHING AT ALL", "zero-byte audio")
    utterance("900-9000-0002", b"this is a text file, not sound\n" * 20, b"NOT SOUND", "not audio")
    utterance("900-9000-0003", None, b"NO AUDIO FOR THIS LINE", "transcript line with no audio")
    utterance("900-9000-0004", good_flac, None, "audio with no transcript line")
    utterance("900-9000-0005", good_flac, b"   ", "empty transcript")
    utterance("900-9000-0006", good_flac, b"CAF\xe9 IN LATIN-1", "not valid UTF-8",
              source="900-9000.trans.txt:6")
    # A second transcript line for a key already given one: the first is packed.
    stereo = chapter / "900-9000-0007.wav"
    speak("a stereo recording at forty four point one kilohertz", "en-us", stereo,
          sample_rate=44100, channels=2)
    utterance("900-9000-0007", None, b"A stereo   recording at forty four point one kilohertz", None)
    expected.packed["900-9000-0007"] = (stereo.read_bytes(),
                                        "A STEREO RECORDING AT FORTY FOUR POINT ONE KILOHERTZ")
    lines.append(b"900-9000-0007 A DUPLICATE LINE FOR THE SAME KEY")
    expected.quarantined.append(("900-9000.trans.txt:8", "duplicate key"))
    (chapter / "900-9000.trans.txt").write_bytes(b"\n".join(lines) + b"\n")
    # The same key as a packed utterance, in another chapter: the first in path order wins.
    first_key = sorted(expected.packed)[0]
    dup_dir = root / "999" / "9999"
    dup_dir.mkdir(parents=True)
    (dup_dir / f"{first_key}.flac").write_bytes(good_flac)
    (dup_dir / "999-9999.trans.txt").write_text(f"{first_key} A DUPLICATE\n")
    expected.quarantined.append((f"999/9999/{first_key}.flac", "duplicate key"))
    expected.quarantined.append(("999-9999.trans.txt:1", "duplicate key"))
    return expected


def ds2_manifest(root: Path, expected: Expected) -> Path:
    """Writes a DS2 JSON-lines manifest over a good LibriSpeech tree (relative paths)."""
    manifest = root / "manifest.jsonl"
    with manifest.open("w") as f:
        for p in sorted(root.rglob("*.flac")):
            key = p.stem
            if key in expected.packed:
                f.write(json.dumps({"audio_filepath": str(p.relative_to(root)),
                                    "text": expected.packed[key][1].lower(), "duration": 1.0}) + "\n")
    return manifest


def kaldi_folder(root: Path, expected: Expected) -> Path:
    """Writes a Kaldi data folder (wav.scp with absolute paths, text) over a good tree."""
    folder = root / "kaldi"
    folder.mkdir()
    keys = sorted(expected.packed)
    paths = {p.stem: p for p in root.rglob("*.flac")}
    (folder / "wav.scp").write_text("".join(f"{k} {paths[k]}\n" for k in keys))
    (folder / "text").write_text("".join(f"{k} {expected.packed[k][1]}\n" for k in keys))
    return folder
