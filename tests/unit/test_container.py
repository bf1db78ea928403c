"""The restore and dump decisions of a Container, with a fake runc: no root, no CRIU.

What is real: the state dir, the store (its locks, quarantine counts, dump-failure records, and a
checkpoint's publish with its signature), the rootfs baseline and diff of a plain-directory rootfs.
What is fake: runc (FakeRunc records each call and answers as told), and for the restore side the
checks that need CRIU images (open_verified, refusal, the mount plan).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from warmstart import annotations, container, fleet, restore, signing
from warmstart.budget import CreateBudget, Limit
from warmstart.config import RegistrySettings, Settings
from warmstart.container import Bundle, Container, IllegalTransition, Status
from warmstart.dump import DumpOutcome
from warmstart.log import Logger
from warmstart.mounts import MountPlan
from warmstart.runc import CheckpointOpts, CreateArgs, GlobalOpts, RestoreOpts, RestoreRun
from warmstart.spec import Spec
from warmstart.store import ROOTFS_DIFF, Checkpoint, Store

CID = "unit-ck"
CTR = "ws-unit-container-7f3a"  # also its cgroup path (/CTR): must name no real cgroup of the host


class Passthrough(Exception):
    """FakeRunc's exec of the caller's argv: in the runtime, the process becomes runc here."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv)
        self.argv = argv


def done(code: int = 0, stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], code, "", stderr)


@dataclass
class FakeRunc:
    """Stands in for runc.Runc: records (verb, id) per call; restore/checkpoint/exec answer as told."""
    root: Path
    restore_code: int = 0
    checkpoint_answer: Any = 0  # an exit code, or an exception to raise (a timeout)
    exec_code: int = 0
    restore_error: str = ""  # written to the restore's runc log, as runc logs its error
    log: Path | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    deadlines: list[Limit | float] = field(default_factory=list)  # each restore's and exec's, as runc would get it
    g: GlobalOpts = field(default_factory=GlobalOpts)
    criu: Path = Path("/nonexistent/criu")

    def verbs(self) -> list[str]:
        return [v for v, _ in self.calls]

    def logging_to(self, log: Path) -> "FakeRunc":
        self.log = log
        return self

    def restore(self, container_id: str, opts: RestoreOpts, run: RestoreRun) -> subprocess.CompletedProcess:
        self.calls.append(("restore", container_id))
        self.deadlines.append(run.limit())
        if self.restore_code == 0 and opts.of.pid_file:
            Path(opts.of.pid_file).write_text("999999999")  # no such process: nothing may act on it
        if self.restore_error and self.log is not None:
            self.log.write_text(json.dumps({"level": "error", "msg": self.restore_error}) + "\n")
        return done(self.restore_code, "restore failed")

    def discard_failed_restore(self, container_id: str) -> list[str]:
        self.calls.append(("discard", container_id))
        return []

    def exec(self, container_id: str, process: Path, timeout: float) -> subprocess.CompletedProcess:
        self.calls.append(("exec", container_id))
        self.deadlines.append(timeout)
        return done(self.exec_code, "hook said no")

    def state(self, container_id: str) -> dict | None:
        self.calls.append(("state", container_id))
        return None

    def pause(self, container_id: str) -> subprocess.CompletedProcess:
        self.calls.append(("pause", container_id))
        return done()

    def resume(self, container_id: str) -> subprocess.CompletedProcess:
        self.calls.append(("resume", container_id))
        return done()

    def checkpoint(self, container_id: str, opts: CheckpointOpts, timeout: float) -> subprocess.CompletedProcess:
        self.calls.append(("checkpoint", container_id))
        assert opts.leave_running, "every dump warmstart makes leaves the container running"
        if isinstance(self.checkpoint_answer, BaseException):
            raise self.checkpoint_answer
        (opts.image_path / "pages-1.img").write_bytes(b"pages")
        return done(self.checkpoint_answer, "checkpoint failed")

    def exec_passthrough(self, argv: list[str]) -> None:
        self.calls.append(("passthrough", argv[-1]))
        raise Passthrough(argv)

    def passthrough(self, argv: list[str]) -> int:
        self.calls.append(("passthrough", argv[-1]))
        return 0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    signing.keygen(tmp_path / "node.key", tmp_path / "node.pub")
    return Settings(store=tmp_path / "store", seal_dir=tmp_path / "seals", state_dir=tmp_path / "state",
                    log_dir=tmp_path / "log", runc=Path("/nonexistent/runc"), criu=Path("/nonexistent/criu"),
                    max_restore_failures=2, signing_key=tmp_path / "node.key", trusted_keys=(tmp_path / "node.pub",))


@pytest.fixture
def fake(tmp_path: Path) -> FakeRunc:
    return FakeRunc(tmp_path / "runc-root")


def bundle(tmp_path: Path, mode: str = "on-stop", extra: dict[str, str] | None = None) -> Bundle:
    b = tmp_path / "bundle"
    (b / "rootfs" / "app").mkdir(parents=True, exist_ok=True)
    (b / "rootfs" / "app" / "state").write_text("cold")
    spec = {"ociVersion": "1.0.2", "process": {"args": ["/app/worker"], "env": ["PATH=/bin"], "cwd": "/"},
            "root": {"path": "rootfs"}, "mounts": [],  # no hostname: the restore sets none
            "annotations": {"warmstart.dev/checkpoint": mode, "warmstart.dev/id": CID, **(extra or {})},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}
    (b / "config.json").write_text(json.dumps(spec))
    policy = annotations.policy_from_spec(spec)
    assert policy is not None
    c = CreateArgs(CTR, b, pid_file=str(tmp_path / "pid"))
    return Bundle(c, b / "config.json", spec, Spec(spec), policy, "_local")


def new(settings: Settings, fake: FakeRunc, tmp_path: Path, **kw: Any) -> Container:
    ct = Container.new(settings, fake, Logger(settings.log_dir), bundle(tmp_path, **kw))  # type: ignore[arg-type]
    if ct.busy_fd is not None:  # as if this create's process had exited: the next create may take it
        os.close(ct.busy_fd)
        ct.busy_fd = None
    return ct


def loaded(settings: Settings, fake: FakeRunc) -> Container:
    """The container as a later call (kill, start, the supervisor) finds it: from its state dir."""
    return Container.of(settings, fake, Logger(settings.log_dir), CTR)  # type: ignore[arg-type]


# -- restore: the decision at create --------------------------------------------------

@pytest.fixture
def checkpoint(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A checkpoint in the store as far as create can tell; `refuse` sets what the compatibility check says."""
    store = Store(settings, "_local")
    path = tmp_path / "ckpt"
    path.mkdir()
    verdict: dict[str, str | None] = {"why": None}
    monkeypatch.setattr(container, "locate", lambda *a: store)
    monkeypatch.setattr(Store, "open_verified", lambda self, cid, full=False: Checkpoint(cid, path, {}, "test"))
    monkeypatch.setattr(restore, "refusal", lambda *a: verdict["why"])
    monkeypatch.setattr(restore.mounts, "plan", lambda *a, **k: MountPlan())
    monkeypatch.setattr(restore.rootfs, "apply", lambda *a: None)

    class Handle:
        def refuse(self, why: str) -> None:
            verdict["why"] = why

        def failures(self) -> int:
            return int(store.quarantine_state(CID).get("failures") or 0)
    return Handle()


def test_restore_replaces_create_and_is_recorded_once(settings, fake, tmp_path, checkpoint):
    ct = new(settings, fake, tmp_path)
    assert ct.create(["create", "--bundle", "b", CTR]) == 0
    assert fake.verbs() == ["restore"], "no runc create: the restore took its place"
    assert ct.status is Status.RESTORED
    assert ct.sd.restored_marker.read_text() == CID  # the one record: launch.py stats it for `start`
    saved = json.loads((ct.sd.path / "state.json").read_text())
    assert saved["status"] == "created" and saved["cgroup_path"] == f"/{CTR}"
    assert loaded(settings, fake).status is Status.RESTORED
    assert checkpoint.failures() == 0
    assert not ct.sd.criu_conf.exists(), "the restore's CRIU options must not reach a later checkpoint"


def test_refused_checkpoint_means_no_runc_restore_and_a_cold_create(settings, fake, tmp_path, checkpoint):
    checkpoint.refuse("runc version differs")
    ct = new(settings, fake, tmp_path)
    with pytest.raises(Passthrough) as e:
        ct.create(["create", "--bundle", "b", CTR])
    assert e.value.argv == ["create", "--bundle", "b", CTR], "the cold create gets the caller's argv unchanged"
    assert fake.verbs() == ["passthrough"]
    assert checkpoint.failures() == 0, "a refusal is about this container: it never counts towards quarantine"
    assert not ct.sd.restored_marker.exists() and loaded(settings, fake).status is Status.CREATED


def test_failed_restore_is_cleaned_up_counted_and_created_cold(settings, fake, tmp_path, checkpoint):
    fake.restore_code = 1
    ct = new(settings, fake, tmp_path)
    with pytest.raises(Passthrough):
        ct.create(["create", CTR])
    assert fake.verbs() == ["restore", "discard", "passthrough"]
    assert checkpoint.failures() == 1
    assert not Path(ct.st.pid_file).exists() and not ct.sd.restored_marker.exists()
    assert loaded(settings, fake).status is Status.CREATED


def test_restore_of_an_id_runc_already_has_cleans_only_what_this_create_made(settings, fake, tmp_path, checkpoint):
    """runc refused the restore because another container holds the id (a create that did not wait for
    createlock: a plain one, runc called directly): its runc state, cgroup and pid file are not this
    create's to clean up.  This create's own state dir goes, and runc gets the call to fail as it does."""
    fake.restore_code = 1
    fake.restore_error = f"{restore.ID_TAKEN}"
    ct = new(settings, fake, tmp_path)
    Path(ct.st.pid_file).write_text("4242")  # the other container's (one bundle, a client's retry)
    with pytest.raises(Passthrough) as e:
        ct.create(["create", CTR])
    assert e.value.argv == ["create", CTR]
    assert fake.verbs() == ["restore", "passthrough"], "no runc delete --force of the other container's id"
    assert Path(ct.st.pid_file).read_text() == "4242"
    assert not ct.sd.path.exists(), "this create's state would make the other container look opted in"
    assert checkpoint.failures() == 0, "not the checkpoint's fault"


def test_repeated_failures_quarantine_the_checkpoint(settings, fake, tmp_path, checkpoint):
    fake.restore_code = 1
    for _ in range(2):  # max_restore_failures
        with pytest.raises(Passthrough):
            new(settings, fake, tmp_path).create(["create", CTR])
    fake.calls.clear()
    with pytest.raises(Passthrough):
        new(settings, fake, tmp_path).create(["create", CTR])
    assert fake.verbs() == ["passthrough"], "a quarantined checkpoint is not even tried"


def test_worker_hook_failure_is_a_cold_start_not_counted(settings, fake, tmp_path, checkpoint):
    fake.exec_code = 3
    ct = new(settings, fake, tmp_path, extra={"warmstart.dev/post-restore": "wake-up"})
    with pytest.raises(Passthrough):
        ct.create(["create", CTR])
    assert fake.verbs() == ["restore", "exec", "discard", "passthrough"]
    assert checkpoint.failures() == 0, "the worker's own hook failed, not the checkpoint"
    assert not ct.sd.restored_marker.exists()


def test_rootfs_diff_undone_when_the_restore_fails(settings, fake, tmp_path, checkpoint, monkeypatch):
    undone: list[Path] = []
    monkeypatch.setattr(restore.rootfs, "undo", lambda rootfs_dir, journal: undone.append(rootfs_dir))
    fake.restore_code = 1
    ct = new(settings, fake, tmp_path)
    with pytest.raises(Passthrough):
        ct.create(["create", CTR])
    assert undone == [Path(ct.st.rootfs)]


# -- the create's budget (budget.py): every wait of the restore cut to what is left --------------

def gone(ct: Container, seconds: float) -> Container:
    """As if `seconds` of the create had gone already (a slow pull, a lock wait)."""
    ct.budget = CreateBudget(100, time.monotonic() - seconds)
    return ct


def runtime_msgs(settings: Settings) -> list[str]:
    return [json.loads(line)["msg"] for line in (settings.log_dir / "runtime.log").read_text().splitlines()]


def test_the_restore_gets_its_own_deadline_when_the_budget_has_room(settings, fake, tmp_path, checkpoint):
    settings = dataclasses.replace(settings, restore_timeout_s=60)
    assert new(settings, fake, tmp_path).create(["create", CTR]) == 0
    assert fake.deadlines == [Limit(60, "restore_timeout_s in the config")]


def test_the_restore_after_a_slow_pull_gets_only_what_is_left(settings, fake, tmp_path, checkpoint):
    """30 s gone (pull_deadline_s) + restore_timeout_s 90 would end past kubelet's 2 minutes: the restore
    gets 100 - 10 (kept for the cold start) - 30 = 60 s, and its timeout names the budget."""
    gone(new(settings, fake, tmp_path), 30).create(["create", CTR])
    (limit,) = fake.deadlines
    assert isinstance(limit, Limit) and 59 < limit.seconds <= 60 and "create_budget_s = 100" in limit.source


def test_a_spent_budget_abandons_the_restore_uncounted_and_starts_cold(settings, fake, tmp_path, checkpoint):
    ct = gone(new(settings, fake, tmp_path), 91)
    with pytest.raises(Passthrough) as e:
        ct.create(["create", "--bundle", "b", CTR])
    assert e.value.argv == ["create", "--bundle", "b", CTR]
    assert "restore" not in fake.verbs(), "no runc restore started past the budget"
    assert checkpoint.failures() == 0, "the create's deadline is not the checkpoint's fault"
    assert any(m.startswith(f"cold start: restore from {CID} abandoned: create_budget_s = 100 in the config spent")
               for m in runtime_msgs(settings)), runtime_msgs(settings)


def test_the_post_restore_hook_gets_only_what_is_left(settings, fake, tmp_path, checkpoint):
    ct = gone(new(settings, fake, tmp_path, extra={"warmstart.dev/post-restore": "wake-up",
                                                   "warmstart.dev/hook-timeout": "600"}), 80)
    assert ct.create(["create", CTR]) == 0
    restore_limit, hook_s = fake.deadlines
    assert isinstance(hook_s, float) and 9 < hook_s <= 10, "the pod's 600 s cut to the 10 s left"


def test_a_pull_on_a_miss_gets_only_what_is_left(settings, fake, tmp_path, monkeypatch):
    waits: list[tuple[float, str]] = []
    monkeypatch.setattr(container, "locate", lambda *a: None)
    monkeypatch.setattr(fleet, "pull_on_miss", lambda s, scope, cid, wait, source: waits.append((wait, source)))
    pulling = dataclasses.replace(settings, registry=RegistrySettings(repository="registry.local:5000/ws/ckpt"))
    with pytest.raises(Passthrough):
        gone(new(pulling, fake, tmp_path), 0).create(["create", CTR])
    with pytest.raises(Passthrough):
        gone(new(pulling, fake, tmp_path), 75).create(["create", CTR])
    (own, own_source), (cut, cut_source) = waits
    assert own == 30 and own_source == "pull_deadline_s"
    assert 14 < cut <= 15 and cut_source.startswith("what was left of create_budget_s")


# -- dump: on stop and once ready ----------------------------------------------------------

def created(settings: Settings, fake: FakeRunc, tmp_path: Path, **kw: Any) -> Container:
    """A container created cold (no checkpoint yet), then found again as kill finds it."""
    with pytest.raises(Passthrough):
        new(settings, fake, tmp_path, **kw).create(["create", CTR])
    fake.calls.clear()
    return loaded(settings, fake)


def test_dump_on_stop_publishes_and_records_checkpointed(settings, fake, tmp_path):
    ct = created(settings, fake, tmp_path)
    (Path(ct.st.rootfs) / "app" / "state").write_text("warm")
    ct.on_stop()
    assert fake.verbs() == ["pause", "checkpoint", "resume"]
    store = Store(settings, "_local")
    assert store.exists(CID) and store.dump_failure(CID) is None
    assert (store.path(CID) / ROOTFS_DIFF).is_file(), "the rootfs change travels with the checkpoint"
    again = loaded(settings, fake)
    assert again.status is Status.CHECKPOINTED
    fake.calls.clear()
    again.on_stop()  # the next TERM: nothing more to do
    assert fake.verbs() == []
    with pytest.raises(IllegalTransition):
        again.checkpoint(leave_running=True)


@pytest.mark.parametrize("answer, why", [(1, "runc checkpoint failed (exit 1)"),
                                         (subprocess.TimeoutExpired("runc", 630), "TimeoutExpired")])
def test_dump_failure_records_failed_and_resumes(settings, fake, tmp_path, answer, why):
    fake.checkpoint_answer = answer
    ct = created(settings, fake, tmp_path)
    res = ct.checkpoint(frozen=True)
    assert res.outcome is DumpOutcome.FAILED and why in res.reason
    assert fake.verbs() == ["pause", "checkpoint", "resume"], "a failed dump never leaves the container frozen"
    store = Store(settings, "_local")
    assert not store.exists(CID) and why in store.dump_failure(CID)["error"]
    assert loaded(settings, fake).status is Status.FAILED
    assert not list((settings.store / "_local" / ".tmp").iterdir()), "no partial dump left behind"
    fake.checkpoint_answer = 0  # a later stop may try again
    assert loaded(settings, fake).checkpoint(frozen=True).ok


def test_dump_skipped_while_another_holds_the_id(settings, fake, tmp_path):
    ct = created(settings, fake, tmp_path)
    with Store(settings, "_local").lock(CID) as held:
        assert held
        res = ct.checkpoint(leave_running=True)
    assert res.outcome is DumpOutcome.SKIPPED and fake.verbs() == []
    assert ct.status is Status.CREATED, "a skipped dump leaves the status where it was"
    assert Store(settings, "_local").dump_failure(CID) is None and loaded(settings, fake).status is Status.CREATED


def test_pre_dump_hook_failure_means_no_checkpoint(settings, fake, tmp_path):
    fake.exec_code = 1
    ct = created(settings, fake, tmp_path, extra={"warmstart.dev/pre-dump": "sleep-now"})
    res = ct.checkpoint(frozen=True)
    assert res.outcome is DumpOutcome.FAILED and "hook said no" in res.reason
    assert fake.verbs() == ["exec"], "never paused, never dumped"


@pytest.mark.parametrize("mode", ["restore-only", "on-ready"])
def test_on_stop_does_nothing_for_other_modes(settings, fake, tmp_path, mode, monkeypatch):
    monkeypatch.setattr(container.Container, "_watch_for_ready", lambda self: None)  # no supervisor process
    ct = created(settings, fake, tmp_path, mode=mode)
    ct.on_stop()
    assert fake.verbs() == [] and not ct.sd.dump_lock.exists()


# -- status ---------------------------------------------------------------------------

def test_illegal_transitions_raise(settings, fake, tmp_path, checkpoint):
    ct = new(settings, fake, tmp_path)
    assert ct.create(["create", CTR]) == 0
    with pytest.raises(IllegalTransition, match="restored → restored"):
        ct.mark_restored()
    ct._to(Status.CHECKPOINTING)
    with pytest.raises(IllegalTransition):
        ct._to(Status.CHECKPOINTING)
    ct._to(Status.FAILED)
    ct._to(Status.CHECKPOINTING)  # failed: a later stop may try again
    ct._to(Status.CHECKPOINTED)
    for s in Status:
        with pytest.raises(IllegalTransition):
            ct._to(s)


def test_state_of_an_earlier_version_reads_as_its_status(settings, fake, tmp_path):
    ct = created(settings, fake, tmp_path)
    data = json.loads((ct.sd.path / "state.json").read_text())
    data.pop("status")
    (ct.sd.path / "state.json").write_text(json.dumps({**data, "restored": False, "restored_from": None,
                                                       "dumped": True}))
    assert loaded(settings, fake).status is Status.CHECKPOINTED


def test_a_create_inside_a_long_lived_process_counts_its_budget_from_now(settings, fake, tmp_path, monkeypatch):
    """Container.new without a budget (tests, tools): from now. The full suite's pytest process is 18 min old
    when these tests run; counted from its start, every restore here was abandoned as spent."""
    from warmstart import budget

    monkeypatch.setattr(budget, "process_age_s", lambda *a: 3600.0)
    assert budget.CreateBudget.start(100).left() == 0, "the runtime's own process: counted from its start"
    assert 89 < budget.CreateBudget.from_now(100).left() <= 90
    assert 89 < new(settings, fake, tmp_path).budget.left() <= 90
