"""Hostile `warmstart.dev/*` annotations: traversal ids, NUL, overlong values, unknown modes, conflicts.

Expect: an error log line naming the annotation, then plain runc behaviour (the container runs, its
config.json is not rewritten, warmstart keeps no state for it, its stop is not a dump), and never a path
created outside the store — in fact nothing created in the store at all.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from reliability_lib import RNode, count, new_node, shim

pytestmark = [pytest.mark.reliability]
C, ID, IDENT = "warmstart.dev/checkpoint", "warmstart.dev/id", "warmstart.dev/identity"
ESC = "/tmp/warmstart-rel-escape"  # what a traversal would create; must never appear

CASES: dict[str, tuple[dict[str, str], str | None]] = {
    # name: (annotations, substring of the error line; None = silently plain, no error expected)
    "id_dotdot": ({C: "on-stop", ID: "../escape"}, "warmstart.dev/id: invalid checkpoint id"),
    "id_deep_dotdot": ({C: "on-stop", ID: "../../../../../.." + ESC}, "invalid checkpoint id"),
    "id_absolute": ({C: "on-stop", ID: ESC}, "invalid checkpoint id"),
    "id_slash": ({C: "on-stop", ID: "a/b"}, "invalid checkpoint id"),
    "id_dot": ({C: "on-stop", ID: "."}, "invalid checkpoint id"),
    "id_dotdot_only": ({C: "on-stop", ID: ".."}, "invalid checkpoint id"),
    "id_hidden": ({C: "on-stop", ID: ".tmp"}, "invalid checkpoint id"),
    "id_nul": ({C: "on-stop", ID: "abc\x00def"}, "without NUL"),
    "id_newline": ({C: "on-stop", ID: "abc\ndef"}, "invalid checkpoint id"),
    "id_empty": ({C: "on-stop", ID: ""}, "invalid checkpoint id"),
    "id_129_chars": ({C: "on-stop", ID: "a" * 129}, "invalid checkpoint id"),
    "id_unicode": ({C: "on-stop", ID: "caf\u00e9"}, "invalid checkpoint id"),
    "id_overlong_value": ({C: "on-stop", ID: "a" * (70 * 1024)}, "under 65536 bytes"),
    "identity_overlong": ({C: "on-stop", IDENT: json.dumps({"model": "m" * (70 * 1024)})}, "under 65536 bytes"),
    "identity_not_json": ({C: "on-stop", IDENT: "{not json"}, "warmstart.dev/identity:"),
    "identity_deep_nesting": ({C: "on-stop", IDENT: "[" * 30000 + "]" * 30000}, "warmstart.dev/identity:"),
    "identity_wrong_types": ({C: "on-stop", IDENT: '{"model": 5, "tensorParallelSize": "x"}'},
                             "warmstart.dev/identity:"),
    "identity_not_object": ({C: "on-stop", IDENT: '"just a string"'}, "warmstart.dev/identity:"),
    "mode_unknown": ({C: "sometimes", ID: "ok-id"}, "unknown mode 'sometimes'"),
    "mode_empty": ({C: "", ID: "ok-id"}, "unknown mode"),
    "mode_case": ({C: "ON-STOP", ID: "ok-id"}, "unknown mode"),
    "mode_missing": ({ID: "ok-id"}, "warmstart.dev/checkpoint: missing"),
    "key_unknown": ({C: "on-stop", ID: "ok-id", "warmstart.dev/evil": "1"}, "warmstart.dev/evil: unknown annotation"),
    "id_identity_conflict": ({C: "on-stop", ID: "not-the-hash", IDENT: '{"model":"m"}'}, "conflict"),
    "env_hash_traversal": ({C: "on-stop"}, "env DYN_CHECKPOINT_HASH: invalid checkpoint id"),
    "mode_off": ({C: "off", ID: "ok-id"}, None),
    "sandbox": ({C: "on-stop", ID: "ok-id", "io.kubernetes.cri.container-type": "sandbox"}, None),
}


@pytest.fixture(scope="module")
def anode(tmp_path_factory):
    n = new_node(tmp_path_factory, "ann")
    yield n
    n.cleanup()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_annotation_runs_as_plain_runc(anode: RNode, name: str):
    annotations, needle = CASES[name]
    c = anode.ctr(f"a-{name.replace('_', '-')}", annotations)
    cfg = json.loads((c.bundle / "config.json").read_text())
    if name == "env_hash_traversal":
        cfg["process"]["env"].append("DYN_CHECKPOINT_HASH=../../../../.." + ESC)
        (c.bundle / "config.json").write_text(json.dumps(cfg))
    original = (c.bundle / "config.json").read_bytes()
    store_before, seals_before = tree(anode.store), tree(anode.base / "seals")
    since = len(anode.runtime_log())
    c.create()
    count("hostile.annotations")
    assert not (anode.base / "state" / "containers" / c.id).exists(), "warmstart kept state for the container"
    assert (c.bundle / "config.json").read_bytes() == original, "config.json was rewritten"
    c.start()
    assert c.readline()["event"] == "ready"
    assert c.ask()["counter"] == 1
    p = c.stop()
    assert p.returncode == 0
    c.delete()
    assert c.state() is None
    assert tree(anode.store) == store_before and tree(anode.base / "seals") == seals_before, "store changed"
    assert not Path(ESC).exists() and not (anode.base / "escape").exists() and not (anode.store.parent / "escape").exists()
    errors = [r["msg"] for r in anode.runtime_log()[since:] if r.get("level") == "error"]
    shim_errors = [r["msg"] for r in c.log_records() if r.get("level") == "error"]
    if needle is None:
        assert not errors, errors
    else:
        assert any(needle in m and "running the container as plain runc" in m for m in errors), errors
        assert any(needle in m for m in shim_errors), "the reason is not in the shim's --log (containerd's view)"


def test_container_id_traversal_is_runc_s_refusal(anode: RNode):
    """A runc container id with '/' (the shim's, not ours): runc refuses it; warmstart creates nothing."""
    c = anode.ctr("a-cid", {C: "on-stop", ID: "cid-ok"})
    state_before = tree(anode.base / "state")
    argv = [shim.RUNTIME, "--root", str(c.root), "--log", str(c.bundle / "log.json"), "--log-format", "json",
            "create", "--bundle", str(c.bundle), "../../cid-escape"]
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **anode.env()}, timeout=60)
    direct = subprocess.run(["runc", "--root", str(c.root), "create", "--bundle", str(c.bundle), "../../cid-escape"],
                            capture_output=True, text=True, timeout=60)
    count("hostile.annotations")
    assert p.returncode != 0 and p.returncode == direct.returncode, (p.returncode, direct.returncode)
    assert tree(anode.base / "state") == state_before
    assert not (anode.base / "cid-escape").exists() and not (anode.base.parent / "cid-escape").exists()
