"""bench/pack: Spark pack throughput on local[1] and local[2] against a single-process tarfile packer.

    python -m bench.pack [--utterances 5000] [--repeats 3]

All runs read page-cached corpora and are interleaved, so the ratios are
measured side by side. Spark figures exclude JVM start (the job's own
`timing_s.total_in_spark`). Steady state is the marginal throughput between a
corpus of N/2 and one of N utterances, which cancels what every job pays once
(Python worker start, the 2000-utterance feature-statistics sample). Two
baselines: `tar_probe` does the per-file work the pack job does (read, probe,
CRC32) and writes a tar; `tar_bare` only copies bytes into a tar.
Goal: Spark local[2] steady state >= 2x tar_probe.
"""

from __future__ import annotations

import io
import tarfile
import time
import zlib
from pathlib import Path

from bench.common import bench_args, WORK, corpus, median, spark_pack, tree_bytes, write_result
from hdfs_io.speech.audio import probe

# 270 MB of corpus in 16 MB shards: 17 write tasks, enough to keep 2 cores busy to the end.
# At production size (256 MB shards) a 10,000-hour corpus has thousands of shards.
SHARD_MB = 16


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
    args = bench_args(__doc__, argv)
    sizes = (args.utterances // 2, args.utterances)
    roots = {n: corpus(n) for n in sizes}
    out = WORK / "pack-out"
    out.mkdir(parents=True, exist_ok=True)
    names = ("spark_local1", "spark_local2", "tar_probe", "tar_bare")
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in names for n in sizes}
    for _ in range(args.repeats):
        for n, root in roots.items():
            for master, name in (("local[1]", "spark_local1"), ("local[2]", "spark_local2")):
                m = spark_pack(master, str(root), str(out / name), "--shard-size-mb", str(SHARD_MB))
                assert m["utterances"] == n, m["utterances"]
                times[(name, n)].append(m["timing_s"]["total_in_spark"])
            times[("tar_probe", n)].append(tar_pack(root, out / "probe.tar", with_probe=True))
            times[("tar_bare", n)].append(tar_pack(root, out / "bare.tar", with_probe=False))
    small, large = sizes
    mb = {n: tree_bytes(roots[n])[1] / 2**20 for n in sizes}
    rows = {}
    for name in names:
        t_small, t_large = median(times[(name, small)]), median(times[(name, large)])
        marginal = max(t_large - t_small, 1e-9)
        rows[name] = {
            "median_s": {str(small): t_small, str(large): t_large},
            "runs_s": {str(n): times[(name, n)] for n in sizes},
            "whole_job_mb_per_s": mb[large] / t_large, "whole_job_utterances_per_s": large / t_large,
            "steady_mb_per_s": (mb[large] - mb[small]) / marginal,
            "steady_utterances_per_s": (large - small) / marginal,
        }

    def ratio(a: str, b: str, key: str) -> float:
        return rows[a][key] / rows[b][key]

    result = {"utterances": list(sizes), "megabytes": {str(n): mb[n] for n in sizes}, "repeats": args.repeats,
              "shard_size_mb": SHARD_MB, "rows": rows,
              "steady_ratio_local2_vs_tar_probe": ratio("spark_local2", "tar_probe", "steady_utterances_per_s"),
              "steady_ratio_local2_vs_local1": ratio("spark_local2", "spark_local1", "steady_utterances_per_s"),
              "whole_job_ratio_local2_vs_tar_probe": ratio("spark_local2", "tar_probe", "whole_job_utterances_per_s"),
              "goal": "spark local[2] steady-state >= 2x tar_probe"}
    path = write_result("pack", result)
    print(f"{'':14s} {'whole job (' + str(large) + ')':>24s} {'steady state':>24s}")
    for name, r in rows.items():
        print(f"{name:14s} {r['whole_job_mb_per_s']:8.1f} MB/s {r['whole_job_utterances_per_s']:7.0f} utt/s "
              f"{r['steady_mb_per_s']:8.1f} MB/s {r['steady_utterances_per_s']:7.0f} utt/s")
    print(f"steady state: local[2] / tar_probe = {result['steady_ratio_local2_vs_tar_probe']:.2f}x, "
          f"local[2] / local[1] = {result['steady_ratio_local2_vs_local1']:.2f}x -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
