"""The executor environment: a packed virtualenv that Spark on YARN unpacks in each container.

    python -m scripts.executor_env            # or: make executor-env
    spark-submit --master yarn --archives .cache/executor-env/speechpack-env.tar.gz#environment \\
        --conf spark.pyspark.python=./environment/bin/python \\
        --conf spark.pyspark.driver.python=$(which python) spark_jobs/pack.py ...

The archive holds what the Spark jobs run on executors, at the versions this
checkout's .venv runs (their dependencies too): pyarrow, numpy, soundfile (with
its libsndfile), soxr (features: cache_features, pack's statistics), pandas (pyspark's mapInArrow needs it), hdfs-native, and this
project's packages as they are now: rebuild it after changing hdfs_io or
spark_jobs, since a YARN cluster-mode driver imports them from the archive. It
holds no torch and no pyspark: YARN ships pyspark.zip itself. Like venv-pack's
archives, it carries packages, not the interpreter: `bin/python` points to the
Python 3.11 this was built with, which must exist at the same path on the nodes.

Built by hand rather than with venv-pack (last released 2018) or conda-pack
(conda environments only): a venv, pinned installs and a tar are all it takes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / ".cache" / "executor-env" / "speechpack-env.tar.gz"
# What executors import: pack's and cache_features's tasks, and pyspark's Arrow path.
PACKAGES = ("pyarrow", "numpy", "soundfile", "soxr", "pandas", "hdfs-native")
# The import names checked inside the built environment before it is packed.
IMPORTS = ("pyarrow", "pyarrow.parquet", "numpy", "soundfile", "soxr", "pandas", "hdfs_native",
           "hdfs_io.fs.filesystem", "spark_jobs.packing")
ARCHIVE_ROOT_NAME = "environment"  # the name after '#' in --archives, and in spark.pyspark.python
PROJECT = "speechpack"  # installed from this checkout, not pinned


class EnvError(Exception):
    """The environment could not be built; the message says why."""


def pins() -> list[str]:
    """Returns `name==version` for each of PACKAGES, as installed beside this interpreter."""
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise EnvError(f"{name} is not installed in {sys.prefix}; run 'make setup' first") from None
    return out


def constraints() -> str:
    """Returns a pip constraints file's text: every distribution beside this interpreter at its version.

    So the packages PACKAGES pull in (fsspec, cffi, tzdata, ...) are the ones the checkout runs too.
    """
    lines = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                    if d.metadata["Name"] and d.metadata["Name"] != PROJECT})
    return "\n".join(lines) + "\n"


def run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.lower().startswith("error")]
        raise EnvError(f"{what} failed: {(errors or lines or ['no output'])[-1]}")


def build_venv(venv: Path) -> None:
    """Creates a virtualenv at `venv` with the pinned PACKAGES and this project (without its own dependencies)."""
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", str(venv)], "creating the virtualenv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pinned = venv.parent / "constraints.txt"
    pinned.write_text(constraints())
    run(pip + ["-c", str(pinned)] + pins(), "installing " + ", ".join(PACKAGES))
    run(pip + ["--no-deps", str(ROOT)], "installing this project")
    check = "; ".join(f"import {name}" for name in IMPORTS)
    run([str(venv / "bin" / "python"), "-c", check], "importing the packages in the new environment")


def pack_venv(venv: Path, archive: Path) -> None:
    """Writes `venv`'s files to a tar.gz at `archive`, paths relative to the venv; links stay links."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    try:
        with tarfile.open(part, "w:gz", compresslevel=1) as tar:
            for entry in sorted(venv.iterdir()):
                tar.add(entry, arcname=entry.name, filter=_without_caches)
        os.replace(part, archive)
    finally:
        part.unlink(missing_ok=True)


def _without_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name.split("/") else info


def build(archive: Path = DEFAULT_OUTPUT) -> Path:
    """Builds the executor environment and returns the archive's path; raises EnvError."""
    with tempfile.TemporaryDirectory(prefix="speechpack-env-") as tmp:
        venv = Path(tmp) / ARCHIVE_ROOT_NAME
        build_venv(venv)
        pack_venv(venv, archive)
    return archive


def spark_flags(archive: str, deploy_mode: str = "client") -> list[str]:
    """Returns the spark-submit flags that run Python from `archive` (a local path or an hdfs:// URI) on YARN."""
    flags = ["--archives", f"{archive}#{ARCHIVE_ROOT_NAME}",
             "--conf", f"spark.pyspark.python=./{ARCHIVE_ROOT_NAME}/bin/python"]
    if deploy_mode == "client":  # the driver runs here, outside any container
        flags += ["--conf", f"spark.pyspark.driver.python={sys.executable}"]
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    args = parser.parse_args(argv)
    if not shutil.which(getattr(sys, "_base_executable", sys.executable)):
        print("executor_env: this interpreter's base Python is gone; recreate .venv", file=sys.stderr)
        return 2
    try:
        archive = build(args.output.resolve())
    except EnvError as e:
        print(f"executor_env: {e}", file=sys.stderr)
        return 1
    size_mb = archive.stat().st_size / 2**20
    print(f"executor_env: wrote {archive} ({size_mb:.0f} MB); its bin/python is "
          f"{os.path.realpath(getattr(sys, '_base_executable', sys.executable))}, which the nodes need too")
    print("spark-submit --master yarn " + " ".join(spark_flags(str(archive))) + " spark_jobs/pack.py ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
