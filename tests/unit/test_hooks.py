"""warmstart-hook (poststop) and its injection: releases a container's state once runc destroyed it, never
anything else, never while warmstart still uses it, and never fails the container's stop."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from warmstart import container, intercept, procfs
from warmstart.hooks import main as hook
from warmstart.state import StateDir


RUNC_DELETE = b"runc\0--root\0/run/containerd/runc/k8s.io\0--log\0/x/log.json\0delete\0--force\0c1\0"


@pytest.fixture
def node(tmp_path, monkeypatch) -> Path:
    """A node config whose state_dir and log_dir are under tmp_path; returns the state_dir."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/logs"\n')
    monkeypatch.setenv("WARMSTART_CONFIG", str(cfg))
    return tmp_path / "state"


def make(state_dir: Path, cid: str = "c1") -> StateDir:
    sd = StateDir(state_dir, cid)
    sd.create()
    (sd.path / "state.json").write_text("{}")
    (sd.work / "restore").mkdir(parents=True)
    return sd


def run(monkeypatch, argv: list[str], state) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(state if isinstance(state, str) else json.dumps(state)))
    return hook.main(argv)


def logged(tmp_path: Path) -> list[str]:
    p = tmp_path / "logs" / "runtime.log"
    return [json.loads(x)["msg"] for x in p.read_text().splitlines()] if p.exists() else []


def test_poststop_removes_the_state_dir_and_is_idempotent(node, monkeypatch, tmp_path):
    sd = make(node)
    assert run(monkeypatch, ["poststop", "--state-dir", str(sd.path)], {"id": "c1", "status": "stopped"}) == 0
    assert not sd.path.exists() and (node / "containers").is_dir()
    # delete came first, or the hook runs twice: nothing to do, still exit 0
    assert hook.poststop({"id": "c1"}, sd.path, RUNC_DELETE) == "absent"
    assert run(monkeypatch, ["poststop"], {"id": "c1"}) == 0
    assert logged(tmp_path) == []


def test_poststop_without_state_dir_argument_derives_it(node, monkeypatch):
    """As a hooks.d file runs it: the dir comes from the config and the state's id."""
    sd = make(node)
    assert hook.poststop({"id": "c1"}, None, RUNC_DELETE) == "removed"
    assert not sd.path.exists()


def test_poststop_stops_the_on_ready_supervisor(node):
    sd = make(node)
    sup = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "warmstart.supervisor", str(sd.path)])
    try:
        deadline = time.monotonic() + 10  # exec'd: until then its cmdline is ours, and not a supervisor's
        while b"warmstart.supervisor" not in Path(f"/proc/{sup.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sd.supervisor_pid.write_text(str(sup.pid))
        assert hook.poststop({"id": "c1"}, sd.path, RUNC_DELETE) == "removed"
        assert sup.wait(timeout=10) == -15
    finally:
        sup.kill()


def test_a_supervisor_pid_file_naming_another_process_kills_nothing(node):
    sd = make(node)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sd.supervisor_pid.write_text(str(other.pid))
        assert hook.poststop({"id": "c1"}, sd.path, RUNC_DELETE) == "removed"
        time.sleep(0.1)
        assert other.poll() is None
    finally:
        other.kill()


@pytest.mark.parametrize("caller", [
    b"/usr/sbin/runc\0--root\0/r\0--log\0/l\0--log-format\0json\0--criu\0/usr/local/sbin/criu\0checkpoint\0"
    b"--image-path\0/s\0c1\0",
    b"runc\0--root=/r\0restore\0--detach\0--bundle\0/b\0c1\0",
    b"crun\0--root\0/r\0checkpoint\0c1\0",
])
def test_poststop_inside_a_dump_or_restore_keeps_the_state(node, caller):
    """runc checkpoint destroys the container mid-dump; warmstart still reads the baseline and saves state after."""
    sd = make(node)
    assert hook.poststop({"id": "c1"}, sd.path, caller).startswith("kept: run by")
    assert (sd.path / "state.json").exists()


def test_poststop_while_the_runtime_holds_the_dir_keeps_it(node):
    """A failed restore's cleanup runs `runc delete --force` (the undo journal must survive it); warmstart-runtime's
    own delete removes the dir itself."""
    sd = make(node)
    assert sd.busy_lock.name == hook.BUSY_LOCK
    fd = sd.hold_busy()
    try:
        assert hook.poststop({"id": "c1"}, sd.path, RUNC_DELETE) == "kept: warmstart-runtime is working on it"
        assert (sd.path / "state.json").exists()
    finally:
        os.close(fd)
    assert hook.poststop({"id": "c1"}, sd.path, RUNC_DELETE) == "removed"


@pytest.mark.parametrize("cmdline,sub", [
    (RUNC_DELETE, "delete"), (b"runc\0-debug\0--log=/x\0state\0c\0", "state"), (b"runc\0", None), (b"", None),
    (b"/usr/bin/podman\0--root\0/var/lib/containers\0container\0cleanup\0c1\0", "container")])
def test_subcommand(cmdline, sub):
    assert hook.subcommand(cmdline) == sub


def test_poststop_refuses_what_is_not_a_state_dir_of_this_node(node, monkeypatch, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    sd = make(node)
    hostile = [
        (["poststop", "--state-dir", str(victim)], {"id": "c1"}),  # a forged --state-dir
        (["poststop", "--state-dir", str(node / "containers" / ".." / "containers" / "c1")], {"id": "c1"}),
        (["poststop", "--state-dir", str(node)], {"id": ""}),
        (["poststop"], {"id": ".."}),
        (["poststop"], {"id": "../../victim"}),
        (["poststop"], {"id": 7}),
        (["poststop"], ["c1"]),
        (["poststop"], "not json"),
    ]
    for argv, state in hostile:
        assert run(monkeypatch, argv, state) == 0
    assert (victim / "keep").exists() and (sd.path / "state.json").exists()
    assert len(logged(tmp_path)) == len(hostile)

    (node / "containers" / "evil").symlink_to(victim)  # a symlink where a state dir should be
    assert run(monkeypatch, ["poststop"], {"id": "evil"}) == 0
    assert (victim / "keep").exists()
    assert "not a plain directory" in logged(tmp_path)[-1]


def test_poststop_refuses_a_symlinked_containers_dir(node, monkeypatch, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "c1").mkdir(parents=True)
    (elsewhere / "c1" / "keep").write_text("x")
    node.mkdir()
    (node / "containers").symlink_to(elsewhere)
    assert run(monkeypatch, ["poststop"], {"id": "c1"}) == 0
    assert (elsewhere / "c1" / "keep").exists()
    assert "not a plain directory" in logged(tmp_path)[-1]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_poststop_never_removes_through_a_mount(node, monkeypatch, tmp_path, mounts):
    sd = make(node)
    inside = mounts("-t", "tmpfs", "tmpfs", target=sd.work / "restore" / "yard")
    (inside / "keep").write_text("x")
    assert run(monkeypatch, ["poststop"], {"id": "c1"}) == 0
    assert (inside / "keep").exists()
    assert "CrossesMount" in logged(tmp_path)[-1]
    assert procfs.mounts_under(sd.path)


@pytest.mark.parametrize("argv", [["createRuntime", "--state-dir", "/"], ["prestart"], ["bogus"], []])
def test_other_stages_of_earlier_versions_do_nothing(node, monkeypatch, argv):
    sd = make(node)
    assert run(monkeypatch, argv, {"id": "c1", "pid": os.getpid()}) == 0
    assert sorted(p.name for p in sd.path.iterdir()) == ["state.json", "work"]


def test_a_config_that_does_not_parse_still_exits_zero(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text('state_dir = "relative"\nthis is not toml\n')
    monkeypatch.setenv("WARMSTART_CONFIG", str(cfg))
    assert run(monkeypatch, ["poststop"], {"id": "c1"}) == 0
    assert "warmstart-hook: warning:" in capsys.readouterr().err


# -- injection ------------------------------------------------------------------

def poststops(spec: dict) -> list[dict]:
    return (spec.get("hooks") or {}).get("poststop", [])


def test_inject_adds_one_poststop_and_no_create_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CONFIG", "/etc/x.toml")
    sd = StateDir(tmp_path, "c1")
    other = {"path": "/usr/bin/nvidia-ctk", "args": ["nvidia-ctk", "hook"]}
    spec = {"annotations": {"a": "b"}, "hooks": {"createContainer": [other], "poststop": [other]}}
    once = container.inject(spec, sd)
    assert once["annotations"] == {"a": "b", "org.criu.config": str(sd.criu_conf)}
    assert once["hooks"]["createContainer"] == [other] and "createRuntime" not in once["hooks"]
    assert poststops(once)[0] == other and len(poststops(once)) == 2
    ours = poststops(once)[1]
    assert ours["args"][1:] == ["-IS", ours["args"][2], "poststop", "--state-dir", str(sd.path)]
    assert ours["args"][2].endswith("/hooks/main.py") and ours["env"] == ["WARMSTART_CONFIG=/etc/x.toml"]
    assert container.inject(once, sd) == once, "injected twice: two runs per delete"
    assert spec["hooks"]["poststop"] == [other], "the caller's spec is not modified"


@pytest.mark.parametrize("theirs", [
    {"path": "/usr/local/bin/warmstart-hook", "args": ["warmstart-hook", "poststop"]},
    {"path": "/opt/warmstart/venv/bin/python3",
     "args": ["python3", "-IS", "/opt/warmstart/venv/lib/python3.11/site-packages/warmstart/hooks/main.py", "poststop"]},
])
def test_inject_leaves_a_spec_that_carries_warmstarts_poststop_alone(tmp_path, theirs):
    """An engine's hooks.d put warmstart's hook there already: one run per delete, not two."""
    spec = {"hooks": {"poststop": [theirs]}}
    assert poststops(container.inject(spec, StateDir(tmp_path, "c1"))) == [theirs]


def test_inject_without_config_env_sets_no_env(tmp_path, monkeypatch):
    monkeypatch.delenv("WARMSTART_CONFIG")
    assert "env" not in poststops(container.inject({}, StateDir(tmp_path, "c1")))[0]


def test_the_busy_lock_is_held_until_exec(tmp_path):
    """create holds it until it execs runc (close-on-exec): a failed cold create's poststop then cleans up."""
    sd = StateDir(tmp_path, "c1")
    sd.create()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "warmstart").symlink_to(Path(intercept.__file__).resolve().parent)  # the repo's runtime/warmstart/
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from warmstart.state import StateDir; StateDir(Path(sys.argv[1]), 'c1').hold_busy(); "
            "print('held', flush=True); sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '30'])")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(pkg)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "held\n"
        assert hook.busy(sd.path), "held by a live process"
        p.stdin.write("go\n")
        p.stdin.flush()
        deadline = time.monotonic() + 30  # /proc/PID/exe changes a moment before exec closes the fds
        while os.path.basename(os.readlink(f"/proc/{p.pid}/exe")) != "sleep" or hook.busy(sd.path):
            assert time.monotonic() < deadline, "not released at exec"
            time.sleep(0.02)
        assert p.poll() is None, "released by the exec, not by an exit"
    finally:
        p.kill()
        p.wait()
