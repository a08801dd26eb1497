"""Summarize a packed dataset: size, shards, duration histogram, quarantine by reason.

    python -m hdfs_io.inspect DATASET_URI [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter

from hdfs_io import prog
from hdfs_io.format import dataset_format as F
from hdfs_io.format.dataset import open_dataset
from hdfs_io.fs.filesystem import FilesystemUnavailable, hdfs_backend, probe_uri

BAR_WIDTH = 40


def reason_kind(reason: str) -> str:
    """Returns the kind of a quarantine reason: reasons read 'kind: detail'."""
    return reason.split(":", 1)[0].strip()


def summarize(uri: str) -> dict:
    """Returns the summary `inspect` prints, as a dict.

    Raises:
        hdfs_io.format.dataset_format.DatasetError, hdfs_io.fs.filesystem.FilesystemUnavailable.
    """
    probe_uri(uri)
    ds = open_dataset(uri)
    m = ds.manifest
    sizes = [s["bytes"] for s in m["shards"]]
    return {
        "uri": uri, "hdfs_backend": hdfs_backend() if uri.startswith("hdfs:") else None,
        "format": m["format"],
        "utterances": m["utterances"],
        "hours": m["hours"],
        "shards": len(m["shards"]),
        "shard_bytes": {"total": sum(sizes), "min": min(sizes, default=0),
                        "median": statistics.median(sizes) if sizes else 0, "max": max(sizes, default=0)},
        "duration_histogram": m["stats"]["duration_histogram"],
        "vocabulary": "".join(m["vocabulary"]),
        "quarantined": m["quarantined"],
        "quarantine_by_reason": dict(Counter(reason_kind(q[F.REASON]) for q in ds.quarantine()).most_common()),
    }


def render(s: dict) -> str:
    """Returns the summary as text for a terminal."""
    mb = 2**20
    lines = [
        f"dataset      {s['uri']}",
        f"format       {s['format']}",
        f"HDFS client  {s['hdfs_backend'] or '-'}",
        f"utterances   {s['utterances']}",
        f"hours        {s['hours']:.3f}",
        f"shards       {s['shards']} ({s['shard_bytes']['total'] / mb:.1f} MB; min {s['shard_bytes']['min'] / mb:.1f}, "
        f"median {s['shard_bytes']['median'] / mb:.1f}, max {s['shard_bytes']['max'] / mb:.1f} MB)",
        f"vocabulary   {s['vocabulary']!r}",
        "",
        "duration histogram",
    ]
    hist = s["duration_histogram"]
    top = max(hist["counts"], default=0) or 1
    for lo, hi, count in zip(hist["edges_s"], hist["edges_s"][1:], hist["counts"]):
        lines.append(f"  {lo:6.1f}-{hi:<6.1f}s {count:8d} {'#' * round(BAR_WIDTH * count / top)}")
    lines += ["", f"quarantined  {s['quarantined']}"]
    lines += [f"  {n:8d}  {kind}" for kind, n in s["quarantine_by_reason"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("hdfs_io.inspect"), description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="dataset folder URI")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    try:
        summary = summarize(args.dataset)
    except (F.DatasetError, FilesystemUnavailable, PermissionError) as e:
        print(f"inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
