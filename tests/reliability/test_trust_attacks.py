"""A checkpoint restores only into a container it provably belongs to (issue: trust on a shared node).

Each test is one attack that worked before: a tenant restoring another tenant's memory or poisoning its
id, a checkpoint more privileged than the spec it restores into, a forged or unsigned checkpoint, a
different image outside CRI, and a tenant's failing hook quarantining a checkpoint.  All run through the
installed runtime, driven as containerd's shim drives it, with real runc and CRIU.  The namespace
annotation is the one containerd's CRI sets itself (a pod can pass through only warmstart.dev/*).
"""
from __future__ import annotations

import json

import pytest
from reliability_lib import RNode, ann, count, drop_seal, make_checkpoint, reseal_manifest

pytestmark = [pytest.mark.reliability]
NS = "io.kubernetes.cri.sandbox-namespace"


def in_ns(cid: str, ns: str) -> dict[str, str]:
    return {**ann(cid), NS: ns}


def started(node: RNode, short: str, annotations: dict[str, str], **kw) -> tuple[dict, list[str]]:
    """Create and start a container; what its workload said first, and the runtime's log lines for it."""
    c = node.ctr(short, annotations, **kw)
    since = len(node.runtime_log())
    c.create()
    c.start()
    got = c.ask()
    if got.get("event") == "ready":  # a cold start says so first; a restored workload answers at once
        got = c.readline()
    c.stop()
    c.delete()
    return got, node.log_msgs(since)


def test_another_namespace_cannot_restore_a_checkpoint(node: RNode):
    """tenant-a dumps id `pub`; tenant-b's pod with the same id, args and image starts cold, and its own dump
    never becomes what tenant-a restores (poisoning).  The node config can share one checkpoint explicitly."""
    a = make_checkpoint(node, "pub", short="a-dump", annotations=in_ns("pub", "tenant-a"))
    assert (node.store_root / "tenant-a" / "pub" / "checkpoint.done").is_file()
    got, msgs = started(node, "b1", in_ns("pub", "tenant-b"))
    assert got["random"] != a["random"] and got["counter"] == 1, f"tenant-b restored tenant-a's memory: {msgs}"
    assert any("cold start: no checkpoint pub" in m for m in msgs), msgs
    count("hostile.trust")
    # tenant-b's stop made tenant-b's own checkpoint; tenant-a still restores its own
    assert (node.store_root / "tenant-b" / "pub" / "checkpoint.done").is_file()
    got, msgs = started(node, "a2", in_ns("pub", "tenant-a"))
    assert got["random"] == a["random"], f"tenant-a did not restore its own checkpoint: {msgs}"
    # shared by the node's operator: tenant-c may restore tenant-a's
    node.set_config(shared_checkpoints=["tenant-a/pub"])
    got, msgs = started(node, "c1", in_ns("pub", "tenant-c"))
    assert got["random"] == a["random"], f"a shared checkpoint did not restore: {msgs}"


@pytest.mark.parametrize("seccomp, needle", [(True, "refused: seccomp profile differs"),
                                               (False, "refused: process.user.uid")])
def test_a_checkpoint_more_privileged_than_the_spec_is_refused(node: RNode, seccomp: bool, needle: str):
    """Dumped as uid 0 with capabilities; the new spec: uid 1000, no capabilities, noNewPrivileges and (the
    issue's case) a seccomp profile.  CRIU would restore the images' credentials, whatever the spec says."""
    make_checkpoint(node, "priv")
    c = node.ctr("u1", ann("priv"))
    cfg = json.loads((c.bundle / "config.json").read_text())
    cfg["process"]["user"] = {"uid": 1000, "gid": 1000}
    cfg["process"]["capabilities"] = {k: [] for k in ("bounding", "effective", "permitted")}
    if seccomp:
        cfg["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW",
                                   "syscalls": [{"names": ["reboot"], "action": "SCMP_ACT_ERRNO"}]}
    (c.bundle / "config.json").write_text(json.dumps(cfg))
    since = len(node.runtime_log())
    c.create()
    msgs = node.log_msgs(since)
    assert any(m.startswith("cold start: checkpoint priv") and needle in m for m in msgs), msgs
    assert c.state()["status"] == "created", "a process was restored (a cold container waits for start)"
    assert not (node.store / ".quarantine" / "priv.json").exists(), "a refusal must not count as a failure"
    count("hostile.trust")
    c.runtime("delete", "--force", c.id, check=False)


def test_a_user_namespace_spec_does_not_restore_into_the_host_user_namespace(node: RNode):
    make_checkpoint(node, "userns")
    c = node.ctr("n1", ann("userns"))
    cfg = json.loads((c.bundle / "config.json").read_text())
    cfg["linux"]["namespaces"].append({"type": "user"})
    cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 0, "size": 65536}]
    cfg["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 0, "size": 65536}]
    (c.bundle / "config.json").write_text(json.dumps(cfg))
    since = len(node.runtime_log())
    c.create()
    msgs = node.log_msgs(since)
    assert any("refused: namespaces" in m for m in msgs), msgs
    count("hostile.trust")
    c.runtime("delete", "--force", c.id, check=False)


@pytest.mark.parametrize("how", ["forged", "unsigned"])
def test_a_forged_or_unsigned_checkpoint_is_refused(node: RNode, how: str):
    """An edited core-1.img with the manifest and the marker's metadata hash recomputed (no key needed
    before signatures), or a checkpoint whose signature was dropped: `verify` and every restore refuse it."""
    dumped = make_checkpoint(node, "forge")
    ck = node.store / "forge"
    if how == "forged":
        core = ck / "core-1.img"
        data = bytearray(core.read_bytes())
        data[-1] ^= 0x01
        core.write_bytes(bytes(data))
        reseal_manifest(ck, sign=False)  # all a forger without the node's key can do
        needle = "does not match the checkpoint"
    else:
        marker = json.loads((ck / "checkpoint.done").read_text())
        del marker["signature"]
        (ck / "checkpoint.done").write_text(json.dumps(marker))
        needle = "not signed"
    drop_seal(node, "forge")
    v = node.warmstart("verify", "forge")
    assert v.returncode == 1 and needle in v.stderr, v.stdout + v.stderr
    got, msgs = started(node, "f1", ann("forge"))
    assert got["random"] != dumped["random"], f"the {how} checkpoint was restored: {msgs}"
    assert any("refused" in m and needle in m for m in msgs), msgs
    count("hostile.trust")


def test_a_different_image_outside_cri_is_refused_and_never_quarantines(node: RNode):
    """No image annotation (podman, ctr, runc): the rootfs fingerprint tells the images apart.  Three starts
    of the other image are refusals, not failed restores, so the good checkpoint stays usable."""
    dumped = make_checkpoint(node, "img")
    for i in range(3):
        c = node.ctr(f"i{i}", ann("img"))
        (c.bundle / "rootfs" / "etc" / "other-image").write_text("a different image\n")
        since = len(node.runtime_log())
        c.create()
        c.start()
        got = c.ask()
        msgs = node.log_msgs(since)
        assert got["random"] != dumped["random"], f"restored into another image: {msgs}"
        assert any("refused: container image differs" in m for m in msgs), msgs
        c.stop()
        c.delete()
        count("hostile.trust")
    assert not (node.store / ".quarantine" / "img.json").exists()
    got, msgs = started(node, "same", ann("img"))
    assert got["random"] == dumped["random"], f"the same image no longer restores: {msgs}"


def test_a_failing_post_restore_hook_never_quarantines_the_checkpoint(node: RNode):
    """A tenant's own hook failing is the tenant's container failing, not the checkpoint."""
    dumped = make_checkpoint(node, "hook")
    for i in range(3):
        got, msgs = started(node, f"h{i}", {**ann("hook"), "warmstart.dev/post-restore": "exit 3"})
        assert got["random"] != dumped["random"], msgs
        assert any("post-restore hook failed" in m for m in msgs), msgs
    assert not (node.store / ".quarantine" / "hook.json").exists(), "a worker hook quarantined the checkpoint"
    got, msgs = started(node, "h9", ann("hook"))
    assert got["random"] == dumped["random"], msgs
    count("hostile.trust")


def test_a_checkpoint_moved_into_another_namespaces_store_is_refused(node: RNode):
    """Whoever can write the store cannot rename tenant-a's checkpoint into tenant-b's directory: the signed
    metadata names its namespace."""
    make_checkpoint(node, "moved", short="m-dump", annotations=in_ns("moved", "tenant-a"))
    (node.store_root / "tenant-b").mkdir(mode=0o700)
    (node.store_root / "tenant-a" / "moved").rename(node.store_root / "tenant-b" / "moved")
    got, msgs = started(node, "m1", in_ns("moved", "tenant-b"))
    assert got["counter"] == 1 and any("made in namespace 'tenant-a'" in m for m in msgs), msgs
    count("hostile.trust")
