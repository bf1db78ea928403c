"""runtime/warmstart/fleet.py: tags, and the bounds of push_in_background / pull_on_miss, with the detached
worker faked.

The real worker, skopeo and registry are exercised in tests/e2e/test_fleet.py; here `_spawn` is
replaced by a thread that plays the worker (it holds the handed-over lock, as the child's inherited
fd does, and "pulls" by writing a marker).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import pytest
from test_store import store  # noqa: F401 - fixture

from warmstart import config, fleet
from warmstart.store import MARKER, Store


def test_tags_are_one_per_key_and_valid():
    assert fleet.tag_for("_local", "qwen-7b") == "_local.qwen-7b"
    assert fleet.tag_for("tenant-a", "v1.2") == "tenant-a.v1.2"
    # "--" could be read two ways (namespaces may hold it); "." cannot
    assert fleet.tag_for("a--b", "c") != fleet.tag_for("a", "b--c")
    long_tag = fleet.tag_for("n" * 63, "i" * 100)
    assert long_tag.startswith("sha256-") and len(long_tag) <= 128 and "." not in long_tag
    assert long_tag != fleet.tag_for("n" * 63, "i" * 99 + "j")
    for scope, cid in [("Tenant", "x"), ("a/b", "x"), ("_local", "../x"), ("_local", ""), ("a.b", "x")]:
        with pytest.raises(ValueError):
            fleet.tag_for(scope, cid)


def with_registry(store: Store, **reg: object) -> config.Settings:
    r = dataclasses.replace(config.RegistrySettings(repository="reg.local:5000/ws/ckpt", tls_verify=False), **reg)
    return dataclasses.replace(store.settings, registry=r)


def test_ref_needs_a_repository(store):
    assert fleet.ref_for(with_registry(store), "_local", "x") == "reg.local:5000/ws/ckpt:_local.x"
    with pytest.raises(ValueError, match=r"\[registry\] repository is not set"):
        fleet.ref_for(store.settings, "_local", "x")


def log_lines(settings: config.Settings) -> list[dict]:
    p = settings.log_dir / "runtime.log"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


class FakeWorker:
    """Plays `python -m warmstart.fleet pull`: holds the lock it was handed for `seconds`, then lands the
    checkpoint (or not) and logs one line, as the real worker does."""

    def __init__(self, settings: config.Settings, seconds: float, ok: bool = True) -> None:
        self.settings, self.seconds, self.ok, self.calls = settings, seconds, ok, []

    def __call__(self, settings, args, pass_fds=(), module="fleet"):
        self.calls.append(args)
        held = os.dup(pass_fds[0]) if pass_fds else None  # the child's inherited fd: same open file, same lock

        def run():
            time.sleep(self.seconds)
            cid, scope = args[-1], args[args.index("--namespace") + 1]
            if self.ok:
                d = Store(settings, scope).path(cid)
                d.mkdir(parents=True)
                (d / MARKER).write_text("{}")
            fleet._logger(settings, scope, cid).info("fake pull over")
            if held is not None:
                os.close(held)
        threading.Thread(target=run, daemon=True).start()


def test_off_or_unconfigured_does_nothing(store, monkeypatch):
    monkeypatch.setattr(fleet, "_spawn", lambda *a, **k: pytest.fail("nothing may be started"))
    assert not fleet.pull_on_miss(store.settings, "_local", "x", 1)
    assert not fleet.push_in_background(store.settings, "_local", "x")
    assert not fleet.pull_on_miss(with_registry(store, pull="off"), "_local", "x", 1)
    assert not fleet.push_in_background(with_registry(store, push="off"), "_local", "x")


def test_push_in_background_returns_at_once(store, monkeypatch):
    calls = []
    monkeypatch.setattr(fleet, "_spawn", lambda settings, args, pass_fds=(), module="fleet": calls.append(args))
    assert fleet.push_in_background(with_registry(store), "tenant-a", "x")
    assert calls == [["push", "--namespace", "tenant-a", "x"]]
    assert not fleet.push_in_background(with_registry(store), "Bad", "x")
    assert len(log_lines(store.settings)) == 1


def test_concurrent_misses_share_one_pull(store, monkeypatch):
    settings = with_registry(store)
    worker = FakeWorker(settings, 0.5)
    monkeypatch.setattr(fleet, "_spawn", worker)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(fleet.pull_on_miss(settings, "_local", "x", 10)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4 and len(worker.calls) == 1
    assert fleet.pull_on_miss(settings, "_local", "x", 10) and len(worker.calls) == 1  # present: no pull


def test_past_the_deadline_false_and_the_pull_goes_on(store, monkeypatch):
    settings = with_registry(store)
    worker = FakeWorker(settings, 1.0)
    monkeypatch.setattr(fleet, "_spawn", worker)
    t0 = time.monotonic()
    assert not fleet.pull_on_miss(settings, "_local", "x", 0.2)
    assert time.monotonic() - t0 < 0.8
    assert "not finished after 0.2s" in log_lines(settings)[-1]["msg"]
    assert not fleet.pull_on_miss(settings, "_local", "x", 0.1)  # a second container: joins the same pull
    assert len(worker.calls) == 1
    assert fleet.pull_on_miss(settings, "_local", "x", 5)  # the next one finds it
    assert len(worker.calls) == 1


def test_a_failed_pull_is_false_with_its_one_line(store, monkeypatch):
    settings = with_registry(store)
    monkeypatch.setattr(fleet, "_spawn", FakeWorker(settings, 0.1, ok=False))
    assert not fleet.pull_on_miss(settings, "_local", "x", 5)
    assert [r["msg"] for r in log_lines(settings)] == ["fake pull over"]


def test_a_worker_that_cannot_start_is_false_and_frees_the_key(store, monkeypatch):
    settings = with_registry(store)

    def broken(*a, **k):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(fleet, "_spawn", broken)
    assert not fleet.pull_on_miss(settings, "_local", "x", 5)
    (line,) = log_lines(settings)
    assert "pull from the registry not started" in line["msg"] and "Cannot allocate memory" in line["msg"]
    worker = FakeWorker(settings, 0)
    monkeypatch.setattr(fleet, "_spawn", worker)
    assert fleet.pull_on_miss(settings, "_local", "x", 5) and len(worker.calls) == 1


def test_spawned_worker_gets_the_callers_config(store, monkeypatch, tmp_path):
    """The detached worker loads the very config file the caller's settings came from."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'store = "{tmp_path}/s"\n[registry]\nrepository = "reg.local/x"\n')
    settings = config.load(cfg)
    seen = {}

    class P:
        def __init__(self, argv, **kw):
            seen.update(argv=argv, **kw)
    monkeypatch.setattr(fleet.subprocess, "Popen", P)
    monkeypatch.setenv("WARMSTART_CONFIG", "/elsewhere.toml")
    fleet._spawn(settings, ["push", "x"])
    assert seen["env"]["WARMSTART_CONFIG"] == str(cfg) and seen["start_new_session"]
    assert seen["stdout"] == seen["stderr"] == seen["stdin"] == fleet.subprocess.DEVNULL
    assert seen["argv"][1:4] == ["-m", "warmstart.fleet", "push"]
    assert Path(seen["cwd"]) == Path("/")
