"""The pass-through path: argv parsing, the intercept decision, and exec fidelity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from warmstart import launch
from warmstart.launch import fast_settings, needs_intercept, split_argv

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = Path("/opt/warmstart/venv/bin/python3")


# -- split_argv ---------------------------------------------------------------

@pytest.mark.parametrize("argv, sub", [
    (["state", "c1"], 0),
    (["--root", "/run/r", "state", "c1"], 2),
    (["--root=/run/r", "state", "c1"], 1),
    (["-root", "/run/r", "state", "c1"], 2),
    (["-root=/run/r", "kill", "c1"], 1),
    (["--debug", "list"], 1),
    (["--systemd-cgroup", "create", "c1"], 1),
    (["--log-format", "json", "delete", "c1"], 2),
    (["--log-format=json", "delete", "c1"], 1),
    (["--criu", "/usr/local/sbin/criu", "start", "c1"], 2),
    (["--log", "/run/x/log.json", "--log-format", "json", "--root", "/run/containerd/runc/k8s.io",
      "--systemd-cgroup", "--debug", "create", "--bundle", "/b", "c1"], 8),
    (["--rootless", "auto", "list"], 2),
    (["--debug", "--root", "create", "start"], 3),  # the value of --root is never the subcommand
    (["-", "x"], 0),
])
def test_split_argv_finds_subcommand(argv, sub):
    assert split_argv(argv) == sub


@pytest.mark.parametrize("argv", [[], ["--debug"], ["--root", "/r"], ["--root"], ["--version"]])
def test_split_argv_no_subcommand(argv):
    assert split_argv(argv) == -1


# -- needs_intercept -----------------------------------------------------------

def _bundle(tmp_path: Path, annotations: dict | None, name: str = "bundle") -> Path:
    b = tmp_path / name
    b.mkdir()
    spec = {"ociVersion": "1.1.0", "process": {"args": ["sleep", "1"]}, "root": {"path": "rootfs"}}
    if annotations is not None:
        spec["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(spec))
    return b


@pytest.fixture
def settings(tmp_path):
    sd = tmp_path / "state"
    (sd / "containers").mkdir(parents=True)
    return {"runc": "/nonexistent/runc", "state_dir": str(sd)}


def _call(argv, settings):
    i = split_argv(argv)
    assert i >= 0
    return needs_intercept(argv, i, settings)


@pytest.mark.parametrize("form", ["--bundle {b}", "--bundle={b}", "-bundle {b}", "-bundle={b}", "-b {b}", "-b={b}"])
def test_create_opted_in_bundle_forms(tmp_path, settings, form):
    b = _bundle(tmp_path, {"warmstart.dev/checkpoint": "on-stop"})
    argv = ["--root", "/r", "create", *form.format(b=b).split(), "--pid-file", "/p", "c1"]
    assert _call(argv, settings) is True


def test_client_restore_of_an_opted_in_bundle_is_intercepted(tmp_path, settings):
    """podman's own `container restore`: warmstart makes the container's state again (intercept.client_restore)."""
    b = _bundle(tmp_path, {"warmstart.dev/checkpoint": "on-stop"})
    argv = ["restore", "--image-path", "/ckpt", "--work-path", "/w", "--bundle", str(b), "--detach", "c1"]
    assert _call(argv, settings) is True
    plain = _bundle(tmp_path, {}, "plain")
    assert _call(["restore", "--image-path", "/ckpt", "--bundle", str(plain), "c1"], settings) is False


def test_create_not_opted_in(tmp_path, settings):
    b = _bundle(tmp_path, {"io.kubernetes.cri.container-type": "container", "other.dev/x": "y"})
    assert _call(["create", "--bundle", str(b), "c1"], settings) is False
    b2 = _bundle(tmp_path, None, "b2")
    assert _call(["create", "--bundle", str(b2), "c1"], settings) is False


def test_create_missing_bundle_or_config(tmp_path, settings):
    assert _call(["create", "--bundle", str(tmp_path / "nope"), "c1"], settings) is False
    (tmp_path / "empty").mkdir()
    assert _call(["create", "-b", str(tmp_path / "empty"), "c1"], settings) is False


def test_create_default_bundle_is_cwd(tmp_path, settings, monkeypatch):
    b = _bundle(tmp_path, {"warmstart.dev/checkpoint": "on-stop"})
    monkeypatch.chdir(b)
    assert _call(["create", "c1"], settings) is True
    monkeypatch.chdir(tmp_path)
    assert _call(["create", "c1"], settings) is False


@pytest.mark.parametrize("sub", ["start", "kill", "delete"])
def test_start_kill_delete_by_state_dir(settings, sub):
    state = Path(settings["state_dir"])
    argv = {"start": ["start", "c1"], "kill": ["kill", "c1", "TERM"], "delete": ["delete", "--force", "c1"]}[sub]
    assert _call(["--root", "/r"] + argv, settings) is False
    (state / "containers" / "c1").mkdir()
    assert _call(["--root", "/r"] + argv, settings) is True
    # another container, same op: not ours
    other = [("c2" if a == "c1" else a) for a in argv]
    assert _call(other, settings) is False


@pytest.mark.parametrize("cid", ["..", ".", "a/b", "../containers", "/abs", "x/.."])
def test_hostile_ids_never_intercepted(settings, cid):
    state = Path(settings["state_dir"])
    # make every path the id could reach a directory, so only the id check can say no
    (state / "containers" / "a" / "b").mkdir(parents=True)
    (state / "containers" / "x").mkdir(exist_ok=True)
    for sub in ("start", "kill", "delete"):
        assert _call([sub, cid], settings) is False, (sub, cid)


def test_no_positional_not_intercepted(settings):
    assert _call(["delete", "--force"], settings) is False
    assert _call(["kill", "--all"], settings) is False


def test_state_file_instead_of_dir_not_intercepted(settings):
    (Path(settings["state_dir"]) / "containers" / "c1").write_text("")
    assert _call(["start", "c1"], settings) is False


# -- fast_settings ---------------------------------------------------------------

def _cfg(tmp_path, monkeypatch, text: str) -> None:
    p = tmp_path / "config.toml"
    p.write_text(text)
    monkeypatch.setenv("WARMSTART_CONFIG", str(p))


def test_fast_settings_defaults_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CONFIG", str(tmp_path / "nope.toml"))
    assert fast_settings() == launch.DEFAULTS


def test_fast_settings_reads_top_level_keys(tmp_path, monkeypatch):
    _cfg(tmp_path, monkeypatch, '# c\nstore = "/s"\n  runc = "/opt/runc"  \nstate_dir=\'/run/ws\'\n')
    assert fast_settings() == {"runc": "/opt/runc", "state_dir": "/run/ws"}


def test_fast_settings_stops_at_first_table(tmp_path, monkeypatch):
    _cfg(tmp_path, monkeypatch, 'runc = "/a/runc"\n[other]\nstate_dir = "/nope"\nrunc = "/b/runc"\n')
    assert fast_settings() == {"runc": "/a/runc", "state_dir": "/run/warmstart"}


def test_fast_settings_ignores_unquoted_and_mismatched(tmp_path, monkeypatch):
    _cfg(tmp_path, monkeypatch, 'runc = /x/runc\nstate_dir = "/run/x\'\n')
    assert fast_settings() == launch.DEFAULTS


def test_fast_settings_bad_utf8_defaults(tmp_path, monkeypatch):
    p = tmp_path / "config.toml"
    p.write_bytes(b'runc = "/x\xff"\n')
    monkeypatch.setenv("WARMSTART_CONFIG", str(p))
    assert fast_settings() == launch.DEFAULTS


def test_fast_settings_trailing_comment_agrees_with_config_load(tmp_path, monkeypatch):
    from warmstart import config
    _cfg(tmp_path, monkeypatch, 'runc = "/opt/bin/runc"  # patched runc\n')
    assert str(config.load().runc) == "/opt/bin/runc"
    assert fast_settings()["runc"] == "/opt/bin/runc"


def test_empty_warmstart_config_env_agrees(monkeypatch):
    from warmstart import config
    monkeypatch.setenv("WARMSTART_CONFIG", "")
    config.load()  # launch.fast_settings() treats '' as unset; load() must too


# -- real exec through the launcher ------------------------------------------------

FAKE_RUNC = """#!/bin/bash
out="$(dirname "$0")"
: > "$out/argv"
for a in "$@"; do printf '%s\\n' "$a" >> "$out/argv"; done
cat > "$out/stdin"
exit 7
"""


@pytest.fixture
def fake_node(tmp_path):
    d = tmp_path / "fake"
    d.mkdir()
    runc = d / "runc"
    runc.write_text(FAKE_RUNC)
    runc.chmod(0o755)
    state = tmp_path / "state"
    (state / "containers").mkdir(parents=True)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'runc = "{runc}"\nstate_dir = "{state}"\n')
    return d, cfg, state


def _launch(cfg: Path, argv: list[str], stdin: bytes = b"") -> int:
    env = {"PATH": "/usr/bin:/bin", "WARMSTART_CONFIG": str(cfg)}
    p = subprocess.run([str(VENV_PY), "-IS", str(ROOT / "runtime" / "warmstart" / "launch.py"), *argv],
                       input=stdin, env=env, capture_output=True, timeout=30)
    return p.returncode


@pytest.mark.parametrize("argv, stdin", [
    (["--root", "/run/containerd/runc/k8s.io", "--log-format", "json", "state", "c1"], b""),
    (["--root=/r", "list", "--format", "json"], b""),
    (["--debug", "--systemd-cgroup", "kill", "c1", "SIGTERM"], b""),
    (["--root", "/r", "delete", "--force", "c1"], b""),
    (["exec", "--process", "/tmp/proc.json", "--detach", "--pid-file", "/p", "c1"], b""),
    (["--root", "/r", "update", "--resources", "-", "c1"], b'{"memory": {"limit": 1048576}}\n\x00\xff'),
    (["--version"], b""),
    ([], b""),
    (["weird arg with spaces", "--", "", "ünïcode"], b"x" * 100_000),
])
def test_launcher_execs_runc_unchanged(fake_node, argv, stdin):
    d, cfg, _ = fake_node
    assert _launch(cfg, argv, stdin) == 7
    seen = (d / "argv").read_text().split("\n")[:-1]
    assert seen == argv
    assert (d / "stdin").read_bytes() == stdin


def test_launcher_create_not_opted_in_passes_through(fake_node, tmp_path):
    d, cfg, _ = fake_node
    b = _bundle(tmp_path, {"other.dev/x": "1"})
    argv = ["--root", "/r", "--log", str(tmp_path / "log.json"), "--log-format", "json", "create",
            "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "c1"]
    assert _launch(cfg, argv) == 7
    assert (d / "argv").read_text().split("\n")[:-1] == argv


def test_launcher_start_kill_delete_of_foreign_container(fake_node):
    d, cfg, state = fake_node
    (state / "containers" / "ours").mkdir()
    for argv in (["start", "theirs"], ["kill", "theirs", "9"], ["delete", "theirs"], ["kill", "../containers/ours"]):
        assert _launch(cfg, argv) == 7
        assert (d / "argv").read_text().split("\n")[:-1] == argv


def test_launch_imports_only_os_and_sys():
    """The fast path must not import the package (or anything heavy) at module load."""
    src = (ROOT / "runtime" / "warmstart" / "launch.py").read_text()
    top_imports = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert top_imports == ["import os", "import sys"]


def test_launch_defaults_agree_with_config_defaults():
    from warmstart.config import Settings
    assert launch.DEFAULTS == {"runc": str(Settings().runc), "state_dir": str(Settings().state_dir)}
