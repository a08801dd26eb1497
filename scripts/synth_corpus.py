"""Synthetic speech corpora with known transcripts, spoken by espeak-ng and encoded by sox.

    python -m scripts.synth_corpus OUT --utterances 200 [--voices en-us,en-gb] [--seed 0] [--workers 2]

writes a LibriSpeech-layout tree: OUT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac
with OUT/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt. Each voice is one speaker.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp+m3", "en+f2")
WORDS = (
    "the a one two three four five six seven eight nine ten red green blue black white small "
    "large old new good bad cold warm fast slow early late open closed river mountain garden "
    "window table paper letter market station morning evening winter summer water bread "
    "music picture doctor teacher farmer sister brother mother father friend people city "
    "village road bridge ship train horse bird fish tree flower stone light fire cloud rain "
    "snow wind sun moon star house room door floor wall chair book story song voice word "
    "walks runs reads writes sings opens closes finds brings takes gives keeps makes sees "
    "hears knows thinks likes wants needs helps calls asks answers waits stays leaves comes "
    "goes sits stands sleeps wakes carries pulls pushes builds paints cleans cooks eats "
    "drinks quickly slowly quietly loudly today tomorrow yesterday here there always never "
    "often again together alone near far under over behind before after with without"
).split()


@dataclass(frozen=True)
class Utterance:
    key: str
    speaker: str
    voice: str
    text: str  # lowercase, as espeak-ng should be given it
    path: Path


def sentences(count: int, seed: int, min_words: int = 3, max_words: int = 12) -> list[str]:
    """Returns `count` distinct pseudo-random lowercase sentences, deterministic in `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < count:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def check_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"synth_corpus: {', '.join(missing)} not found; run 'make setup'")


def speak(text: str, voice: str, out: Path, sample_rate: int = 16000,
          speed_wpm: int = 160, pitch: int = 50, channels: int = 1) -> None:
    """Writes `text` spoken by espeak-ng `voice` to `out`, encoded by sox from its suffix."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-p", str(pitch),
                          "--stdout", text.lower()], check=True, capture_output=True).stdout
    subprocess.run(["sox", "-q", "-t", "wav", "-", "-r", str(sample_rate), "-c", str(channels), "-b", "16",
                    str(out)], input=wav, check=True, capture_output=True)


def librispeech_tree(root: Path, count: int, voices: tuple[str, ...] = DEFAULT_VOICES,
                     seed: int = 0, per_chapter: int = 50, workers: int = 2,
                     ext: str = "flac") -> list[Utterance]:
    """Writes a LibriSpeech-layout corpus of `count` utterances under `root` and returns them.

    Speaker s (voice s) reads chapters of up to `per_chapter` utterances; speed and
    pitch vary per utterance, so no two recordings of a voice sound alike.
    """
    check_tools()
    utterances = []
    for i, text in enumerate(sentences(count, seed)):
        s = i % len(voices)
        speaker = str(100 + s)
        chapter = str(1000 + (i // len(voices)) // per_chapter)
        n = (i // len(voices)) % per_chapter
        key = f"{speaker}-{chapter}-{n:04d}"
        folder = root / speaker / chapter
        utterances.append(Utterance(key, speaker, voices[s], text, folder / f"{key}.{ext}"))
    for u in utterances:
        u.path.parent.mkdir(parents=True, exist_ok=True)

    def one(u: Utterance) -> None:
        speak(u.text, u.voice, u.path, speed_wpm=rng_for(u).randint(140, 190),
              pitch=rng_for(u).randint(35, 65))

    def rng_for(u: Utterance) -> random.Random:
        return random.Random(f"{seed}-{u.key}")

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, utterances))
    by_chapter: dict[Path, list[Utterance]] = {}
    for u in utterances:
        by_chapter.setdefault(u.path.parent, []).append(u)
    for folder, group in by_chapter.items():
        speaker, chapter = folder.parent.name, folder.name
        lines = [f"{u.key} {u.text.upper()}\n" for u in group]
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return utterances


def noise_tree(root: Path, voices: tuple[str, ...], seed: int = 0, babbles: int = 4) -> Path:
    """Writes a LibriSpeech-layout noise corpus under `root` (a transcript "NOISE" each) and returns `root`.

    Speaker 900 holds sox's white, pink and brown noise, 6 s each, twice at other volumes; speaker
    901 holds babble: four sentences by four of `voices` spoken at once.
    """
    check_tools()
    rng = random.Random(seed)
    keys = []
    colours = root / "900" / "1"
    colours.mkdir(parents=True, exist_ok=True)
    for n, (colour, volume) in enumerate((c, v) for v in (0.3, 0.1) for c in ("whitenoise", "pinknoise",
                                                                             "brownnoise")):
        key = f"900-1-{n:04d}"
        subprocess.run(["sox", "-q", "-n", "-r", "16000", "-c", "1", "-b", "16", str(colours / f"{key}.flac"),
                        "synth", "6", colour, "vol", str(volume)], check=True, capture_output=True)
        keys.append((colours, key))
    babble = root / "901" / "1"
    babble.mkdir(parents=True, exist_ok=True)
    texts = sentences(4 * babbles, seed + 1000)
    for n in range(babbles):
        parts = []
        for j in range(4):
            part = babble / f"part-{n}-{j}.wav"
            speak(texts[4 * n + j], voices[rng.randrange(len(voices))], part, speed_wpm=rng.randint(140, 190))
            parts.append(str(part))
        key = f"901-1-{n:04d}"
        subprocess.run(["sox", "-q", "-m", *parts, str(babble / f"{key}.flac")], check=True, capture_output=True)
        for part in parts:
            Path(part).unlink()
        keys.append((babble, key))
    for folder in (colours, babble):
        speaker, chapter = folder.parent.name, folder.name
        (folder / f"{speaker}-{chapter}.trans.txt").write_text(
            "".join(f"{key} NOISE\n" for where, key in keys if where == folder))
    return root


def tones(folder: Path, count: int, min_s: float, max_s: float, seed: int = 0, rate: int = 16000) -> list[Path]:
    """Writes `count` FLACs of sine tones lasting min_s..max_s seconds; returns their paths."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        t = np.arange(int(rate * rng.uniform(min_s, max_s))) / rate
        path = folder / f"tone-{i:04d}.flac"
        sf.write(path, (0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t)).astype(np.float32), rate)
        paths.append(path)
    return paths


def linked_corpus(root: Path, count: int, layout: str, sources: list[Path], per_chapter: int = 5000) -> Path:
    """Writes a corpus of `count` utterances that are hard links to `sources` (cycled); returns the input to pack.

    `layout` "manifest" gives root/audio/NNN/KEY.flac and root/manifest.jsonl; "librispeech" gives a
    SPEAKER/CHAPTER tree with its transcripts. Links cost an inode each and no data, so a million files fit
    in a few hundred MB of disk (ext4 allows 65,000 links per inode: keep count / len(sources) below that).
    """
    import json

    texts = sentences(len(sources), seed=len(sources))
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.jsonl"
    with manifest.open("w") as m:
        transcripts = None
        for i in range(count):
            speaker, chapter, n = 1000 + i // (per_chapter * 10), 10 * (i // per_chapter), i % per_chapter
            folder = root / ("audio" if layout == "manifest" else "") / str(speaker) / str(chapter)
            key = f"{speaker}-{chapter}-{n:04d}"
            if n == 0:
                folder.mkdir(parents=True, exist_ok=True)
                if transcripts:
                    transcripts.close()
                transcripts = (folder / f"{speaker}-{chapter}.trans.txt").open("w") if layout != "manifest" else None
            (folder / f"{key}.flac").hardlink_to(sources[i % len(sources)])
            text = texts[i % len(sources)]
            if transcripts:
                transcripts.write(f"{key} {text.upper()}\n")
            else:
                m.write(json.dumps({"audio_filepath": str((folder / f"{key}.flac").relative_to(root)),
                                    "text": text}) + "\n")
        if transcripts:
            transcripts.close()
    if layout != "manifest":
        manifest.unlink()
        return root
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic LibriSpeech-layout corpus with espeak-ng.")
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument("--voices", default=",".join(DEFAULT_VOICES),
                        help="comma-separated espeak-ng voices, one speaker each")
    parser.add_argument("--seed", type=int, default=0, help="picks the sentences")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", choices=["flac", "wav"], default="flac")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"synth_corpus: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    utts = librispeech_tree(args.out, args.utterances, tuple(args.voices.split(",")), args.seed,
                            workers=args.workers, ext=args.format)
    print(f"synth_corpus: wrote {len(utts)} utterances under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
