"""The slow path: runc calls that concern an opted-in container (create, restore, start, kill, delete).

Each handler either does warmstart's work and returns runc's exit code, or
falls back to exec'ing runc with the caller's argv unchanged.  Any exception
lands in the fallback: a warmstart bug must never cost the user a container.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from . import annotations, config, dynamo_protocol, image_id, rootfs, runc, trust
from .fileutil import write_json_atomic
from .hooks import main as poststop_hook
from .log import Logger
from .spec import Spec
from .state import ContainerState, StateDir
from .store import Store, locate

TERM_SIGNALS = {"15", "TERM", "SIGTERM"}
# How long past dump_timeout_s (CRIU's own bound) `delete` waits for a dump: runc's grace, the rootfs diff, publish.
DUMP_PUBLISH_S = 120


def exec_runc(settings_runc: Path | str, argv: list[str]) -> NoReturn:
    os.execv(str(settings_runc), [str(settings_runc)] + argv)


def main(argv: list[str], sub_i: int) -> int:
    if not os.environ.get("PATH"):  # podman runs `kill` without one; runc and CRIU inherit ours
        os.environ["PATH"] = config.DEFAULT_PATH
    g = runc.GlobalOpts.parse(argv[:sub_i])
    sub, rest = argv[sub_i], argv[sub_i + 1:]
    runc_path: Path | str = "/usr/sbin/runc"
    log = Logger(runc_log=Path(g.log) if g.log else None)
    try:
        settings = config.load()
        runc_path = settings.runc
        log.log_dir = settings.log_dir
        handler = {"create": create, "restore": client_restore, "start": start, "kill": kill,
                   "delete": delete}[sub]
        return handler(settings, g, argv, rest, log)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - fall back to plain runc, say why
        log.error(f"internal error in {sub}; passing the call to runc unchanged: {type(e).__name__}: {e}")
        exec_runc(runc_path, argv)


# -- create -------------------------------------------------------------------

def _is_warmstart_hook(hook: Any, script: str) -> bool:
    """A spec hook that is warmstart's own: the `warmstart-hook` script (as a hooks.d file names it) or
    hooks/main.py (ours, or another install's)."""
    if not isinstance(hook, dict):
        return False
    args = hook.get("args") if isinstance(hook.get("args"), list) else []
    return any(a == script or Path(a).name == "warmstart-hook" or a.endswith("/warmstart/hooks/main.py")
               for a in map(str, [hook.get("path", ""), *args[:3]]))


def _inject(spec: dict[str, Any], sd: StateDir) -> dict[str, Any]:
    """Our additions to the bundle's config.json: the CRIU config path runc reads, and the poststop hook.

    The hook (hooks/main.py) releases the container's state whenever runc destroys it, so that
    state also goes when runc's delete comes without ours.  It runs as `python -IS hooks/main.py`
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


class Bundle(NamedTuple):
    """A create's (or a client's restore's) container, read once: argv, config.json, policy, scope."""
    c: runc.CreateArgs
    cfg: Path
    spec: dict[str, Any]
    view: Spec
    policy: annotations.Policy
    scope: str


def _opted_in(settings: config.Settings, g: runc.GlobalOpts, argv: list[str], rest: list[str],
              log: Logger) -> Bundle:
    """The bundle of an opted-in container; plain runc (exec, no return) when it did not opt in or opted in wrongly."""
    c = runc.CreateArgs.parse(rest)
    log.context = {"container": c.id}
    if os.path.lexists(Path(g.root or runc.DEFAULT_ROOT) / c.id):
        # runc already has this id: its own create fails as it should, and nothing of warmstart's
        # (state dir, restore, a failed restore's cleanup) may touch the container that holds it
        log.warning(f"runc already has a container {c.id}; passing the call to runc unchanged")
        exec_runc(settings.runc, argv)
    cfg = c.bundle / "config.json"
    spec = json.loads(cfg.read_text())
    view = Spec(spec)
    try:
        policy = annotations.policy_from_spec(spec)
        scope = trust.scope_of(view) if policy is not None else ""
    except (annotations.AnnotationError, trust.TrustError) as e:
        log.error(f"{e}; running the container as plain runc")
        exec_runc(settings.runc, argv)
    if policy is None:
        exec_runc(settings.runc, argv)
    log.context["checkpoint_id"] = policy.checkpoint_id
    log.context["scope"] = scope
    return Bundle(c, cfg, spec, view, policy, scope)


def _new_state(settings: config.Settings, g: runc.GlobalOpts, b: Bundle) -> tuple[StateDir, ContainerState]:
    sd = StateDir(settings.state_dir, b.c.id)
    sd.create()
    sd.hold_busy()  # until we return or exec runc: a failed restore's cleanup runs the poststop hook
    rootfs_dir = rootfs.rootfs_path(b.c.bundle, b.spec)
    st = ContainerState(container_id=b.c.id, checkpoint_id=b.policy.checkpoint_id, mode=b.policy.mode.value,
                        bundle=str(b.c.bundle), rootfs=str(rootfs_dir), runc_root=g.root,
                        identity=b.policy.identity, id_source=b.policy.id_source,
                        share_pid_ns=b.view.shares_pid_ns, pid_file=b.c.pid_file, runc_log=g.log,
                        runc_global=list(g.argv), scope=b.scope,
                        image_fingerprint=image_id.fingerprint(rootfs_dir, settings.state_dir))
    return sd, st


def _watch_for_ready(settings: config.Settings, b: Bundle, sd: StateDir, log: Logger) -> None:
    """on-ready without a checkpoint yet: start the supervisor that dumps once the worker is ready."""
    if b.policy.mode is annotations.Mode.ON_READY and locate(settings, b.scope, b.policy.checkpoint_id) is None:
        try:
            from . import readiness, supervisor  # noqa: PLC0415 - on-ready only: ~20 ms a restore need not pay
            readiness.from_spec(b.spec)  # a bad ready-* annotation: say so now, not in the supervisor
            supervisor.spawn(sd)
        except annotations.AnnotationError as e:
            log.error(f"{e}; the container runs, but will not be checkpointed")


def create(settings: config.Settings, g: runc.GlobalOpts, argv: list[str], rest: list[str], log: Logger) -> int:
    b = _opted_in(settings, g, argv, rest, log)
    c, cfg, spec, policy = b.c, b.cfg, b.spec, b.policy
    sd, st = _new_state(settings, g, b)
    rootfs_dir = Path(st.rootfs)
    store = locate(settings, b.scope, policy.checkpoint_id)
    restoring = not st.share_pid_ns and store is not None
    write_json_atomic(cfg, _inject(spec, sd), mode=0o644)
    if rootfs.overlay_upperdir(rootfs_dir) is None:
        rootfs.take_baseline(rootfs_dir, sd.baseline)  # before any restore diff: later dumps carry it
    sd.save(st)
    if st.share_pid_ns:
        log.warning("container shares the pod's PID namespace: CRIU cannot checkpoint or restore it alone; "
                    "running cold, no checkpoint will be taken (use shareProcessNamespace: false)")
        exec_runc(settings.runc, argv)
    if restoring:
        from .restore import restore  # noqa: PLC0415
        res = restore(settings, store, g, c, b.view, st, sd, log)
        if res.ok:
            st.restored, st.restored_from = True, policy.checkpoint_id
            sd.save(st)
            log.info(res.reason, phases=res.phases, pid=res.pid)
            dynamo_protocol.mark_restored(res.pid, spec, policy.checkpoint_id, log)
            return 0
        log.warning(f"cold start: {res.reason}", phases=res.phases)
    else:
        log.info(f"cold start: no checkpoint {policy.checkpoint_id} in the store yet",
                 will_dump=policy.mode in (annotations.Mode.ON_STOP, annotations.Mode.ON_READY))
    _watch_for_ready(settings, b, sd, log)
    exec_runc(settings.runc, argv)


def client_restore(settings: config.Settings, g: runc.GlobalOpts, argv: list[str], rest: list[str],
                   log: Logger) -> int:
    """`runc restore` from the client's own checkpoint (podman's `container checkpoint` / `restore`).

    The client's checkpoint ended the container through runc and its cleanup's `delete`, which dropped
    warmstart's state: without it the next stop passed through and never dumped.  The state is made
    again as at create (the image fingerprint is of the overlay's lower layers, which the container
    never changes; a plain-directory rootfs has no record of its content at create, so such a container
    is left to runc), and the restore itself goes to runc unchanged.
    """
    b = _opted_in(settings, g, argv, rest, log)
    if rootfs.overlay_upperdir(rootfs.rootfs_path(b.c.bundle, b.spec)) is None:
        log.warning("restored by the client from its own checkpoint (runc restore); its rootfs is a plain "
                    "directory whose content at create is unknown: this container will not be checkpointed")
        exec_runc(settings.runc, argv)
    sd, st = _new_state(settings, g, b)
    write_json_atomic(b.cfg, _inject(b.spec, sd), mode=0o644)
    sd.save(st)
    log.info("restored by the client from its own checkpoint (runc restore): warmstart's state for the "
             f"container is made again; its next stop is handled as after a create ({b.policy.mode.value})")
    _watch_for_ready(settings, b, sd, log)
    exec_runc(settings.runc, argv)


# -- start, kill, delete ------------------------------------------------------

def _load(settings: config.Settings, cid: str) -> tuple[StateDir, ContainerState] | None:
    sd = StateDir(settings.state_dir, cid)
    return (sd, sd.load()) if sd.exists() else None


def start(settings: config.Settings, g: runc.GlobalOpts, argv: list[str], rest: list[str], log: Logger) -> int:
    ids = runc.positional(rest)
    loaded = _load(settings, ids[0]) if ids else None
    if loaded and loaded[1].restored:
        return 0  # `runc restore --detach` already left the process running
    exec_runc(settings.runc, argv)


def kill(settings: config.Settings, g: runc.GlobalOpts, argv: list[str], rest: list[str], log: Logger) -> int:
    pos = runc.positional(rest)
    loaded = _load(settings, pos[0]) if pos else None
    sig = pos[1] if len(pos) > 1 else "SIGTERM"
    if loaded is None or "--all" in rest or "-a" in rest or sig.upper() not in TERM_SIGNALS:
        exec_runc(settings.runc, argv)
    sd, st = loaded
    log.context = {"container": st.container_id, "checkpoint_id": st.checkpoint_id}
    if st.mode != annotations.Mode.ON_STOP.value or st.dumped:
        exec_runc(settings.runc, argv)
    if st.share_pid_ns:
        log.info("not checkpointed: the container shares the pod's PID namespace")
        exec_runc(settings.runc, argv)
    from .dump import dump  # noqa: PLC0415
    sd.hold()  # until this process (or the runc it execs) exits: a concurrent `delete` waits for the dump
    # Frozen, not killed by CRIU: the container then gets this very signal from runc below and exits as
    # it would without warmstart (its TERM handler's status, where CRIU's kill reported 137).
    res = dump(settings, g, st, sd, log, frozen=True)
    if res.ok:
        st.dumped = True
        if not sd.save(st, missing_ok=True):
            log.warning("the container's warmstart state was removed during the dump (delete gave up waiting)")
        log.info(f"checkpointed on stop into {res.path}; passing the stop signal on to runc", phases=res.phases)
    elif res.skipped:
        log.info(f"not checkpointed: {res.reason}; stopping as plain runc")
    else:
        Store(settings, st.scope).record_dump_failure(st.checkpoint_id, res.reason)
        log.warning(f"not checkpointed: {res.reason}; stopping as plain runc")
    exec_runc(settings.runc, argv)


def delete(settings: config.Settings, g: runc.GlobalOpts, argv: list[str], rest: list[str], log: Logger) -> int:
    """`runc delete`, after any on-stop dump of the container finished: clients delete as soon as the
    task exits (podman's cleanup: `delete --force`, then the rootfs is unmounted, with --rm removed)."""
    pos = runc.positional(rest)
    if pos:
        from . import supervisor  # noqa: PLC0415 - not on create's path
        log.context = {"container": pos[0]}
        sd = StateDir(settings.state_dir, pos[0])
        supervisor.stop(sd)
        waited = sd.wait_unheld(settings.dump_timeout_s + DUMP_PUBLISH_S)
        if waited is None:
            log.warning(f"delete: the dump still holds the container after {settings.dump_timeout_s + DUMP_PUBLISH_S}s; "
                        "deleting anyway (its checkpoint may be lost)")
        elif waited >= 0.1:
            log.info(f"delete waited {waited:.1f}s for the dump in progress to finish")
        with contextlib.suppress(FileNotFoundError):  # the poststop hook runc runs below leaves the dir to us
            sd.hold_busy()
    p = runc.run(settings.runc, argv, capture=False)
    if pos and (p.returncode == 0 or runc.state(settings.runc, g, pos[0]) is None):
        StateDir(settings.state_dir, pos[0]).remove()  # gone from runc: nothing of ours may outlive it
    return p.returncode
