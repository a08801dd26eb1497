"""pack --overwrite: the swap of the old dataset for the new one never leaves nothing at the output path.

The swap is two renames (old aside, new in). A failure of the second puts the old one
back; a driver that dies between them leaves the old one beside the output, and the
next pack restores it while inspect and read name where it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.speech.features import FeatureConfig, FeatureMoments
from spark_jobs import pack, packing


class Died(Exception):
    """Stands for the driver dying at this point."""


class FailingMoves:
    """The local filesystem, whose `fail_at`-th move (from 0) raises, once."""

    def __init__(self, fail_at: int):
        self.fs, self.fail_at, self.moves = pafs.LocalFileSystem(), fail_at, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def move(self, src, dst):
        self.moves += 1
        if self.moves - 1 == self.fail_at:
            raise Died(f"move {src} -> {dst}")
        return self.fs.move(src, dst)


def a_dataset(path: Path, hours: float) -> Path:
    """A folder with just a valid dataset.json, enough for the swap and for open_dataset."""
    path.mkdir(parents=True)
    cfg = FeatureConfig()
    manifest = packing.build_manifest(
        fmt="parquet", totals=dict(packing.merge_summaries([]), hours=hours), quarantined=0, feature_config=cfg,
        moments=FeatureMoments.empty(cfg.num_bins), stats_utterances=0, exact_stats=False, command=[], config={},
        timing_s={})
    (path / F.MANIFEST).write_text(json.dumps(manifest))
    return path


def swap_staged(tmp_path: Path) -> tuple[Path, Path]:
    out = a_dataset(tmp_path / "ds", hours=1.0)
    staged = a_dataset(tmp_path / F.staging_name("ds", "0123456789ab"), hours=2.0)
    return out, staged


def test_a_failed_second_rename_puts_the_old_dataset_back(tmp_path):
    out, staged = swap_staged(tmp_path)

    with pytest.raises(Died):
        pack.publish(FailingMoves(fail_at=1), str(staged), str(out))

    assert open_dataset(str(out)).manifest["hours"] == 1.0


def test_a_driver_dead_between_the_renames_leaves_the_old_dataset_named_and_the_next_pack_restores_it(tmp_path):
    out, staged = swap_staged(tmp_path)
    out.rename(F.replaced_name(str(staged)))  # the first rename done, the driver killed before the second

    with pytest.raises(F.DatasetError) as raised:
        open_dataset(str(out))
    assert F.replaced_name(F.staging_name("ds", "0123456789ab")) in str(raised.value)

    args = pack.parse_args(["--input", str(tmp_path / "corpus"), "--output", str(out)])
    (tmp_path / "corpus").mkdir()
    with pytest.raises(pack.UserError, match="already exists"):
        pack.check_paths(args)  # restored first, so the output exists again and needs --overwrite
    assert open_dataset(str(out)).manifest["hours"] == 1.0
