"""Make the unit tests import the *repo* copy of warmstart, not the installed one.

The venv has warmstart installed non-editable; these tests must exercise the working tree, so
runtime/ (where the package lives as runtime/warmstart/) goes first on sys.path before any test
module imports it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "runtime"))

import warmstart  # noqa: E402 - after the path

assert Path(warmstart.__file__).resolve() == ROOT / "runtime" / "warmstart" / "__init__.py", (
    f"warmstart was imported from {warmstart.__file__} before this conftest put the repo first")


def pytest_report_header(config):
    return f"warmstart under test: {warmstart.__file__}"


@pytest.fixture(autouse=True)
def _no_node_config(monkeypatch, tmp_path):
    """Never read the node's /etc/warmstart/config.toml or WARMSTART_STORE from a unit test."""
    monkeypatch.setenv("WARMSTART_CONFIG", str(tmp_path / "absent-config.toml"))
    monkeypatch.delenv("WARMSTART_STORE", raising=False)


@pytest.fixture
def mounts():
    """Mount helper that unmounts everything it mounted (innermost first) at teardown."""
    done: list[Path] = []

    def mount(*args: str, target: Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
        done.append(target)
        return target

    yield mount
    for t in reversed(done):
        r = subprocess.run(["umount", str(t)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(t)], capture_output=True)


def is_root() -> bool:
    return os.geteuid() == 0
