"""The slow path: runc's argv for an opted-in container (create, restore, start, kill, delete) → a Container verb.

Each handler either has the container do warmstart's work and returns runc's exit code, or
falls back to exec'ing runc with the caller's argv unchanged.  Any exception lands in the
fallback: a warmstart bug must never cost the user a container.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, NoReturn

from . import annotations, config, createlock, rootfs, runc, trust
from .budget import KEY as BUDGET_KEY, CreateBudget
from .container import Bundle, Container, Status
from .log import Logger
from .spec import Spec

TERM_SIGNALS = {"15", "TERM", "SIGTERM"}


class Call(NamedTuple):
    """One intercepted runc call: the settings, the runc client with the caller's global flags, the argv."""
    settings: config.Settings
    runc: runc.Runc
    argv: list[str]  # the caller's whole argv, for runc unchanged
    rest: list[str]  # what follows the subcommand
    log: Logger

    def passthrough(self) -> NoReturn:
        self.runc.exec_passthrough(self.argv)


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
        return handler(Call(settings, runc.Runc(settings.runc, g, settings.criu), argv, rest, log))
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - fall back to plain runc, say why
        log.error(f"internal error in {sub}; passing the call to runc unchanged: {type(e).__name__}: {e}")
        runc.exec_unchanged(runc_path, argv)


def _opted_in(call: Call, budget: CreateBudget | None = None) -> Bundle:
    """The bundle of an opted-in container; plain runc (exec, no return) when it did not opt in or opted in wrongly
    (or, with a `budget`, when another create of the id holds its lock past the budget)."""
    c = runc.CreateArgs.parse(call.rest)
    log = call.log
    log.context = {"container": c.id}
    if not runc.valid_container_id(c.id):  # runc refuses it: nothing of warmstart's is made for it
        call.passthrough()
    cfg = c.bundle / "config.json"
    spec = json.loads(cfg.read_text())
    view = Spec(spec)
    try:
        policy = annotations.policy_from_spec(spec)
        scope = trust.scope_of(view) if policy is not None else ""
    except (annotations.AnnotationError, trust.TrustError) as e:
        log.error(f"{e}; running the container as plain runc")
        call.passthrough()
    if policy is None:
        call.passthrough()
    # held until runc has the id (createlock.py): another create of it waits here, then sees it below
    if createlock.hold(call.settings.state_dir, call.runc.root, c.id, budget and budget.left()) is None:
        assert budget is not None
        # the create holding it is stuck past its own budget: runc's own create decides, as for a plain one
        log.warning(f"another create of {c.id} still holds its create lock after {budget.elapsed():.0f}s "
                    f"({BUDGET_KEY} = {budget.total_s:g} in the config); passing the call to runc unchanged")
        call.passthrough()
    if os.path.lexists(call.runc.root / c.id):
        # runc already has this id: its own create fails as it should, and nothing of warmstart's
        # (state dir, restore, a failed restore's cleanup) may touch the container that holds it
        log.warning(f"runc already has a container {c.id}; passing the call to runc unchanged")
        call.passthrough()
    log.context["checkpoint_id"] = policy.checkpoint_id
    log.context["scope"] = scope
    return Bundle(c, cfg, spec, view, policy, scope)


def create(call: Call) -> int:
    budget = CreateBudget.start(call.settings.create_budget_s)  # counted from this process's start
    b = _opted_in(call, budget)
    return Container.new(call.settings, call.runc, call.log, b, budget).create(call.argv)


def client_restore(call: Call) -> int:
    """`runc restore` from the client's own checkpoint (podman's `container checkpoint` / `restore`).

    A plain-directory rootfs has no record of its content at create, so such a container is left to runc.
    """
    b = _opted_in(call)
    if rootfs.overlay_upperdir(rootfs.rootfs_path(b.c.bundle, b.spec)) is None:
        call.log.warning("restored by the client from its own checkpoint (runc restore); its rootfs is a plain "
                         "directory whose content at create is unknown: this container will not be checkpointed")
        call.passthrough()
    Container.new(call.settings, call.runc, call.log, b).adopt(call.argv)


def _container(call: Call) -> Container | None:
    """The container a start/kill/delete names (None without an id)."""
    ids = runc.positional(call.rest)
    return Container.of(call.settings, call.runc, call.log, ids[0]) if ids else None


def start(call: Call) -> int:
    ct = _container(call)
    if ct is not None and ct.known() and ct.status is Status.RESTORED:
        return 0  # `runc restore --detach` already left the process running
    call.passthrough()


def kill(call: Call) -> int:
    pos = runc.positional(call.rest)
    sig = pos[1] if len(pos) > 1 else "SIGTERM"
    ct = _container(call)
    if ct is None or not ct.known() or "--all" in call.rest or "-a" in call.rest or sig.upper() not in TERM_SIGNALS:
        call.passthrough()
    call.log.context = {"container": ct.st.container_id, "checkpoint_id": ct.st.checkpoint_id}
    ct.on_stop()
    call.passthrough()


def delete(call: Call) -> int:
    ct = _container(call)
    if ct is None:
        return call.runc.passthrough(call.argv)
    call.log.context = {"container": ct.sd.path.name}
    return ct.delete(call.argv)
