"""Bad input, fuzzed with hypothesis: no traceback for a user's mistake, no input lost, nothing written outside.

Inputs: random bytes as audio, random transcript bytes, random manifest lines and
Kaldi lists, truncated and corrupted dataset.json / index.parquet / quarantine.jsonl,
and keys, file names and values holding `/`, `..`, spaces, tabs, `:` `#` `?`, control
characters, non-ASCII, byte order marks, lone surrogates and bytes that are not UTF-8.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import posixpath
import random
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyarrow import fs as pafs

from hdfs_io import inspect, plan, read
from hdfs_io.format import dataset_format as F
from hdfs_io.speech.audio import decode
from spark_jobs import pack_stages, sources
from spark_jobs.packing import probe_one
from tests.corpora import good_librispeech

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LINE_BYTES = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b""))
BOM = "\ufeff".encode()
SEPARATORS = st.sampled_from([b" ", b"\t", b"  ", b" \t", b"\t\t "])
# Text as JSON can carry it: any character, lone surrogates and the characters that mean something in paths.
ODD_TEXT = st.text(st.one_of(st.characters(exclude_categories=()),
                             st.sampled_from(["\ud800", "\udfff", "\ufeff", "\t", ":", "#", "?", "/"])), max_size=20)


def says_something(lineno: int, raw: bytes) -> bool:
    return bool(raw.removeprefix(BOM if lineno == 1 else b"").strip())


def fits_arrow(entries: list[dict]) -> bool:
    """Returns True if the entries pass between Spark tasks as the discover stage hands them on."""
    return len(pa.RecordBatch.from_pylist(entries, pack_stages.ENTRY)) == len(entries)


def opened_path(uri: str) -> str:
    """Returns the path hdfs_io.fs.filesystem.open_filesystem opens for `uri`."""
    return urlsplit(uri).path if urlsplit(uri).scheme in ("hdfs", "file") else uri


@pytest.fixture(scope="module")
def real_audio(tmp_path_factory) -> bytes:
    expected = good_librispeech(tmp_path_factory.mktemp("audio"), 1, seed=2)
    return next(iter(expected.packed.values()))[0]


def mutated(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    """Returns `data` truncated to a fraction `cut` of its length, with bytes XORed at fractional positions."""
    out = bytearray(data[: max(1, int(len(data) * cut))])
    for where, mask in flips if out else []:
        out[int(where * (len(out) - 1))] ^= mask
    return bytes(out)


@FUZZ
@given(st.one_of(st.binary(max_size=2048),
                 st.tuples(st.floats(0.0, 1.0), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)),
                                                         max_size=4))))
def test_the_probe_rejects_random_or_damaged_audio_with_a_reason_and_never_raises(real_audio, fuzz):
    data = fuzz if isinstance(fuzz, bytes) else mutated(real_audio, *fuzz)
    with tempfile.NamedTemporaryFile(suffix=".flac") as f:
        f.write(data)
        f.flush()

        probed = probe_one({"uri": f.name, "key": "k"})

    if probed["error"] is None:  # accepted audio must decode in the reader
        samples, rate = decode(data)
        assert len(samples) > 0 and rate > 0 and probed[F.DURATION_S] > 0
    else:
        assert probed["error"].strip() and "\n" not in probed["error"]


def tree_with_transcript(root: Path, audio: bytes, keys: list[str], transcript: bytes) -> Path:
    chapter = root / "1" / "2"
    chapter.mkdir(parents=True)
    for key in keys:
        (chapter / f"{key}.flac").write_bytes(audio)
    (chapter / "1-2.trans.txt").write_bytes(transcript)
    return chapter / "1-2.trans.txt"


KEYS = ["1-2-0000", "1-2-0001", "1-2-0002"]


ODD_FILE_NAMES = [b"caf\xe9", b"\xff\xfe", b"a#b", b"q?x", b"c:d", b"tab\there", b"sp ace", BOM + b"bom"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS + ["9-9-9999", "", "a#b", "q?x", "c:d", "sp"]), SEPARATORS,
                          LINE_BYTES), max_size=8),
       st.lists(st.sampled_from(ODD_FILE_NAMES), max_size=4, unique=True), st.booleans(),
       st.sampled_from(["", "hdfs://nn:8020"]))
def test_every_transcript_line_and_audio_file_is_a_candidate_or_a_reject(real_audio, lines, odd_names, bom, base):
    transcript = (BOM if bom else b"") + b"\n".join(k.encode() + sep + text for k, sep, text in lines)
    with tempfile.TemporaryDirectory() as tmp:
        trans = tree_with_transcript(Path(tmp), real_audio, KEYS, transcript)
        for folder, name in [(trans.parent, n) for n in odd_names] + [(tmp, b"root-" + n) for n in odd_names]:
            with open(os.fsencode(folder) + b"/" + name + b".flac", "wb") as f:
                f.write(real_audio)
        fs = pafs.LocalFileSystem()

        found = sources.read_librispeech(fs, tmp, base)
        whole = list(sources.tree_entries(fs, sources.list_tree(fs, tmp), ""))
        by_task = [list(pack_stages.tree_task(pack_stages.tree_items(fs, tmp, want), 0, fs_uri=tmp))
                   for want in (1, 3)]  # as the pack job lists the tree: whole, or split

    mentioned = " ".join(f"{r.source} {r.reason}" for r in found.rejects)
    packed = {c.key for c in found.candidates}
    for name in [k.encode() for k in KEYS] + odd_names + [b"root-" + n for n in odd_names]:  # every audio file
        assert name.decode("utf-8", "replace") in packed \
            or name.decode("utf-8", "backslashreplace") + ".flac" in mentioned, name
    for lineno, raw in enumerate(transcript.split(b"\n"), 1):  # every line that says something
        if says_something(lineno, raw):
            key = raw.removeprefix(BOM if lineno == 1 else b"").strip().split(maxsplit=1)[0]
            assert f"{trans}:{lineno}" in mentioned or key.decode("utf-8", "replace") in packed
    for c in found.candidates:  # a candidate's URI opens the file it was listed as, not a cut name
        assert opened_path(c.uri) in (f"{trans.parent}/{c.key}.flac", f"{tmp}/{c.key}.flac")
    for entries in by_task:
        assert fits_arrow(entries) and entry_set(entries) == entry_set(whole)


def entry_set(entries: list[dict]) -> list[tuple]:
    return sorted(tuple(e[f] or "" for f in sources.ENTRY_FIELDS) for e in entries)


WEIRD_NAMES = st.sampled_from(["a b", "..", "../up", "x/y", "caf\u00e9", "\u97f3\u58f0", "tab\there", "bell\x07",
                               "-dash", "new\nline", "", "u:1", "c:/x", "a#b", "q?x", "http://h/x", "hdfs://nn/h#x",
                               "sur\ud800", "\udcff", "\ufeffbom"])
MANIFEST_LINES = st.one_of(
    LINE_BYTES,
    st.builds(lambda name, text, extra, ascii_only: json.dumps(
        {"audio_filepath": name + ".flac", "text": text, **extra}, ensure_ascii=ascii_only).encode(
            "utf-8", "surrogatepass"),  # written raw, a lone surrogate is bytes that are not UTF-8
              WEIRD_NAMES, ODD_TEXT, st.dictionaries(st.sampled_from(["duration", "speaker"]),
                                                     st.one_of(st.none(), st.integers(), ODD_TEXT)), st.booleans()),
    st.builds(lambda v: json.dumps(v).encode(), st.one_of(st.none(), st.integers(), st.lists(st.integers()),
                                                          st.dictionaries(st.text(max_size=5), st.text(max_size=5)))),
)


@FUZZ
@given(st.lists(MANIFEST_LINES, max_size=10), st.booleans(), st.sampled_from(["", "hdfs://nn:8020"]))
def test_every_manifest_line_is_a_candidate_or_a_reject(lines, bom, base):
    data = (BOM if bom else b"") + b"\n".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.jsonl"
        manifest.write_bytes(data)

        found = sources.read_manifest(pafs.LocalFileSystem(), str(manifest), base)
        entries = list(sources.manifest_entries(sources.whole_file(pafs.LocalFileSystem(), str(manifest)),
                                                str(manifest), base))

    said = [n for n, raw in enumerate(data.split(b"\n"), 1) if says_something(n, raw)]
    rejected = [int(r.source.rsplit(":", 1)[1]) for r in found.rejects]
    assert len(found.candidates) + len(rejected) == len(said)
    assert len(set(rejected)) == len(rejected) and set(rejected) <= set(said)
    assert all(r.reason.strip() and "\n" not in r.reason for r in found.rejects)
    assert fits_arrow(entries)
    for c in found.candidates:  # a candidate's URI opens the file its line names, not a cut name
        named = json.loads(data[int(c.order):].split(b"\n")[0])["audio_filepath"]
        assert opened_path(c.uri) == posixpath.join(tmp, named)


KALDI_KEYS = st.sampled_from(["u1", "u2", "u3", "spk-1", "a#b", "c:d", "\u97f3", ""])
KALDI_VALUES = st.one_of(LINE_BYTES, st.sampled_from([b"/abs/u.wav", b"rel/u.flac", b"u:1.flac", b"a#b.wav",
                                                      b"q?x.wav", b"http://h/x.wav", b"hdfs://nn/y.wav",
                                                      b"sox x.sph -t wav - |", b"caf\xe9.wav", b"two  words\t",
                                                      b"tab\there.wav", b"sur\xed\xa0\x80.wav"]))
KALDI_LINES = st.lists(st.one_of(st.tuples(KALDI_KEYS, SEPARATORS, KALDI_VALUES).map(
    lambda t: t[0].encode() + t[1] + t[2]), LINE_BYTES), max_size=8)


@FUZZ
@given(st.fixed_dictionaries({name: st.tuples(st.booleans(), KALDI_LINES) for name in sources.KALDI_FILES}),
       st.sampled_from(["", "hdfs://nn:8020"]))
def test_every_kaldi_line_is_an_entry_or_a_reject_keyed_without_spaces_or_bom(lists, base):
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for name, (bom, lines) in lists.items():
            data[name] = (BOM if bom else b"") + b"\n".join(lines)
            (Path(tmp) / name).write_bytes(data[name])

        entries = {name: list(sources.kaldi_entries(sources.whole_file(pafs.LocalFileSystem(), f"{tmp}/{name}"),
                                                    name, tmp, base)) for name in data}
        found = sources.read_kaldi(pafs.LocalFileSystem(), tmp, base)

    for name, got in entries.items():
        said = [n for n, raw in enumerate(data[name].split(b"\n"), 1) if says_something(n, raw)]
        assert len(got) == len(said) and fits_arrow(got), name  # one entry per line that says something
        for e in got:
            if e[sources.KIND] != sources.REJECT:
                key = e[F.KEY]
                assert key and not key.startswith("\ufeff") and not set(key) & set(sources.KALDI_SPACES), key
            if e[sources.KIND] == sources.AUDIO:
                assert e[sources.URI].endswith(opened_path(e[sources.URI]))  # nothing cut off its end
    assert {c.key for c in found.candidates} <= {e[F.KEY] for e in entries["wav.scp"]} & {
        e[F.KEY] for e in entries["text"]}


@pytest.fixture(scope="module")
def small_dataset(cluster, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    good_librispeech(root / "corpus", 6, seed=4)
    cluster.pack("--input", str(root / "corpus"), "--output", str(root / "dataset"), "--shard-size-mb", "0.1")
    return root / "dataset"


def run_cli(main, argv: list[str]) -> tuple[int, list[str], str]:
    """Runs a CLI's main in this process; returns its exit code, its error lines and all it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, [line for line in err.getvalue().splitlines() if ": error:" in line], err.getvalue()


@FUZZ
@given(st.sampled_from([F.MANIFEST, F.INDEX, F.QUARANTINE]), st.floats(0.0, 1.0),
       st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), max_size=3))
def test_a_damaged_dataset_file_gives_a_one_line_error_or_reads_in_full(small_dataset, capfd, name, cut, flips):
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "dataset"
        shutil.copytree(small_dataset, copy)
        target = copy / name
        target.write_bytes(mutated(target.read_bytes(), cut, flips))

        outcomes = {what: run_cli(tool.main, [str(copy)] + extra) for what, tool, extra in (
            ("read", read, ["--workers", "0", "--on-error", "skip"]),
            ("read, 2 workers", read, ["--workers", "2", "--on-error", "skip"]),
            ("plan", plan, ["--world-size", "2", "--epoch", "1"]), ("inspect", inspect, []))}
    written_by_workers = capfd.readouterr().err  # what the worker processes wrote to the terminal

    for what, (code, errors, stderr) in outcomes.items():
        assert code in (0, 1, 2), what
        assert (code == 0) == (errors == []), (what, errors)
        assert len(errors) <= 1 and "Traceback" not in stderr, (what, stderr[-2000:])
    assert "Traceback" not in written_by_workers


def test_inspect_of_a_dataset_without_its_quarantine_file_is_one_line(small_dataset, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(small_dataset, copy)
    (copy / F.QUARANTINE).unlink()

    code, errors, stderr = run_cli(inspect.main, [str(copy)])

    assert code == 2 and len(errors) == 1 and F.QUARANTINE in errors[0] and "Traceback" not in stderr


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_odd_keys_and_random_audio_are_packed_or_quarantined_and_nothing_lands_outside(cluster, real_audio, tmp_path):
    rng = random.Random(7)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (tmp_path / "beside").mkdir()
    names = ["plain", "with space", "caf\u00e9", "\u97f3\u58f0", "tab\there", "bell\x07", "sub/nested",
             "../beside/up", "-dash", "u:1", "hash#tag", "what?", "noise-1", "noise-2", "cut-1"]
    lines = []
    for name in names:
        path = (corpus / f"{name}.flac").resolve()
        if name.startswith("noise"):
            data = rng.randbytes(rng.randint(0, 3000))
        elif name.startswith("cut"):
            data = real_audio[: len(real_audio) // 3]
        else:
            data = real_audio
        path.write_bytes(data)
        lines.append(json.dumps({"audio_filepath": f"{name}.flac", "text": f"words for {name}"}))
    (corpus / "surrogate.flac").write_bytes(real_audio)
    lines += ["{not json", json.dumps({"audio_filepath": "missing.flac", "text": "no file"}),
              json.dumps({"audio_filepath": "plain.flac", "text": "a duplicate key"}),
              json.dumps({"audio_filepath": "surrogate.flac", "text": "a lone \ud800 surrogate"}),
              json.dumps({"audio_filepath": "http://example.org/web.flac", "text": "not a filesystem"})]
    (corpus / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(tmp_path)

    cluster.pack("--input", str(corpus / "manifest.jsonl"), "--output", str(tmp_path / "out"))

    written = snapshot(tmp_path) - before
    assert written and all(p == "out" or p.startswith("out/") for p in written)
    index = pq.read_table(tmp_path / "out" / F.INDEX).to_pylist()
    quarantine = [json.loads(x) for x in (tmp_path / "out" / F.QUARANTINE).read_text().splitlines()]
    assert len(index) + len(quarantine) == len(lines)  # every manifest line: packed or quarantined
    assert {r[F.KEY] for r in index} == {n for n in names if not n.startswith(("noise", "cut"))}
    reasons = " ".join(q[F.REASON] for q in quarantine)
    assert "lone surrogate" in reasons and "unsupported URI scheme 'http'" in reasons
    for r in index:
        assert r[F.NUM_BYTES] == len(real_audio)
    code, errors, _ = run_cli(read.main, [str(tmp_path / "out"), "--workers", "0"])
    assert code == 0 and errors == []


def test_a_kaldi_folder_with_segments_is_refused_in_one_line_and_nothing_is_written(cluster, real_audio, tmp_path):
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    (kaldi / "rec1.flac").write_bytes(real_audio)
    (kaldi / "wav.scp").write_text(f"rec1 {kaldi}/rec1.flac\n")
    (kaldi / "text").write_text("utt1 hello\nutt2 world\n")
    (kaldi / "segments").write_text("utt1 rec1 0.00 0.50\nutt2 rec1 0.50 1.00\n")
    before = snapshot(tmp_path)

    result = cluster.pack("--input", str(kaldi), "--output", str(tmp_path / "out"), check=False)

    output = result.stdout + result.stderr  # spark-submit sends the driver's stderr to stdout
    errors = [line for line in output.splitlines() if line.startswith("pack: ")]
    assert result.returncode == 2 and "Traceback" not in output
    assert len(errors) == 1 and errors[0].startswith(f"pack: error: {kaldi}/segments: "), errors
    assert snapshot(tmp_path) == before


def python_files() -> list[Path]:
    return [p for package in ("hdfs_io", "spark_jobs", "trainer", "scripts", "bench", "tests")
            for p in sorted((ROOT / package).rglob("*.py"))]


def test_no_code_runs_a_shell_with_its_arguments():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} shell=")
    assert python_files() and offenders == []
