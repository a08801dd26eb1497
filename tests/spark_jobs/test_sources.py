"""spark_jobs.sources: reading corpus lists without Spark."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pyarrow import fs as pafs

from hdfs_io.fs.filesystem import open_filesystem, uri_base
from spark_jobs.pack_stages import ENTRY, TREE_ITEM, tree_items, tree_task
from spark_jobs.sources import (InputError, byte_ranges, count_lines, discover, lines_in_range, list_tree,
                                manifest_entries, normalize_transcript, numbered, split_tree, tree_entries)


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


def arrow_rows(rows: list[dict], schema: pa.Schema = ENTRY) -> list[dict]:
    """Returns the rows as they pass between Spark tasks (spark_jobs.pack_stages.rows_task)."""
    return pa.RecordBatch.from_pylist(rows, schema).to_pylist()


def test_kaldi_lists_split_on_tabs_and_runs_of_spaces_and_ignore_a_bom(tmp_path):
    keys = [f"spk-{i:02d}" for i in range(6)]
    seps = ["\t", "  ", " \t ", "\t\t", " ", "\t"]
    bom = "\ufeff"
    (tmp_path / "wav.scp").write_text(bom + "".join(f"{k}{s}/data/{k}.wav\n" for k, s in zip(keys, seps)))
    (tmp_path / "text").write_text(bom + "".join(f"{k}{s}words\tof {k}\n" for k, s in zip(keys, seps)))
    (tmp_path / "utt2spk").write_text(bom + "".join(f"{k}{s}speaker{i}\n" for i, (k, s) in enumerate(zip(keys, seps))))

    found = discover(str(tmp_path))

    assert found.rejects == []
    assert [(c.key, c.uri, c.transcript, c.speaker) for c in found.candidates] == [
        (k, f"/data/{k}.wav", f"WORDS OF {k.upper()}", f"speaker{i}") for i, k in enumerate(keys)]


def test_a_librispeech_transcript_with_a_bom_and_tabs_keys_every_line(tmp_path):
    chapter = tmp_path / "1" / "2"
    chapter.mkdir(parents=True)
    for n in range(3):
        (chapter / f"1-2-{n:04d}.flac").write_bytes(b"x")
    (chapter / "1-2.trans.txt").write_bytes("\ufeff1-2-0000\tONE\n1-2-0001  TWO\n1-2-0002 \tTHREE\n".encode())

    found = discover(str(tmp_path))

    assert found.rejects == []
    assert [(c.key, c.transcript) for c in found.candidates] == [
        ("1-2-0000", "ONE"), ("1-2-0001", "TWO"), ("1-2-0002", "THREE")]


def test_a_kaldi_folder_with_segments_is_refused_in_one_line_naming_the_file(tmp_path):
    (tmp_path / "wav.scp").write_text("rec1 /data/rec1.wav\n")
    (tmp_path / "text").write_text("utt1 hello\nutt2 world\n")
    (tmp_path / "segments").write_text("utt1 rec1 0.00 1.50\nutt2 rec1 1.50 3.00\n")

    with pytest.raises(InputError) as refused:
        discover(str(tmp_path))

    message = str(refused.value)
    assert f"{tmp_path}/segments" in message and "\n" not in message


def test_manifest_names_with_a_colon_hash_or_question_mark_are_local_files(tmp_path):
    names = ["u:1", "take#2", "why?", "c:/x"]
    lines = [json.dumps({"audio_filepath": f"{n}.flac", "text": n}) for n in names]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))

    found = discover(str(tmp_path / "m.jsonl"))

    assert found.rejects == []
    assert [(c.key, c.uri) for c in found.candidates] == [(n, f"{tmp_path}/{n}.flac") for n in names]


def test_manifest_uris_with_a_scheme_pack_cannot_read_are_rejected_by_name(tmp_path):
    lines = [json.dumps({"audio_filepath": uri, "text": "words"}) for uri in (
        "http://example.org/a.flac", "s3x://bucket/b.flac", "file:///data/c.flac", "hdfs://nn:8020/d.flac")]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))

    found = discover(str(tmp_path / "m.jsonl"))

    assert [c.uri for c in found.candidates] == ["file:///data/c.flac", "hdfs://nn:8020/d.flac"]
    assert [(r.source.rsplit(":", 1)[1], r.reason) for r in found.rejects] == [
        ("1", "unsupported URI scheme 'http' (pack reads hdfs://, file:// and local paths): "
              "'http://example.org/a.flac'"),
        ("2", "unsupported URI scheme 's3x' (pack reads hdfs://, file:// and local paths): 's3x://bucket/b.flac'")]


def test_manifest_values_that_are_not_unicode_text_are_rejected_and_every_entry_fits_arrow(tmp_path):
    (tmp_path / "a.flac").write_bytes(b"x")
    lines = [
        json.dumps({"audio_filepath": "a.flac", "text": "fine"}),
        json.dumps({"audio_filepath": "b.flac", "text": "lone \ud800 surrogate"}),
        json.dumps({"audio_filepath": "c\udfff.flac", "text": "in the path"}),
        json.dumps({"audio_filepath": "d.flac", "text": "in the speaker", "speaker": "\udc80"}),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes("\n".join(lines).encode())

    entries = list(manifest_entries(numbered(lines_in_range(pafs.LocalFileSystem(), str(manifest), 0, 1 << 20), 1),
                                    str(manifest), ""))

    rows = arrow_rows(entries)
    assert [r["kind"] for r in rows] == ["pair", "reject", "reject", "reject"]
    assert [r["reason"] for r in rows[1:]] == [
        "manifest line has a lone surrogate (not Unicode text) in 'text'",
        "manifest line has a lone surrogate (not Unicode text) in 'audio_filepath'",
        "manifest line has a lone surrogate (not Unicode text) in 'speaker'"]


def write_files(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_a_tree_under_a_chain_of_single_folders_still_splits_into_many_listings(tmp_path):
    write_files(tmp_path, [f"corpora/LibriSpeech/train-960/{spk}/{ch}/{spk}-{ch}-0000.flac"
                           for spk in range(10, 16) for ch in range(100, 102)] + ["corpora/README"])
    fs = pafs.LocalFileSystem()

    trees, folders = split_tree(fs, str(tmp_path), 4)

    assert len(trees) >= 4
    assert folders == [f"{tmp_path}/corpora"]


def test_a_link_back_up_the_tree_is_listed_once_not_followed_round(tmp_path):
    write_files(tmp_path, ["1/2/1-2-0000.flac", "1/3/1-3-0000.flac"])
    (tmp_path / "1" / "2" / "up").symlink_to("../..")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "1" / "3" / "side").symlink_to(tmp_path / "elsewhere")
    write_files(tmp_path, ["elsewhere/9-9-0000.flac"])
    fs = pafs.LocalFileSystem()

    trees, folders = split_tree(fs, str(tmp_path), 64)
    listed = [p for t in trees for p in list_tree(fs, t)] + [p for f in folders for p in list_tree(fs, f, False)]

    assert sorted(listed) == sorted(f"{tmp_path}/{p}" for p in [
        "1/2/1-2-0000.flac", "1/3/1-3-0000.flac", "1/3/side/9-9-0000.flac", "elsewhere/9-9-0000.flac"])
    assert sorted(list_tree(fs, str(tmp_path))) == sorted(listed)


TREE_NAMES = st.lists(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=5).map("/".join),
                      max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TREE_NAMES, st.integers(0, 12))
def test_split_tree_lists_every_file_once_in_at_least_want_listings_or_folder_by_folder(tmp_path_factory, paths,
                                                                                      want):
    root = tmp_path_factory.mktemp("tree")
    names = sorted({f"{p}.f" for p in paths})  # a name never doubles as a folder
    write_files(root, names)
    fs = pafs.LocalFileSystem()

    trees, folders = split_tree(fs, str(root), want)

    listed = [p for t in trees for p in list_tree(fs, t)] + [p for f in folders for p in list_tree(fs, f, False)]
    assert sorted(listed) == [f"{root}/{n}" for n in names]
    assert len(trees) >= max(want, 1) or trees == []


def test_non_utf8_file_and_folder_names_in_a_local_tree_are_rejected_by_name(tmp_path):
    chapter = tmp_path / "1" / "2"
    chapter.mkdir(parents=True)
    for n in range(2):
        (chapter / f"1-2-{n:04d}.flac").write_bytes(b"x")
    (chapter / "1-2.trans.txt").write_text("1-2-0000 ONE\n1-2-0001 TWO\n")
    os.close(os.open(os.fsencode(chapter) + b"/caf\xe9.flac", os.O_CREAT | os.O_WRONLY))
    os.makedirs(os.fsencode(tmp_path) + b"/3/\xff")
    os.close(os.open(os.fsencode(tmp_path) + b"/3/\xff/3-4-0000.flac", os.O_CREAT | os.O_WRONLY))
    os.close(os.open(os.fsencode(tmp_path) + b"/notes\xfe.txt", os.O_CREAT | os.O_WRONLY))
    fs = pafs.LocalFileSystem()

    found = discover(str(tmp_path))
    by_task = {want: [e for e in tree_task(arrow_rows(tree_items(fs, str(tmp_path), want), TREE_ITEM), 0,
                                           fs_uri=str(tmp_path))] for want in (1, 64)}

    assert [c.key for c in found.candidates] == ["1-2-0000", "1-2-0001"]
    assert sorted((r.source, r.reason) for r in found.rejects) == [
        (f"{tmp_path}/1/2/caf\\xe9.flac", "file name is not valid UTF-8; rename it"),
        (f"{tmp_path}/3/\\xff/3-4-0000.flac", "file name is not valid UTF-8; rename it"),
        (f"{tmp_path}/notes\\xfe.txt", "file name is not valid UTF-8; rename it")]
    for want, entries in by_task.items():  # as the pack job's tasks list the tree, split or whole
        kinds = sorted(r["kind"] for r in arrow_rows(entries))
        assert kinds == ["audio", "audio", "reject", "reject", "reject", "text", "text", "trans_file"], want


def test_a_kaldi_folder_beside_a_non_utf8_name_is_read(tmp_path):
    (tmp_path / "wav.scp").write_text("u1 /data/u1.wav\n")
    (tmp_path / "text").write_text("u1 hello\n")
    os.close(os.open(os.fsencode(tmp_path) + b"/notes\xfe.txt", os.O_CREAT | os.O_WRONLY))

    found = discover(str(tmp_path))

    assert found.kind == "kaldi" and [c.key for c in found.candidates] == ["u1"] and found.rejects == []


def test_hdfs_names_with_hash_question_mark_or_colon_are_read_whole_or_rejected_by_name(cluster, hdfs_dir):
    fs, root = open_filesystem(hdfs_dir)
    fs.create_dir(f"{root}/1/2")
    keys = ["1-2-0000", "1-2-0001#2", "1-2-0002?x"]
    for key in keys:
        with fs.open_output_stream(f"{root}/1/2/{key}.flac") as f:
            f.write(key.encode())
    with fs.open_output_stream(f"{root}/1/2/1-2.trans.txt") as f:
        f.write("".join(f"{k} WORDS\n" for k in keys).encode())
    with fs.open_output_stream(f"{root}/1/2/tab\there.flac") as f:
        f.write(b"tab\there")
    with fs.open_output_stream(f"{root}/m.jsonl") as f:
        f.write("".join(json.dumps({"audio_filepath": f"1/2/{k}.flac", "text": "words"}) + "\n"
                        for k in keys + ["u:1", "tab\there"]).encode())

    found = {"tree": discover(hdfs_dir), "manifest": discover(f"{hdfs_dir}/m.jsonl")}
    whole = list(tree_entries(fs, list_tree(fs, root), uri_base(hdfs_dir)))
    split = list(tree_task(arrow_rows(tree_items(fs, root, 2), TREE_ITEM), 0, fs_uri=hdfs_dir))

    for kind, got in found.items():
        for c in got.candidates:  # a candidate's URI reads the very file it was found as
            c_fs, c_path = open_filesystem(c.uri)
            with c_fs.open_input_stream(c_path) as f:
                assert f.read() == posixpath.basename(c.key).encode(), (kind, c.uri)
        mentioned = " ".join(f"{r.source} {r.reason}" for r in got.rejects)
        for key in keys:
            assert key in {posixpath.basename(c.key) for c in got.candidates} or f"{key}.flac" in mentioned, \
                (kind, key, got)
    assert [r.reason for r in found["manifest"].rejects if r.source.endswith("m.jsonl:4")] == [
        "HDFS allows no ':' in a file name: '1/2/u:1.flac'"]
    assert "1/2/tab\there" in {c.key for c in found["manifest"].candidates} \
        or "'1/2/tab\\there.flac'" in " ".join(r.reason for r in found["manifest"].rejects)
    assert sorted(map(str, arrow_rows(split))) == sorted(map(str, whole))  # the pack job's split listing
