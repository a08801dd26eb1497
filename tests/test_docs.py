"""The commands that README.md and docs/*.md show, checked against the commands themselves.

Every command line of a ```sh block is split into commands; each of the project's commands (a
speechpack-* console script, `python -m` one of its modules, `spark-submit` one of its jobs,
`torchrun -m trainer.train`, `make TARGET`) must exist, and every --flag it is shown with must be
one its --help lists (a trainer's --section.key=value override must name a config field).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("hdfs_io", "trainer", "spark_jobs", "scripts", "bench")


def sh_lines(path: Path) -> list[str]:
    """Returns the command lines of a Markdown file's ```sh blocks, continuations joined, comments dropped."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```sh", "```bash", "```shell") and not inside
            continue
        if inside:
            line = re.sub(r"^\s*\$ ", "", line)
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + line.strip()
            else:
                lines.append(line.strip())
    return [line for line in lines if line and not line.startswith("#")]


def commands(line: str) -> list[list[str]]:
    """Returns the simple commands of a shell line as word lists (split at && || ; |, comments and env dropped)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in an example: check it word by word
        words = line.split()
    out, current = [], []
    for w in words:
        if w in ("&&", "||", ";", "|", "&"):
            out.append(current)
            current = []
        elif not current and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w):
            continue  # VAR=value before a command
        else:
            current.append(w.rstrip(";"))
    return [c for c in out + [current] if c]


@functools.cache
def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@functools.cache
def help_text(*argv: str) -> str:
    done = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)} --help: {done.stderr.strip().splitlines()[-1:]}"
    return done.stdout


@functools.cache
def config_fields() -> set[str]:
    from trainer.config import Config

    return {f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory())}


def project_command(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """Returns (the argv that runs it with --help, the words after it) for one of the project's commands, else None."""
    name = Path(words[0]).name
    if name in scripts():
        return ("-m", scripts()[name].split(":")[0]), words[1:]
    if name.startswith("speechpack-") and not name.startswith(("speechpack-env", "speechpack-hdfs")):
        pytest.fail(f"{name} is not a console script in pyproject.toml")
    if re.fullmatch(r"python3?(\.\d+)?", name) and len(words) > 2 and words[1] == "-m" \
            and words[2].split(".")[0] in PACKAGES:
        return ("-m", words[2]), words[3:]
    if name in ("spark-submit", "python", "python3"):
        job = next((i for i, w in enumerate(words) if re.fullmatch(r"(.*/)?spark_jobs/\w+\.py", w)), None)
        if job is not None:
            return (f"spark_jobs/{Path(words[job]).name}",), words[job + 1:]
    if name == "torchrun" and "trainer.train" in words:
        i = words.index("trainer.train")
        return ("-m", "trainer.train"), words[i + 1:]
    return None


def shown_commands() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}: {line}", line) for path in DOCS for line in sh_lines(path)]


def test_the_docs_show_commands():
    found = [c for _, line in shown_commands() for c in commands(line) if project_command(c)]
    assert len(found) >= 10, found  # the tour alone shows upload, pack, inspect, train and evaluate


@pytest.mark.parametrize("where,line", shown_commands())
def test_every_shown_command_exists_with_its_flags(where, line):
    for words in commands(line):
        if Path(words[0]).name == "make":
            targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
            for target in (w for w in words[1:] if not w.startswith("-") and "=" not in w):
                assert target in targets, f"{where}: make has no target {target}"
            continue
        found = project_command(words)
        if found is None:
            continue
        argv, rest = found
        text = help_text(*argv)
        for word in rest:
            flag = word.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            if argv == ("-m", "trainer.train") and "." in flag:
                assert flag[2:] in config_fields(), f"{where}: {flag} names no config field"
            else:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                    f"{where}: {flag} is not an option of {' '.join(argv)}"
