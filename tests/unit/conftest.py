"""Make the unit tests import the *repo* copy of warmstart, not the installed one.

The venv has warmstart installed non-editable; these tests must exercise the
working tree, so the package objects are built from runtime/, runtime/cli/ and
hooks/ before any test module imports them.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_pkg(name: str, directory: Path):
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_ws = _load_pkg("warmstart", ROOT / "runtime")
_cli = _load_pkg("warmstart.cli", ROOT / "runtime" / "cli")
_hooks = _load_pkg("warmstart.hooks", ROOT / "hooks")
_ws.cli = _cli
_ws.hooks = _hooks

assert Path(_ws.__file__).resolve() == ROOT / "runtime" / "__init__.py", _ws.__file__
assert Path(_cli.__file__).resolve() == ROOT / "runtime" / "cli" / "__init__.py", _cli.__file__


def pytest_report_header(config):
    return f"warmstart under test: {_ws.__file__}"


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
