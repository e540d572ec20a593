"""Every fenced code block of README.md and cluster/README.md runs here, or says why it cannot.

- ``bash``: each command runs (``&&`` chains and ``\\`` continuations split as bash would), in a fresh
  folder holding ``examples/`` and ``search_spaces/`` (so ``runs/`` and ``sweeps/`` land there), with
  this checkout on ``PYTHONPATH``. Install commands (``pip install``, ``python3.11 -m venv``, activating
  the venv) are not run: the test already runs inside that environment; it prints what it left out.
  ``tokentune train`` and ``tokentune sweep`` (not ``--dry-run``) run with ``SHORT`` appended: the
  same commands, fewer steps and eval documents.
- ``python``: the block runs as a script in such a folder.
- ``yaml``: loaded; a run config is validated by ``RunConfig.from_dict``, a sweep by ``load_spec``
  (its includes relative to ``search_spaces/``).
- a block without a language (a picture or console output): every ``.py`` file it names exists.
A block that cannot run here (a cloud cluster, a GPU, this test suite itself) has
``<!-- readme-test: skip (why) -->`` on the line before it and is reported as skipped with that reason;
any other block that fails fails its test. Blocks that train or sweep are marked ``slow`` (and ``ray``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "cluster/README.md")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>.+)\)\s*-->")
#: appended to commands that train, so a README block runs in seconds (later --set wins; a config that
#: counts epochs gets a step count instead: exactly one of them may be set)
SHORT = {
    ("tokentune", "train"): [
        "--set",
        "train.epochs=null",
        "--set",
        "train.max_steps=12",
        "--set",
        "eval.limit=10",
    ],
    ("tokentune", "sweep"): [
        *("--set", "base.train.epochs=null", "--set", "base.train.max_steps=12"),
        *("--set", "base.eval.limit=10"),
    ],
}
INSTALLS = (("pip", "install"), ("python3.11", "-m", "venv"), (".",), ("source",))


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    text: str
    skip: str | None  # the reason in a readme-test: skip comment right before it


def read_blocks(doc: str) -> list[Block]:
    lines = (REPO / doc).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start = i
        i += 1
        while not lines[i].startswith("```"):
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(before)
        text = "\n".join(lines[start + 1 : i]) + "\n"
        blocks.append(Block(doc, start + 1, lines[start][3:].strip(), text, skip and skip["why"].strip()))
        i += 1
    return blocks


def commands(text: str) -> list[list[str]]:
    """A bash block's simple commands: continuations joined, comments dropped, ``&&`` chains split."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            out.append(tokens[:cut])
            tokens = tokens[cut + 1 :]
    return out


def _trains(block: Block) -> bool:
    if block.lang == "python":
        return "run_sweep(" in block.text
    cmds = commands(block.text) if block.lang == "bash" else []
    return any(
        c[:2] in (["tokentune", "train"], ["tokentune", "sweep"]) and "--dry-run" not in c for c in cmds
    )


def _sweeps(block: Block) -> bool:
    if block.lang == "python":
        return "run_sweep(" in block.text
    cmds = commands(block.text) if block.lang == "bash" else []
    return any(c[:2] == ["tokentune", "sweep"] and "--dry-run" not in c for c in cmds)


def _param(block: Block):
    marks = [] if block.skip else [pytest.mark.slow] * _trains(block) + [pytest.mark.ray] * _sweeps(block)
    return pytest.param(block, id=f"{block.doc}:{block.line}:{block.lang or 'text'}", marks=marks)


BLOCKS = [b for doc in DOCS for b in read_blocks(doc)]


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A fresh folder with the repository's examples and sweep files, as a user's checkout has them."""
    for name in ("examples", "search_spaces"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    # one thread: the tiny default gains nothing from more and loses much to them on a busy 2-core machine
    pythonpath = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path, label: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (
        f"{label} failed with exit status {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )


def run_bash(block: Block, cwd: Path) -> None:
    for cmd in commands(block.text):
        if any(tuple(cmd[: len(i)]) == i for i in INSTALLS):
            print(f"not run: `{shlex.join(cmd)}` (installs; this test runs in the installed environment)")
            continue
        extra = SHORT.get(tuple(cmd[:2]), []) if "--dry-run" not in cmd else []
        exe = [sys.executable, "-m", "orchestrator.cli"] if cmd[0] == "tokentune" else cmd[:1]
        _run([*exe, *cmd[1:], *extra], cwd, f"`{shlex.join(cmd)}` ({block.doc} line {block.line})")


def run_python(block: Block, cwd: Path) -> None:
    (cwd / "readme_block.py").write_text(block.text)
    _run([sys.executable, "readme_block.py"], cwd, f"the python block at {block.doc} line {block.line}")


def check_yaml(block: Block) -> None:
    from orchestrator import load_spec
    from tokentune.config import RunConfig

    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.doc} line {block.line}: not a YAML mapping"
    if set(data) <= set(RunConfig.from_dict({}).to_dict()):
        RunConfig.from_dict(data)
    else:
        load_spec(data, base_dir=REPO / "search_spaces", check_inputs=False)


def check_named_files(block: Block) -> None:
    named = set(re.findall(r"[\w./-]*\w\.py\b", block.text))
    if not named:
        pytest.skip("console output: nothing to run")
    files = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py") if ".git" not in p.parts]
    missing = sorted(n for n in named if not any(f == n or f.endswith("/" + n) for f in files))
    assert not missing, f"{block.doc} line {block.line} names files that do not exist: {missing}"


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_block(block: Block, workspace: Path):
    if block.skip:
        pytest.skip(block.skip)
    if block.lang == "bash":
        run_bash(block, workspace)
    elif block.lang == "python":
        run_python(block, workspace)
    elif block.lang == "yaml":
        check_yaml(block)
    elif block.lang == "":
        check_named_files(block)
    else:
        pytest.fail(f"{block.doc} line {block.line}: no runner for a {block.lang!r} block; mark it skipped")


def test_readme_blocks_are_found():
    """The parser sees the README's blocks (a broken fence would silently hide the rest)."""
    langs = [b.lang for b in BLOCKS if b.doc == "README.md"]
    assert {"bash", "python", "yaml", ""} <= set(langs) and len(langs) >= 8, langs
    commands_seen = commands("a && b c \\\n  d # note\n# only a comment\n")
    assert commands_seen == [["a"], ["b", "c", "d"]], commands_seen


def test_ci_runs_the_readmes_test_command():
    """``.ci/run`` runs exactly the pytest command the README shows, after installing the same extras."""
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"&& (python -m pytest [^\n`]*)", readme)
    assert shown, "the README shows no `... && python -m pytest ...` test command"
    ci = (REPO / ".ci" / "run").read_text()
    ran = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert ran == [shown.group(1).strip()], (ran, shown.group(1))
    assert '".[test,browser]"' in shown.string and '".[test,browser]"' in ci
