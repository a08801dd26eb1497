"""bench/pack: Spark pack throughput on local[1] and local[2] against a single-process tarfile packer.

    python -m bench.pack [--utterances 5000] [--repeats 3]

All runs read the same page-cached corpus and are interleaved, so the ratios
are measured side by side. Spark figures exclude JVM start (the job's own
`timing_s.total_in_spark`). Two baselines: `tar_probe` does the per-file work
the pack job does (read, probe, CRC32) and writes a tar; `tar_bare` only
copies bytes into a tar. Goal: Spark local[2] >= 2x tar_probe.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
import zlib
from pathlib import Path

from bench.common import WORK, corpus, median, spark_pack, tree_bytes, write_result
from hdfs_io.audio import probe


def tar_pack(root: Path, out: Path, with_probe: bool) -> float:
    """Packs every .flac under root into one tar; returns seconds."""
    started = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for path in sorted(root.rglob("*.flac")):
            data = path.read_bytes()
            if with_probe:
                probe(data)
                zlib.crc32(data)
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--utterances", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    root = corpus(args.utterances)
    files, nbytes = tree_bytes(root)
    out = WORK / "pack-out"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"spark_local1": [], "spark_local2": [], "tar_probe": [], "tar_bare": []}
    for _ in range(args.repeats):
        for master, name in (("local[1]", "spark_local1"), ("local[2]", "spark_local2")):
            m = spark_pack(master, str(root), str(out / name), "--shard-size-mb", "64")
            assert m["utterances"] == files, m["utterances"]
            times[name].append(m["timing_s"]["total_in_spark"])
        times["tar_probe"].append(tar_pack(root, out / "probe.tar", with_probe=True))
        times["tar_bare"].append(tar_pack(root, out / "bare.tar", with_probe=False))
    mb = nbytes / 2**20
    rows = {name: {"median_s": median(t), "runs_s": t, "mb_per_s": mb / median(t),
                   "utterances_per_s": files / median(t)} for name, t in times.items()}
    result = {"utterances": files, "megabytes": mb, "repeats": args.repeats, "rows": rows,
              "ratio_local2_vs_tar_probe": rows["tar_probe"]["median_s"] / rows["spark_local2"]["median_s"],
              "ratio_local2_vs_tar_bare": rows["tar_bare"]["median_s"] / rows["spark_local2"]["median_s"],
              "ratio_local2_vs_local1": rows["spark_local1"]["median_s"] / rows["spark_local2"]["median_s"],
              "goal": "spark local[2] >= 2x tar_probe"}
    path = write_result("pack", result)
    for name, r in rows.items():
        print(f"{name:14s} {r['median_s']:7.2f} s  {r['mb_per_s']:7.1f} MB/s  {r['utterances_per_s']:7.0f} utt/s")
    print(f"local[2] / tar_probe = {result['ratio_local2_vs_tar_probe']:.2f}x; "
          f"local[2] / tar_bare = {result['ratio_local2_vs_tar_bare']:.2f}x  -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
