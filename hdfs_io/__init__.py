"""Reading and writing packed speech datasets on HDFS, local disk or any pyarrow filesystem.

The commands are modules here (upload, inspect, plan, read, augment: `python -m hdfs_io.<tool>` or
`speechpack-<tool>`); the library is in four subpackages: fs (the filesystem), format (the dataset format),
speech (audio, features, augmentation) and reader (the per-rank reader).
"""

import os
import sys


def prog(module: str) -> str:
    """Returns a command's name as it was run, for its usage line: speechpack-X from its console script,
    else `python -m MODULE`."""
    name = os.path.basename(sys.argv[0])
    return name if name.startswith("speechpack-") else f"python -m {module}"
