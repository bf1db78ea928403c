"""`warmstart list`, `remove` and `gc` agree on what exists, and leave nothing of an id behind (issue 12, item 3)."""
from __future__ import annotations

import hashlib
import json

import pytest
from reliability_lib import RNode, ann, make_checkpoint, start_ready

pytestmark = [pytest.mark.reliability]


def listed(node: RNode) -> dict[str, str]:
    return {r["id"]: r["status"] for r in json.loads(node.warmstart("list", "--json", check=True).stdout)}


def leftovers(node: RNode, cid: str) -> list[str]:
    return sorted(str(p) for d in (node.store_root, node.base / "seals") for p in d.rglob("*") if cid in p.name)


def test_an_id_whose_dump_failed_is_listed_then_removed_completely(node: RNode):
    """A failed dump (here: its pre-dump hook fails) leaves only a status; remove used to call it absent."""
    c = node.ctr("f1", {**ann("faildump"), "warmstart.dev/pre-dump": "exit 3"})
    start_ready(c)
    c.stop()
    c.delete()
    assert listed(node).get("faildump") == "failed", listed(node)
    p = node.warmstart("remove", "faildump")
    assert p.returncode == 0 and "faildump: removed" in p.stdout, p.stdout + p.stderr
    assert "faildump" not in listed(node)
    assert not leftovers(node, "faildump"), leftovers(node, "faildump")


def test_remove_of_a_used_checkpoint_leaves_no_seal_cache_or_lock(node: RNode):
    make_checkpoint(node, "used")
    c = node.ctr("u1", ann("used"))  # a restore: seal and the decoded mounts/security caches exist now
    c.create()
    c.start()
    c.ask()
    c.stop()
    c.delete()
    assert any(p.endswith(".security.json") for p in leftovers(node, "used"))
    shown = json.loads(node.warmstart("inspect", "used", check=True).stdout)["privileges"]
    assert shown["uids"] == [0] and "CAP_KILL" in shown["capabilities"] and shown["no_new_privs"], shown
    assert node.warmstart("remove", "used").returncode == 0
    assert not leftovers(node, "used"), leftovers(node, "used")
    assert node.warmstart("gc", "--min-age", "0").returncode == 0
    assert listed(node) == {}


def test_a_dump_derives_the_restore_s_caches_when_it_seals(node: RNode):
    """The mount entries and the tasks' credentials are decoded (pycriu) when the checkpoint is sealed,
    not on its first restore's create: 0.09-0.16 s of `compatible` on the H200."""
    make_checkpoint(node, "drv")
    key = hashlib.sha256((node.store / "drv" / "metadata.json").read_bytes()).hexdigest()
    mounts = json.loads((node.seals / "drv.mounts.json").read_text())
    security = json.loads((node.seals / "drv.security.json").read_text())
    assert mounts["key"] == key and any(e.get("mountpoint") == "/" for e in mounts["entries"]), mounts
    assert security["key"] == key and security["tasks"] and security["tasks"][0]["uids"][0] == 0, security
    c = node.ctr("d1", ann("drv"))
    c.create()
    restored = [r for r in c.log_records() if "restored from drv" in r.get("msg", "")]
    assert restored, c.log_text()
    c.start()
    c.ask()
    c.stop()
    c.delete()
