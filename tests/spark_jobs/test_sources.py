"""spark_jobs.sources: reading corpus lists without Spark."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pyarrow import fs as pafs

from spark_jobs.sources import (InputError, byte_ranges, count_lines, discover, lines_in_range, normalize_transcript,
                                numbered)


def test_normalize_transcript_upper_cases_and_collapses_whitespace():
    assert normalize_transcript("  hello\t wide   world \n") == "HELLO WIDE WORLD"


def test_manifest_bad_lines_are_rejected_with_reasons(tmp_path):
    (tmp_path / "a.flac").write_bytes(b"x")
    lines = [
        json.dumps({"audio_filepath": "a.flac", "text": "one  two", "duration": 1.0}),
        "{not json",
        json.dumps({"audio_filepath": "b.flac"}),
        json.dumps({"audio_filepath": "c.flac", "text": "   "}),
        json.dumps({"audio_filepath": "a.flac", "text": "again"}),
        json.dumps(["a", "list"]),
        "",
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines))

    found = discover(str(manifest))

    assert [(c.key, c.transcript, c.uri) for c in found.candidates] == [("a", "ONE TWO", str(tmp_path / "a.flac"))]
    reasons = {r.source.rsplit(":", 1)[1]: r.reason for r in found.rejects}
    assert reasons["2"] == "manifest line is not valid JSON"
    assert "'text'" in reasons["3"] and "'text'" in reasons["6"]
    assert reasons["4"].startswith("empty transcript")
    assert reasons["5"].startswith("duplicate key")


def test_kaldi_folder_pairs_lists_and_rejects_pipes_and_orphans(tmp_path):
    (tmp_path / "wav.scp").write_text("u1 /data/u1.wav\nu2 sox /data/u2.sph -t wav - |\nu3 rel/u3.wav\n")
    (tmp_path / "text").write_bytes(b"u1 hello there\nu3 third one\nu4 no audio\nu5 \xff\xfe\n")
    (tmp_path / "utt2spk").write_text("u1 alice\nu3 bob\n")

    found = discover(str(tmp_path))

    assert found.kind == "kaldi"
    assert [(c.key, c.uri, c.transcript, c.speaker) for c in found.candidates] == [
        ("u1", "/data/u1.wav", "HELLO THERE", "alice"),
        ("u3", f"{tmp_path}/rel/u3.wav", "THIRD ONE", "bob")]
    reasons = sorted(r.reason.split(":")[0] for r in found.rejects)
    assert reasons == ["line is not valid UTF-8", "piped wav.scp entry not supported",
                       "transcript line with no audio"]


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: (p / "notes").mkdir(parents=True) or (p / "notes" / "x.txt").write_text("x"), "no *.trans.txt"),
])
def test_unusable_inputs_raise_input_error(tmp_path, make, message):
    target = tmp_path / "corpus"
    make(target)

    with pytest.raises(InputError, match=message.replace("*", r"\*")):
        discover(str(target))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=30), st.booleans(),
       st.integers(1, 40), st.integers(1, 16))
def test_byte_ranges_read_every_line_once_with_its_number(tmp_path_factory, lines, trailing_newline, range_bytes,
                                                          block):
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    path = tmp_path_factory.mktemp("ranges") / "list.txt"
    path.write_bytes(data)
    fs = pafs.LocalFileSystem()
    ranges = byte_ranges(len(data), range_bytes)

    counts = [count_lines(fs, str(path), a, b, block) for a, b in ranges]
    got, first = [], 1
    for (a, b), count in zip(ranges, counts):
        got += list(numbered(lines_in_range(fs, str(path), a, b, block), first))
        first += count

    expected = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n") if data else []
    assert [raw for _, _, raw in got] == expected
    assert [lineno for _, lineno, _ in got] == list(range(1, len(expected) + 1))
    assert [data[offset:offset + len(raw)] for offset, _, raw in got] == expected
