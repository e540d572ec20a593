"""The suite's markers are enforced: a test that starts Ray without the `ray` marker fails and says so
(tests/conftest.py: ``ray.init`` refused in-process, a Ray node started by a subprocess found afterwards)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

INNER_TESTS = """
import os
import subprocess
import sys

import pytest
import ray  # as a test module that imports orchestrator does


def test_ray_init_in_process():
    ray.init(num_cpus=1)


def test_ray_started_by_a_subprocess():
    code = "import ray; ray.init(num_cpus=1, include_dashboard=False); ray.shutdown()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240)


@pytest.mark.ray
def test_marked_test_keeps_ray_as_it_is():
    assert ray.init.__module__.startswith("ray") and os.environ.get("RAY_TMPDIR") == "untouched"


def test_unmarked_test_that_leaves_ray_alone():
    assert os.environ["RAY_TMPDIR"] != "untouched"
"""


def _run_inner(tmp_path: Path, tests: str) -> str:
    """Runs ``tests`` of INNER_TESTS in a pytest of their own, under this suite's conftest hooks."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_setup, pytest_runtest_teardown  # noqa: F401\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    ray: starts Ray\n")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": "untouched"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "-k", tests]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400).stdout


def test_ray_init_without_the_ray_marker_fails_the_test(tmp_path):
    out = _run_inner(tmp_path, "not subprocess")
    assert "1 failed, 2 passed, 1 deselected" in out, out
    assert "test_ray_init_in_process calls ray.init but is not marked `ray`: mark it" in out, out
    assert "PASSED test_inner.py::test_marked_test_keeps_ray_as_it_is" in out, out
    assert "PASSED test_inner.py::test_unmarked_test_that_leaves_ray_alone" in out, out


@pytest.mark.ray  # its inner test starts a real Ray node in a subprocess (12 s on a quiet 2-core machine)
def test_a_ray_node_started_by_a_subprocess_fails_an_unmarked_test(tmp_path):
    out = _run_inner(tmp_path, "subprocess")
    assert "1 passed, 3 deselected, 1 error" in out, out
    assert "test_ray_started_by_a_subprocess started a Ray node (session_" in out, out
