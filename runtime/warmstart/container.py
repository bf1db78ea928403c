"""One opted-in container: its spec, state dir, checkpoint binding and status, and the verbs that change them.

`intercept` turns runc's argv into a call here; `restore` and `dump` are the two flows a
`Container` runs.  The status moves only along TRANSITIONS (in the spirit of containerd's
init_state.go); every checkpoint, on stop or once ready, ends in `_settle`, the one place that
records its outcome.  Each fact has one record: restored-ness is the marker file launch.py stats
(StateDir.restored_marker), the checkpoint outcome is `ContainerState.status` in state.json.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from . import annotations, createlock, dynamo_protocol, image_id, rootfs
from .budget import CreateBudget
from .config import Settings
from .fileutil import write_json_atomic
from .hooks import main as poststop_hook
from .log import Logger
from .runc import CreateArgs, Runc
from .spec import Spec
from .state import ContainerState, StateDir
from .store import Store, locate

if TYPE_CHECKING:
    from .dump import DumpResult
    from .restore import RestoreResult

# How long past dump_timeout_s (CRIU's own bound) `delete` waits for a dump: runc's grace, the rootfs diff, publish.
DUMP_PUBLISH_S = 120


class Status(str, Enum):
    CREATED = "created"              # state made at create: runs cold, or is being restored
    RESTORED = "restored"            # restored from a checkpoint (recorded by the marker file only)
    CHECKPOINTING = "checkpointing"  # a dump in flight (never written: the dump lock is what others see)
    CHECKPOINTED = "checkpointed"    # a checkpoint of it was published
    FAILED = "failed"                # its last checkpoint attempt failed (a later stop may try again)


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CREATED: frozenset({Status.RESTORED, Status.CHECKPOINTING}),
    Status.RESTORED: frozenset({Status.CHECKPOINTING}),
    # back to where it came from when the dump was skipped (a checkpoint exists, or another dump holds the id)
    Status.CHECKPOINTING: frozenset({Status.CHECKPOINTED, Status.FAILED, Status.CREATED, Status.RESTORED}),
    Status.CHECKPOINTED: frozenset(),
    Status.FAILED: frozenset({Status.CHECKPOINTING}),
}
RECORDED = (Status.CREATED, Status.CHECKPOINTED, Status.FAILED)  # the values ContainerState.status holds


class IllegalTransition(RuntimeError):
    """A verb that the container's status does not allow (a warmstart bug: intercept falls back to runc)."""


class Bundle(NamedTuple):
    """A create's (or a client's restore's) container, read once: argv, config.json, policy, scope."""
    c: CreateArgs
    cfg: Path
    spec: dict[str, Any]
    view: Spec
    policy: annotations.Policy
    scope: str


def _is_warmstart_hook(hook: Any, script: str) -> bool:
    """A spec hook that is warmstart's own: the `warmstart-hook` script (as a hooks.d file names it) or
    warmstart/hooks/main.py (ours, or another install's)."""
    if not isinstance(hook, dict):
        return False
    args = hook.get("args") if isinstance(hook.get("args"), list) else []
    return any(a == script or Path(a).name == "warmstart-hook" or a.endswith("/warmstart/hooks/main.py")
               for a in map(str, [hook.get("path", ""), *args[:3]]))


def inject(spec: dict[str, Any], sd: StateDir) -> dict[str, Any]:
    """Our additions to the bundle's config.json: the CRIU config path runc reads, and the poststop hook.

    The hook (runtime/warmstart/hooks/main.py) releases the container's state whenever runc destroys it, so that
    state also goes when runc's delete comes without ours.  It runs as `python -IS .../warmstart/hooks/main.py`
    rather than through the console script, which imports site (`warmstart bench` times it).  Not
    added when an engine's hooks.d put warmstart's poststop hook into the spec already: one run
    per delete.  No createRuntime hook: a restore learns the dumped mounts from CRIU's images and
    the new ones from the spec, and runc would run it inside every restore.
    """
    spec = dict(spec)
    spec["annotations"] = dict(spec.get("annotations") or {}, **{"org.criu.config": str(sd.criu_conf)})
    stages = {k: list(v) for k, v in (spec.get("hooks") or {}).items()}
    script = str(Path(poststop_hook.__file__).resolve())
    if not any(_is_warmstart_hook(h, script) for h in stages.get("poststop", [])):
        hook: dict[str, Any] = {"path": sys.executable, "timeout": 10,
                                "args": [sys.executable, "-IS", script, "poststop", "--state-dir", str(sd.path)]}
        if os.environ.get("WARMSTART_CONFIG"):  # runc gives a hook only the env its spec names
            hook["env"] = [f"WARMSTART_CONFIG={os.environ['WARMSTART_CONFIG']}"]
        stages.setdefault("poststop", []).append(hook)
        spec["hooks"] = stages
    return spec


class Container:
    """An opted-in container as warmstart sees it.  `state` is read from state.json on first use;
    `bundle` is known only during create (a later verb reads the spec from the bundle when it needs it)."""

    def __init__(self, settings: Settings, rc: Runc, log: Logger, sd: StateDir,
                 state: ContainerState | None = None, bundle: Bundle | None = None) -> None:
        self.settings, self.runc, self.log, self.sd = settings, rc, log, sd
        self._st, self.bundle = state, bundle
        self._status: Status | None = None
        self.busy_fd: int | None = None  # StateDir.hold_busy's, when this process holds it
        self.budget: CreateBudget | None = None  # a create's (new): what the waits of its restore may take

    @classmethod
    def of(cls, settings: Settings, rc: Runc, log: Logger, container_id: str) -> "Container":
        return cls(settings, rc, log, StateDir(settings.state_dir, container_id))

    # -- state and status ---------------------------------------------------------

    def known(self) -> bool:
        """Whether warmstart holds state for it (it was created opted in, and not deleted since)."""
        return self._st is not None or self.sd.exists()

    @property
    def st(self) -> ContainerState:
        if self._st is None:
            self._st = self.sd.load()
        return self._st

    @property
    def status(self) -> Status:
        if self._status is None:
            recorded = Status(self.st.status)
            restored = recorded is Status.CREATED and self.sd.restored_marker.exists()
            self._status = Status.RESTORED if restored else recorded
        return self._status

    def _to(self, new: Status) -> None:
        if new not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"container {self.st.container_id}: {self.status.value} → {new.value} "
                                    "is not a transition warmstart makes")
        self._status = new

    def mark_restored(self) -> None:
        """created → restored; the marker is the only record (launch.py answers `start` with one stat)."""
        self._to(Status.RESTORED)
        self.sd.restored_marker.write_text(self.st.checkpoint_id)

    # -- create -----------------------------------------------------------------

    @classmethod
    def new(cls, settings: Settings, rc: Runc, log: Logger, b: Bundle,
            budget: CreateBudget | None = None) -> "Container":
        """The container of a create (or a client's restore): its state dir made and held busy, not yet saved."""
        sd = StateDir(settings.state_dir, b.c.id)
        sd.create()
        busy = sd.hold_busy()  # until we return or exec runc: a failed restore's cleanup runs the poststop hook
        rootfs_dir = rootfs.rootfs_path(b.c.bundle, b.spec)
        st = ContainerState(container_id=b.c.id, checkpoint_id=b.policy.checkpoint_id, mode=b.policy.mode.value,
                            bundle=str(b.c.bundle), rootfs=str(rootfs_dir), runc_root=rc.g.root,
                            identity=b.policy.identity, id_source=b.policy.id_source,
                            share_pid_ns=b.view.shares_pid_ns, pid_file=b.c.pid_file, runc_log=rc.g.log,
                            runc_global=list(rc.g.argv), scope=b.scope,
                            image_fingerprint=image_id.fingerprint(rootfs_dir, settings.state_dir))
        ct = cls(settings, rc, log, sd, st, b)
        ct.busy_fd = busy
        ct.budget = budget or CreateBudget.from_now(settings.create_budget_s)  # intercept passes the process's
        return ct

    def _bind(self) -> None:
        """Point the bundle at our CRIU config and poststop hook, and record the state."""
        assert self.bundle is not None
        write_json_atomic(self.bundle.cfg, inject(self.bundle.spec, self.sd), mode=0o644)

    def create(self, argv: list[str]) -> int:
        """`runc create`: restore from the bound checkpoint when there is one and it restores, else create
        cold by exec'ing runc with the caller's argv (that never returns)."""
        b = self.bundle
        assert b is not None
        store = locate(self.settings, b.scope, b.policy.checkpoint_id)
        if store is None and not self.st.share_pid_ns:
            store = self._fetch_missing(b)
        restoring = not self.st.share_pid_ns and store is not None
        self._bind()
        rootfs_dir = Path(self.st.rootfs)
        if rootfs.overlay_upperdir(rootfs_dir) is None:
            rootfs.take_baseline(rootfs_dir, self.sd.baseline)  # before any restore diff: later dumps carry it
        self.sd.save(self.st)
        if self.st.share_pid_ns:
            self.log.warning("container shares the pod's PID namespace: CRIU cannot checkpoint or restore it "
                             "alone; running cold, no checkpoint will be taken (use shareProcessNamespace: false)")
            self.runc.exec_passthrough(argv)
        if restoring:
            assert store is not None
            if self.restore(store, argv):
                return 0
        else:
            self.log.info(f"cold start: no checkpoint {b.policy.checkpoint_id} in the store yet",
                          will_dump=b.policy.mode in (annotations.Mode.ON_STOP, annotations.Mode.ON_READY))
        self._watch_for_ready()
        self.runc.exec_passthrough(argv)

    def _fetch_missing(self, b: Bundle) -> Store | None:
        """No local checkpoint: copy it from the shared store, else pull it from the registry (as configured)."""
        cid, budget = b.policy.checkpoint_id, self.budget
        assert budget is not None
        if self.settings.shared_store.fetches_on_miss:
            from . import sharedfs  # noqa: PLC0415 - only with a [shared_store] path
            wait = budget.limit(self.settings.shared_store.fetch_deadline_s, "fetch_deadline_s")
            if sharedfs.fetch_on_miss(self.settings, b.scope, cid, wait.seconds, wait.source):
                return locate(self.settings, b.scope, cid)
        if self.settings.registry.pulls_on_miss:
            from . import fleet  # noqa: PLC0415 - only with a [registry] repository
            wait = budget.limit(self.settings.registry.pull_deadline_s, "pull_deadline_s")
            if fleet.pull_on_miss(self.settings, b.scope, cid, wait.seconds, wait.source):
                return locate(self.settings, b.scope, cid)
        return None

    def restore(self, store: Store, argv: list[str]) -> bool:
        """Restore from `store`'s checkpoint in place of create; False (logged) means: create it cold.

        When runc already had the id (a create that bypassed createlock: a plain one, runc called
        directly), the state this create made goes and runc gets the call, to fail as its own create does."""
        from .restore import restore  # noqa: PLC0415 - not on a cold create's path
        res: RestoreResult = restore(self, store)
        if res.id_taken:
            self.log.warning(f"{res.reason}; passing the call to runc unchanged", phases=res.phases)
            self.sd.remove()
            self.runc.exec_passthrough(argv)
        if not res.ok:
            self.log.warning(f"cold start: {res.reason}", phases=res.phases)
            return False
        self.sd.save(self.st)  # the cgroup the restore chose: a later dump's metadata names it
        self.log.info(res.reason, phases=res.phases, pid=res.pid)
        dynamo_protocol.mark_restored(res.pid, self.bundle.spec if self.bundle else {}, self.st.checkpoint_id,
                                      self.log)
        return True

    def adopt(self, argv: list[str]) -> NoReturn:
        """`runc restore` from the client's own checkpoint: state made again as at create, the restore to runc.

        The client's checkpoint ended the container through runc and its cleanup's `delete`, which dropped
        warmstart's state: without it the next stop passed through and never dumped.  The image
        fingerprint is of the overlay's lower layers, which the container never changes.
        """
        assert self.bundle is not None
        self._bind()
        self.sd.save(self.st)
        self.log.info("restored by the client from its own checkpoint (runc restore): warmstart's state for the "
                      f"container is made again; its next stop is handled as after a create ({self.st.mode})")
        self._watch_for_ready()
        self.runc.exec_passthrough(argv)

    def _watch_for_ready(self) -> None:
        """on-ready without a checkpoint yet: start the supervisor that dumps once the worker is ready."""
        b = self.bundle
        assert b is not None
        if b.policy.mode is annotations.Mode.ON_READY and locate(self.settings, b.scope, b.policy.checkpoint_id) is None:
            try:
                from . import readiness, supervisor  # noqa: PLC0415 - on-ready only: ~20 ms a restore need not pay
                readiness.from_spec(b.spec)  # a bad ready-* annotation: say so now, not in the supervisor
                supervisor.spawn(self.sd)
            except annotations.AnnotationError as e:
                self.log.error(f"{e}; the container runs, but will not be checkpointed")

    # -- checkpoint ---------------------------------------------------------------

    def on_stop(self) -> None:
        """The first SIGTERM of an on-stop container: checkpoint it, frozen, before runc gets the signal.

        Frozen, not killed by CRIU: the container then gets the signal from runc and exits as it would
        without warmstart (its TERM handler's status, where CRIU's kill reported 137).  The dump lock is
        held until this process, or the `runc kill` it execs, exits: a concurrent `delete` waits for it.
        """
        if self.st.mode != annotations.Mode.ON_STOP.value or self.status is Status.CHECKPOINTED:
            return
        if self.st.share_pid_ns:
            self.log.info("not checkpointed: the container shares the pod's PID namespace")
            return
        self.sd.hold()
        res = self.checkpoint(frozen=True)
        if res.ok:
            self.log.info(f"checkpointed on stop into {res.path}; passing the stop signal on to runc",
                          phases=res.phases)
        else:
            self.log.event("info" if res.skipped else "warning", f"not checkpointed: {res.reason}; stopping as plain runc")

    def checkpoint(self, leave_running: bool = False, frozen: bool = False) -> DumpResult:
        """Dump into the store (dump.dump), then record the outcome: the on-stop and on-ready paths' one ending."""
        from .dump import dump  # noqa: PLC0415 - not on create's path
        before = self.status
        self._to(Status.CHECKPOINTING)
        res = dump(self, leave_running=leave_running, frozen=frozen)
        self._settle(res, before)
        return res

    def _settle(self, res: DumpResult, before: Status) -> None:
        if res.skipped:
            self._to(before)
            return
        self._to(Status.CHECKPOINTED if res.ok else Status.FAILED)
        if not res.ok:
            Store(self.settings, self.st.scope).record_dump_failure(self.st.checkpoint_id, res.reason)
        else:
            if self.settings.registry.enabled:
                from . import fleet  # noqa: PLC0415
                fleet.push_in_background(self.settings, self.st.scope, self.st.checkpoint_id)  # detached: no wait
            if self.settings.shared_store.publishes:
                from . import sharedfs  # noqa: PLC0415
                sharedfs.publish_in_background(self.settings, self.st.scope, self.st.checkpoint_id)  # detached
        self.st.status = self.status.value
        if not self.sd.save(self.st, missing_ok=True):
            self.log.warning("the container's warmstart state was removed during the dump (delete gave up waiting)")

    # -- delete -------------------------------------------------------------------

    def delete(self, argv: list[str]) -> int:
        """`runc delete`, after any dump of the container finished: clients delete as soon as the task
        exits (podman's cleanup: `delete --force`, then the rootfs is unmounted, with --rm removed).
        Needs no state: whatever of ours is left goes, once runc no longer knows the container."""
        from . import supervisor  # noqa: PLC0415 - not on create's path
        supervisor.stop(self.sd)
        limit = self.settings.dump_timeout_s + DUMP_PUBLISH_S
        waited = self.sd.wait_unheld(limit)
        if waited is None:
            self.log.warning(f"delete: the dump still holds the container after {limit}s; "
                             "deleting anyway (its checkpoint may be lost)")
        elif waited >= 0.1:
            self.log.info(f"delete waited {waited:.1f}s for the dump in progress to finish")
        try:  # the poststop hook runc runs below leaves the dir to us
            self.sd.hold_busy()
        except FileNotFoundError:
            pass
        code = self.runc.passthrough(argv)
        if code == 0 or self.runc.state(self.sd.path.name) is None:
            self.sd.remove()  # gone from runc: nothing of ours may outlive it
            createlock.remove(self.settings.state_dir, self.runc.root, self.sd.path.name)
        return code
