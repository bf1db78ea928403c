"""Lazy restore: the opt-in rule, and the supervisor never leaks its lazy-pages daemon."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from warmstart import annotations, lazy
from warmstart.runc import CreateArgs, GlobalOpts, RestoreOpts, RestoreRun, Runc


def spec(ann: dict[str, str], devices: list[str] | None = None) -> dict:
    return {"annotations": ann, "linux": {"devices": [{"path": d} for d in devices or []]}, "mounts": []}


def test_eligible_only_when_asked_and_no_gpu() -> None:
    assert lazy.eligible(spec({}))[0] is False
    assert lazy.eligible(spec({"warmstart.dev/restore": "eager"}))[0] is False
    assert lazy.eligible(spec({"warmstart.dev/restore": "lazy"})) == (True, "lazy")
    ok, why = lazy.eligible(spec({"warmstart.dev/restore": "lazy"}, ["/dev/nvidia0", "/dev/nvidiactl"]))
    assert not ok and "nvidia" in why


def test_annotation_validated() -> None:
    base = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": "x"}
    assert annotations.policy_from_spec({"annotations": {**base, "warmstart.dev/restore": "lazy"}}) is not None
    with pytest.raises(annotations.AnnotationError, match="warmstart.dev/restore"):
        annotations.policy_from_spec({"annotations": {**base, "warmstart.dev/restore": "sometimes"}})


def fake_criu(tmp: Path, body: str) -> Path:
    """A stand-in for `criu lazy-pages`: opens the socket file, then runs body."""
    p = tmp / "criu"
    p.write_text(f"#!/bin/sh\necho $$ > {tmp}/daemon.pid\ntouch {tmp}/work/{lazy.SOCKET}\n{body}\n")
    p.chmod(0o755)
    return p


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    st = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return st != "Z"


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path


def test_abandoned_daemon_is_killed(work: Path) -> None:
    d = lazy.Daemon(fake_criu(work, "sleep 300"), work, work / "work")
    d.start()
    pid = int((work / "daemon.pid").read_text())
    assert alive(pid)
    d.abandon()  # the restore did not happen
    assert wait_dead(pid)


def test_daemon_killed_when_container_dies(work: Path) -> None:
    d = lazy.Daemon(fake_criu(work, "sleep 300"), work, work / "work")
    d.start()
    pid = int((work / "daemon.pid").read_text())
    container = subprocess.Popen(["sleep", "300"])
    d.hand_over(container.pid)
    time.sleep(0.3)
    assert alive(pid)  # still serving pages while the container lives
    container.kill()
    container.wait()
    assert wait_dead(pid, lazy.GRACE_S + 10)


def test_daemon_that_finishes_is_reaped(work: Path) -> None:
    d = lazy.Daemon(fake_criu(work, "sleep 0.2"), work, work / "work")
    d.start()
    pid = int((work / "daemon.pid").read_text())
    container = subprocess.Popen(["sleep", "300"])
    try:
        d.hand_over(container.pid)
        assert wait_dead(pid)  # exited and reaped by the supervisor, not a zombie
        assert wait_dead(d.supervisor)
    finally:
        container.kill()
        container.wait()


def test_daemon_that_fails_to_start(work: Path) -> None:
    bad = work / "criu"
    bad.write_text("#!/bin/sh\necho 'Error (criu/uffd.c:1): no' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(lazy.LazyError):
        lazy.Daemon(bad, work, work / "work").start()


def fake_runc(tmp: Path, rc: int) -> Path:
    """Records the CRIU_PARALLEL_READS it was given (or 'unset') per call, then exits rc."""
    p = tmp / "runc"
    p.write_text(f"#!/bin/sh\necho \"${{CRIU_PARALLEL_READS:-unset}} $*\" >> {tmp}/runc.calls\nexit {rc}\n")
    p.chmod(0o755)
    return p


def _restore(work: Path, rc_path: Path, criu: Path, ann: dict[str, str]):
    rc = Runc(rc_path, GlobalOpts(), criu)
    opts = RestoreOpts(work, work / "work", CreateArgs("c1", work / "bundle"))
    return lazy.run_restore(rc, "c1", opts, RestoreRun(10, env={**os.environ, "CRIU_PARALLEL_READS": "4"}),
                            work, spec(ann))


def test_eager_restore_gets_the_parallel_reads_env(work: Path, monkeypatch) -> None:
    monkeypatch.delenv("CRIU_PARALLEL_READS", raising=False)
    p, how = _restore(work, fake_runc(work, 0), work / "criu", {})
    assert p.returncode == 0 and how.startswith("eager")
    calls = (work / "runc.calls").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith(f"4 --criu {work}/criu restore --detach ") and calls[0].endswith(" c1")
    assert "--lazy-pages" not in calls[0]


def test_lazy_restore_does_not_get_it_but_its_eager_fallback_does(work: Path, monkeypatch) -> None:
    monkeypatch.delenv("CRIU_PARALLEL_READS", raising=False)
    # the lazy attempt fails: the eager fallback runs
    p, how = _restore(work, fake_runc(work, 1), fake_criu(work, "sleep 30"), {"warmstart.dev/restore": "lazy"})
    assert how.startswith("eager after lazy failed")
    calls = [c for c in (work / "runc.calls").read_text().splitlines() if " restore " in c]
    assert calls[0].startswith("unset ") and calls[0].endswith(" --lazy-pages c1")
    assert calls[-1].startswith("4 ") and "--lazy-pages" not in calls[-1]
