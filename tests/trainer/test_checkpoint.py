"""trainer.checkpoint: a crash at any point of a replace leaves a checkpoint; the metrics history survives restarts."""

from __future__ import annotations

import json

import pytest
from pyarrow import fs as pafs

from trainer import checkpoint


class Crash(Exception):
    """Stands for the process dying at this point."""


class CrashingFilesystem:
    """A local filesystem that 'dies' at its k-th rename or delete (counting from 0)."""

    def __init__(self, crash_at: int):
        self.fs, self.crash_at, self.calls = pafs.LocalFileSystem(), crash_at, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _mutate(self, name, *args):
        if self.calls == self.crash_at:
            raise Crash(f"{name}{args}")
        self.calls += 1
        return getattr(self.fs, name)(*args)

    def move(self, src, dst):
        return self._mutate("move", src, dst)

    def delete_file(self, path):
        return self._mutate("delete_file", path)


@pytest.mark.parametrize("crash_at", range(4))
def test_a_crash_at_any_point_of_a_checkpoint_replace_leaves_the_old_or_the_new_one(tmp_path, monkeypatch, crash_at):
    out = str(tmp_path / "out")
    checkpoint.save(out, {"step": 3})
    crashing = CrashingFilesystem(crash_at)
    monkeypatch.setattr(checkpoint, "open_filesystem", lambda uri: (crashing, uri))

    try:
        checkpoint.save(out, {"step": 6})
    except Crash:
        pass
    monkeypatch.undo()
    found = checkpoint.load(out)

    assert found is not None, f"no checkpoint after a crash at rename/delete {crash_at}"
    assert found[0]["step"] in (3, 6)
    checkpoint.save(out, {"step": 9})  # the next save after a crash lands too
    assert checkpoint.load(out)[0]["step"] == 9
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint.pt"]


def test_no_checkpoint_is_none(tmp_path):
    assert checkpoint.load(str(tmp_path / "empty")) is None


def test_the_metrics_history_is_appended_and_cut_back_to_the_checkpoint_at_resume(tmp_path):
    out = str(tmp_path / "out")
    checkpoint.start_metrics(out)
    checkpoint.append_metrics(out, [json.dumps({"step": s}) + "\n" for s in (1, 2, 3)])
    checkpoint.append_metrics(out, [json.dumps({"step": s}) + "\n" for s in (4, 5)] + ['{"step": 6, "lo'])

    checkpoint.cut_metrics(out, last_step=3)  # the attempt that wrote 4-6 died before its checkpoint
    checkpoint.append_metrics(out, [json.dumps({"step": s}) + "\n" for s in (4, 5, 6)])

    lines = (tmp_path / "out" / checkpoint.METRICS).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
