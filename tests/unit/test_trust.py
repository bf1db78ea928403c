"""The trust checks without root or CRIU: scopes, the privilege rule, the compat record, signatures."""
from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path

import pytest

from warmstart import image_id, signing, trust
from warmstart.metadata import Compat
from warmstart.spec import Spec
from warmstart.trust import TaskSecurity

DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID"]


def spec(**process) -> Spec:
    proc = {"args": ["srv"], "user": {"uid": 0, "gid": 0},
            "capabilities": {k: DEFAULT_CAPS for k in ("bounding", "effective", "permitted")}}
    proc.update(process)
    return Spec({"process": proc, "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "network")]},
                 "annotations": {}})


def own_limits() -> tuple[tuple[int, int], ...]:
    out = []
    for r in range(len(trust.RLIMITS)):
        soft, hard = resource.getrlimit(r)
        inf = trust.RLIM_INFINITY
        out.append((inf if soft == resource.RLIM_INFINITY else soft, inf if hard == resource.RLIM_INFINITY else hard))
    return tuple(out)


def task(**kw) -> TaskSecurity:
    mask = trust.cap_mask(frozenset(DEFAULT_CAPS))
    base = TaskSecurity(tid=1, uids=(0, 0, 0, 0), gids=(0, 0, 0, 0), groups=(),
                        caps={"inheritable": 0, "permitted": mask, "effective": mask, "bounding": mask, "ambient": 0},
                        no_new_privs=False, seccomp_mode="disabled", rlimits=own_limits(),
                        namespaces=("mount", "network", "pid"))
    return dataclasses.replace(base, **kw)


def test_same_privileges_pass():
    assert trust.privilege_refusal([task()], spec()) is None


def test_root_all_caps_into_an_unprivileged_spec_is_refused():
    """The issue's case: uid 0, all capabilities, no seccomp, into uid 1000, no caps, NNP, a seccomp profile."""
    unpriv = Spec({"process": {"args": ["srv"], "user": {"uid": 1000, "gid": 1000}, "noNewPrivileges": True},
                   "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}],
                             "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}})
    everything = (1 << len(trust.CAPS)) - 1
    root = task(caps={k: everything for k in ("inheritable", "permitted", "effective", "bounding", "ambient")})
    why = trust.privilege_refusal([root], unpriv)
    assert why and why.startswith("process.user.uid"), why


@pytest.mark.parametrize("kw, field", [
    ({"uids": (0, 1000, 0, 0)}, None),                       # root with CAP_SETUID may switch: fine
])
def test_setuid_capable_process_may_switch(kw, field):
    assert trust.privilege_refusal([task(**kw)], spec()) is None


@pytest.mark.parametrize("mutate, field", [
    (lambda t: dataclasses.replace(t, uids=(0, 0, 0, 0)), "process.user.uid"),
    (lambda t: dataclasses.replace(t, gids=(0, 0, 0, 0)), "process.user.gid"),
    (lambda t: dataclasses.replace(t, groups=(0,)), "process.user.additionalGids"),
    (lambda t: dataclasses.replace(t, caps={**t.caps, "permitted": 1 << 21}), "process.capabilities.permitted"),
    (lambda t: dataclasses.replace(t, caps={**t.caps, "effective": 1 << 21}), "process.capabilities.effective"),
    (lambda t: dataclasses.replace(t, caps={**t.caps, "bounding": 1 << 21}), "process.capabilities.bounding"),
    (lambda t: dataclasses.replace(t, caps={**t.caps, "ambient": 1 << 21}), "process.capabilities.ambient"),
    (lambda t: dataclasses.replace(t, caps={**t.caps, "inheritable": 1 << 21}), "process.capabilities.inheritable"),
    (lambda t: dataclasses.replace(t, no_new_privs=False), "process.noNewPrivileges"),
    (lambda t: dataclasses.replace(t, seccomp_mode="disabled"), "linux.seccomp"),
    (lambda t: dataclasses.replace(t, namespaces=("mount", "network", "pid", "user")), "linux.namespaces"),
    (lambda t: dataclasses.replace(t, rlimits=((1, trust.RLIM_INFINITY),) + t.rlimits[1:7]
                                   + ((1024, 1 << 20),) + t.rlimits[8:]), "process.rlimits"),
])
def test_each_field_beyond_an_unprivileged_spec_is_refused(mutate, field):
    """A uid-1000 process without SETUID/SETGID/SYS_RESOURCE, NNP, seccomp, NOFILE hard 4096."""
    s = Spec({"process": {"args": ["srv"], "user": {"uid": 1000, "gid": 1000}, "noNewPrivileges": True,
                          "capabilities": {k: ["CAP_KILL"] for k in ("bounding", "effective", "permitted")},
                          "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}]},
              "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "network")],
                        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}})
    kill = trust.cap_mask(frozenset({"CAP_KILL"}))
    ok = task(uids=(1000,) * 4, gids=(1000,) * 4, no_new_privs=True, seccomp_mode="filter",
              caps={"inheritable": 0, "permitted": kill, "effective": kill, "bounding": kill, "ambient": 0},
              rlimits=own_limits()[:7] + ((1024, 4096),) + own_limits()[8:])
    assert trust.privilege_refusal([ok], s) is None
    why = trust.privilege_refusal([ok, mutate(ok)], s)  # a thread is checked as much as the leader
    assert why and why.startswith(field), why


def test_scope_of():
    assert trust.scope_of(spec()) == trust.LOCAL_SCOPE
    s = Spec({"annotations": {"io.kubernetes.cri.sandbox-namespace": "tenant-a"}})
    assert trust.scope_of(s) == "tenant-a"
    with pytest.raises(trust.TrustError, match="sandbox-namespace"):
        trust.scope_of(Spec({"annotations": {"io.kubernetes.cri.sandbox-namespace": "../x"}}))


def compat(**kw) -> Compat:
    c = Compat.of(spec(), "tenant-a", "sha256:" + "a" * 64, {"arch": "x86_64", "criu": "4.1.1"}, 2)
    return dataclasses.replace(c, **kw)


def test_compat_round_trips_and_matches_itself():
    c = compat()
    assert Compat.from_json(json.loads(json.dumps(c.to_json()))) == c
    assert c.refusal(compat()) is None


@pytest.mark.parametrize("here, needle", [
    (dict(scope="tenant-b"), "belongs to namespace 'tenant-a'"),
    (dict(image_fingerprint="sha256:" + "b" * 64), "container image differs"),
    (dict(args=("other",)), "container args"),
    (dict(namespaces=("mount", "network", "pid", "user")), "namespaces"),
    (dict(id_mappings={"uidMappings": [[0, 1000, 1]], "gidMappings": []}), "uid/gid mappings"),
    (dict(seccomp_sha256="c" * 64), "seccomp profile"),
    (dict(criu="4.0"), "CRIU"),
    (dict(arch="aarch64"), "arch"),
])
def test_compat_refusals_name_the_field(here, needle):
    why = compat().refusal(compat(**here))
    assert why and needle in why, why


def test_compat_shared_checkpoint_crosses_scopes():
    assert compat().refusal(compat(scope="tenant-b"), shared=True) is None


def test_signatures(tmp_path: Path):
    signing.keygen(tmp_path / "a.key", tmp_path / "a.pub")
    signing.keygen(tmp_path / "b.key", tmp_path / "b.pub")
    sig = signing.sign(tmp_path / "a.key", "f" * 64)
    trusted_a = signing.TrustPolicy((tmp_path / "a.pub",))
    assert sig["key_id"] in trusted_a.verify("f" * 64, sig)
    with pytest.raises(signing.SignatureError, match="does not match"):
        trusted_a.verify("e" * 64, sig)
    with pytest.raises(signing.SignatureError, match="not in this node's trusted_keys"):
        signing.TrustPolicy((tmp_path / "b.pub",)).verify("f" * 64, sig)
    with pytest.raises(signing.SignatureError, match="not signed"):
        trusted_a.verify("f" * 64, None)
    assert trusted_a.fingerprint != signing.TrustPolicy((tmp_path / "b.pub",)).fingerprint


def test_image_fingerprint_is_content_not_place(tmp_path: Path):
    for d in ("one", "two"):
        (tmp_path / d / "etc").mkdir(parents=True)
        (tmp_path / d / "etc" / "os-release").write_text("ID=test\n")
        (tmp_path / d / "bin").symlink_to("usr/bin")
    a, b = image_id.fingerprint(tmp_path / "one"), image_id.fingerprint(tmp_path / "two")
    assert a == b and a.startswith("sha256:")
    (tmp_path / "two" / "etc" / "os-release").write_text("ID=other-image\n")
    assert image_id.fingerprint(tmp_path / "two") != a


def test_spec_view_defaults():
    s = Spec({})
    assert s.args == [] and s.uid == 0 and s.capabilities["ambient"] == frozenset()
    assert s.image_name == "" and s.k8s_namespace is None and s.seccomp_sha256 == "" and not s.has_gpu
    g = Spec({"linux": {"devices": [{"path": "/dev/nvidia0"}]}})
    assert g.has_gpu
