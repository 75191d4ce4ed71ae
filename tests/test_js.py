"""The JavaScript side, run from pytest so that the README's one test command covers it.

``clients/js``: the SDK's own tests (node's test runner against real
``dongne serve`` subprocesses, started as ``python3``: this interpreter, put
first on ``PATH``) and its size
budget. ``clients/web``: the web app's type check and unit tests, and its
committed build (``dongne/web/static``) against a fresh one. All need
``npm ci --prefix clients`` first (the README's test command runs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLIENTS = Path(__file__).resolve().parent.parent / "clients"


def npm(workspace: str, script: str, timeout_s: float, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    npm_path = shutil.which("npm")
    if npm_path is None:
        pytest.fail("npm is not installed: the JavaScript tests need Node >= 20 with npm")
    if not (CLIENTS / "node_modules").is_dir():
        pytest.fail("clients/node_modules is missing: run `npm ci --prefix clients` first (see README)")
    # The tests start servers with `python3 -m dongne`: make that this interpreter (its
    # venv, its installed dongne). Not an environment variable: the server reads every
    # DONGNE_* variable as configuration and refuses unknown ones.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    return subprocess.run(
        [npm_path, "run", script, "--silent"],
        cwd=CLIENTS / workspace,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def report(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout ---\n{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-6000:]}"


@pytest.mark.timeout(600)
def test_sdk_suite_passes_against_real_servers(tmp_path: Path) -> None:
    done = npm("js", "test", timeout_s=540, tmp_path=tmp_path)
    assert done.returncode == 0, report(done)
    assert "# fail 0" in done.stdout, report(done)  # node's test runner's summary: it did run


def test_web_app_type_checks_and_its_unit_tests_pass(tmp_path: Path) -> None:
    done = npm("web", "test", timeout_s=120, tmp_path=tmp_path)
    assert done.returncode == 0, report(done)


def test_committed_web_build_matches_its_sources() -> None:
    """dongne/web/static is what clients/web (and the SDK it bundles) builds to, byte for byte."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the JavaScript tests need Node >= 20 with npm")
    if not (CLIENTS / "node_modules").is_dir():
        pytest.fail("clients/node_modules is missing: run `npm ci --prefix clients` first (see README)")
    done = subprocess.run(
        [node, "build.mjs", "--check"], cwd=CLIENTS / "web", capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (
        report(done) + "\nrun `npm run build --prefix clients/web` and commit dongne/web/static"
    )
