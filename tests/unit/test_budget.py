"""budget: one deadline for a whole create; each wait gets min(its own bound, what is left less the reserve)."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from warmstart import budget, config, createlock, fileutil, runc
from warmstart.budget import BudgetSpent, CreateBudget
from warmstart.cli import doctor
from warmstart.config import ConfigError, RegistrySettings, Settings
from warmstart.store import Store


def spent_for(total: float, elapsed: float) -> CreateBudget:
    return CreateBudget(total, time.monotonic() - elapsed)


def test_left_is_the_budget_less_the_reserve_and_the_time_gone():
    b = spent_for(100, 50)
    assert 39 < b.left() <= 40  # 100 - 10 kept for the cold start - 50 gone
    assert spent_for(100, 95).left() == 0, "never negative: a spent budget is 0"
    assert 49.9 < b.elapsed() < 51


def test_a_wait_gets_its_own_bound_or_what_is_left_named_by_whichever_is_smaller():
    own = "restore_timeout_s in the config"
    fresh = spent_for(100, 0).limit(30, own)
    assert fresh.seconds == 30 and fresh.source == own and not fresh.by_budget
    # the case of the brief: 30 s went to a slow pull, the restore's own 90 s would run to 120 s
    cut = spent_for(100, 30).limit(90, own)
    assert 59 < cut.seconds <= 60 and cut.by_budget
    assert "create_budget_s = 100" in cut.source and "10s of it kept for a cold start" in cut.source


def test_check_raises_only_when_nothing_is_left():
    spent_for(100, 80).check("runc restore")  # 10 s left: goes on
    with pytest.raises(BudgetSpent, match=r"create_budget_s = 100 in the config spent before runc restore"):
        spent_for(100, 90.5).check("runc restore")


def test_the_budget_counts_from_the_process_start_not_from_when_it_is_made():
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); time.sleep(0.6)\n"
            "from warmstart.budget import CreateBudget\n"
            "print(CreateBudget.start(100).elapsed())")
    out = subprocess.run([sys.executable, "-c", code, str(Path(budget.__file__).parent.parent)],
                         capture_output=True, text=True, check=True).stdout
    assert 0.55 < float(out) < 5, out
    assert budget.process_age_s(Path("/nonexistent/stat")) == 0.0  # unreadable: counted from now


def test_lock_within_gives_up_at_its_timeout(tmp_path: Path):
    path = tmp_path / "l"
    a, b = os.open(path, os.O_RDWR | os.O_CREAT), os.open(path, os.O_RDWR)
    fcntl.flock(a, fcntl.LOCK_EX)
    t = time.monotonic()
    assert not fileutil.lock_within(lambda: fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB), 0.3)
    assert 0.25 < time.monotonic() - t < 2
    fcntl.flock(a, fcntl.LOCK_UN)
    assert fileutil.lock_within(lambda: fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB), 0.3)
    os.close(a)
    os.close(b)


# -- config ---------------------------------------------------------------------

def test_config_default_and_a_valid_value(tmp_path: Path):
    assert Settings().create_budget_s == 100
    p = tmp_path / "c.toml"
    p.write_text("create_budget_s = 40\n")
    assert config.load(p).create_budget_s == 40


@pytest.mark.parametrize("value", ["14", "0", "-1", "3601", "true", '"100"', "100.5"])
def test_config_refuses_a_budget_with_one_line_naming_the_key_and_the_range(tmp_path: Path, value: str):
    p = tmp_path / "c.toml"
    p.write_text(f"create_budget_s = {value}\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert "\n" not in msg and "create_budget_s must be an integer from 15 to 3600" in msg
    assert "runtime-request-timeout" in msg, msg


# -- the waits: runc restore, the create lock, the store lock ------------------------

def test_a_restore_run_is_cut_to_the_budget_and_refused_once_it_is_spent():
    assert runc.RestoreRun(90).limit() == budget.Limit(90, "restore_timeout_s in the config")
    cut = runc.RestoreRun(90, budget=spent_for(100, 85)).limit()
    assert cut.seconds <= 5 and cut.by_budget
    with pytest.raises(BudgetSpent, match="before runc restore"):
        runc.RestoreRun(90, budget=spent_for(100, 95)).limit()


def test_a_killed_run_names_what_set_its_deadline():
    with pytest.raises(runc.Timeout, match=r"killed after 0s \(what was left of create_budget_s"):
        runc.run_bounded(Path("/bin/sleep"), ["5"], 0.2, timeout_source=spent_for(100, 89.8).limit(90, "x").source)
    with pytest.raises(runc.Timeout, match=r"\(restore_timeout_s in the config\)"):
        runc.run_bounded(Path("/bin/sleep"), ["5"], 0.2)


def test_the_create_lock_held_elsewhere_past_the_budget_is_given_up(tmp_path: Path):
    state, root = tmp_path / "state", tmp_path / "runc"
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import sys; sys.path.insert(0, {str(Path(budget.__file__).parent.parent)!r})\n"
                               "from pathlib import Path; from warmstart import createlock\n"
                               f"createlock.hold(Path({str(state)!r}), Path({str(root)!r}), 'c')\n"
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        t = time.monotonic()
        assert createlock.hold(state, root, "c", timeout_s=0.3) is None
        assert 0.25 < time.monotonic() - t < 2
    finally:
        holder.communicate("", timeout=10)
    fd = createlock.hold(state, root, "c", timeout_s=0.3)
    assert fd is not None
    os.close(fd)


def test_the_store_lock_wait_ends_at_its_timeout(tmp_path: Path):
    store = Store(Settings(store=tmp_path / "store", seal_dir=tmp_path / "seals"), "_local")
    with store.lock("ck", exclusive=True) as gc_holds:  # gc or remove
        assert gc_holds
        t = time.monotonic()
        with store.lock("ck", exclusive=False, blocking=True, timeout_s=0.3) as held:
            assert not held and 0.25 < time.monotonic() - t < 2
    with store.lock("ck", exclusive=False, blocking=True, timeout_s=0.3) as held:
        assert held


# -- doctor ---------------------------------------------------------------------

def test_doctor_passes_the_defaults_and_warns_when_the_budget_passes_kubelet_s_timeout():
    r = doctor.check_create_budget(Settings())
    assert r.status == "ok" and "restore_timeout_s 90 = 90 s fits the 90 s" in r.detail
    # deadlines that add up past the budget are cut by it (the pod starts cold in time): said, not warned
    with_pull = Settings(registry=RegistrySettings(repository="registry.local:5000/ws/ckpt"))
    r = doctor.check_create_budget(with_pull)
    assert r.status == "ok" and "restore_timeout_s 90 + registry.pull_deadline_s 30 = 120 s exceeds" in r.detail
    assert "warmstart.dev/hook-timeout" in r.detail and "only what is left" in r.detail
    r = doctor.check_create_budget(Settings(create_budget_s=300))
    assert r.status == "warn" and "runtime-request-timeout" in r.detail and "100" in r.fix
