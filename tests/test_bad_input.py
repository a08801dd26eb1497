"""Bad input, fuzzed with hypothesis: no traceback for a user's mistake, no input lost, nothing written outside.

Inputs: random bytes as audio, random transcript bytes, random manifest lines,
truncated and corrupted dataset.json / index.parquet / quarantine.jsonl, and
keys holding `/`, `..`, spaces, control characters and non-ASCII.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyarrow import fs as pafs

from hdfs_io import dataset_format as F
from hdfs_io import inspect, plan, read
from hdfs_io.audio import decode
from spark_jobs import sources
from spark_jobs.packing import probe_one
from tests.corpora import good_librispeech

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LINE_BYTES = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b""))


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


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS + ["9-9-9999", ""]), st.sampled_from([b" ", b"\t", b"  "]),
                          LINE_BYTES), max_size=8))
def test_every_transcript_line_and_audio_file_is_a_candidate_or_a_reject(real_audio, lines):
    transcript = b"\n".join(k.encode() + sep + text for k, sep, text in lines)
    with tempfile.TemporaryDirectory() as tmp:
        trans = tree_with_transcript(Path(tmp), real_audio, KEYS, transcript)

        found = sources.read_librispeech(pafs.LocalFileSystem(), tmp, "")

    mentioned = " ".join(f"{r.source} {r.reason}" for r in found.rejects)
    packed = {c.key for c in found.candidates}
    for key in KEYS:  # every audio file
        assert key in packed or f"{key}.flac" in mentioned
    for lineno, raw in enumerate(transcript.split(b"\n"), 1):  # every line that says something
        if raw.strip():
            key = raw.strip().split(maxsplit=1)[0].decode("utf-8", "replace")
            assert f"{trans}:{lineno}" in mentioned or key in packed


WEIRD_NAMES = st.sampled_from(["a b", "..", "../up", "x/y", "caf\u00e9", "\u97f3\u58f0", "tab\there", "bell\x07",
                               "-dash", "new\nline", ""])
MANIFEST_LINES = st.one_of(
    LINE_BYTES,
    st.builds(lambda name, text, extra: json.dumps({"audio_filepath": name + ".flac", "text": text, **extra}).encode(),
              WEIRD_NAMES, st.text(max_size=20), st.dictionaries(st.sampled_from(["duration", "speaker"]),
                                                                  st.one_of(st.none(), st.integers(), st.text()))),
    st.builds(lambda v: json.dumps(v).encode(), st.one_of(st.none(), st.integers(), st.lists(st.integers()),
                                                          st.dictionaries(st.text(max_size=5), st.text(max_size=5)))),
)


@FUZZ
@given(st.lists(MANIFEST_LINES, max_size=10))
def test_every_manifest_line_is_a_candidate_or_a_reject(lines):
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.jsonl"
        manifest.write_bytes(b"\n".join(lines))

        found = sources.read_manifest(pafs.LocalFileSystem(), str(manifest), "")

    said = [n for n, raw in enumerate(b"\n".join(lines).split(b"\n"), 1) if raw.strip()]
    rejected = [int(r.source.rsplit(":", 1)[1]) for r in found.rejects]
    assert len(found.candidates) + len(rejected) == len(said)
    assert len(set(rejected)) == len(rejected) and set(rejected) <= set(said)
    assert all(r.reason.strip() and "\n" not in r.reason for r in found.rejects)


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
             "../beside/up", "-dash", "noise-1", "noise-2", "cut-1"]
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
    lines += ["{not json", json.dumps({"audio_filepath": "missing.flac", "text": "no file"}),
              json.dumps({"audio_filepath": "plain.flac", "text": "a duplicate key"})]
    (corpus / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(tmp_path)

    cluster.pack("--input", str(corpus / "manifest.jsonl"), "--output", str(tmp_path / "out"))

    written = snapshot(tmp_path) - before
    assert written and all(p == "out" or p.startswith("out/") for p in written)
    index = pq.read_table(tmp_path / "out" / F.INDEX).to_pylist()
    quarantine = [json.loads(x) for x in (tmp_path / "out" / F.QUARANTINE).read_text().splitlines()]
    assert len(index) + len(quarantine) == len(lines)  # every manifest line: packed or quarantined
    assert {r[F.KEY] for r in index} == {n for n in names if not n.startswith(("noise", "cut"))}
    for r in index:
        assert r[F.NUM_BYTES] == len(real_audio)
    code, errors, _ = run_cli(read.main, [str(tmp_path / "out"), "--workers", "0"])
    assert code == 0 and errors == []


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
