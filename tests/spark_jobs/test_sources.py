"""spark_jobs.sources: reading corpus lists without Spark."""

from __future__ import annotations

import json

import pytest

from spark_jobs.sources import InputError, discover, normalize_transcript


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
