"""Evaluate a checkpoint on a packed dataset with greedy CTC decoding.

    python -m trainer.evaluate --checkpoint URI --dataset URI

prints {"wer": ..., "cer": ..., "utterances": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from hdfs_io import prog
from hdfs_io.format import dataset_format as F
from hdfs_io.fs.filesystem import FilesystemUnavailable, probe_uri
from trainer.checkpoint import CHECKPOINT
from trainer.train import evaluate, restore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("trainer.evaluate"), description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt URI, or the --out folder holding it")
    p.add_argument("--dataset", required=True, help="packed dataset URI")
    args = p.parse_args(argv)
    uri = args.checkpoint if args.checkpoint.endswith(".pt") else f"{args.checkpoint.rstrip('/')}/{CHECKPOINT}"
    try:
        probe_uri(args.dataset)
        model, cfg = restore(uri)
        result = evaluate(model, args.dataset, cfg, torch.device("cpu"))
    except (FileNotFoundError, PermissionError, F.DatasetError, FilesystemUnavailable) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
