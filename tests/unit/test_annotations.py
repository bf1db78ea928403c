"""The opt-in contract: warmstart.dev/* annotations -> Policy or AnnotationError."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmstart import annotations as A
from warmstart.annotations import AnnotationError, Mode, Policy, policy_from_spec
from warmstart.identity import identity_hash


def spec(ann: dict | None = None, env: list[str] | None = None) -> dict:
    s = {"process": {"args": ["srv"], "cwd": "/", "env": env or ["PATH=/bin"]}}
    if ann is not None:
        s["annotations"] = ann
    return s


def test_not_opted_in():
    assert policy_from_spec(spec()) is None
    assert policy_from_spec(spec({})) is None
    assert policy_from_spec(spec({"other.dev/checkpoint": "on-stop"})) is None


@pytest.mark.parametrize("raw, mode", [("on-stop", Mode.ON_STOP), ("restore-only", Mode.RESTORE_ONLY),
                                       (" on-stop ", Mode.ON_STOP)])
def test_modes(raw, mode):
    p = policy_from_spec(spec({A.CHECKPOINT: raw, A.ID: "ck1"}))
    assert p == Policy(mode, "ck1", "id", None)


def test_mode_off_is_none():
    assert policy_from_spec(spec({A.CHECKPOINT: "off", A.ID: "ck1"})) is None


@pytest.mark.parametrize("raw", ["always", "On-Stop", "", "on_stop"])
def test_unknown_mode(raw):
    with pytest.raises(AnnotationError, match="warmstart.dev/checkpoint") as e:
        policy_from_spec(spec({A.CHECKPOINT: raw, A.ID: "ck1"}))
    assert "on-stop" in str(e.value)


def test_missing_mode():
    with pytest.raises(AnnotationError, match="warmstart.dev/checkpoint: missing"):
        policy_from_spec(spec({A.ID: "ck1"}))


def test_sandbox_is_none():
    ann = {A.CHECKPOINT: "on-stop", A.ID: "ck1", "io.kubernetes.cri.container-type": "sandbox"}
    assert policy_from_spec(spec(ann)) is None
    ann["io.kubernetes.cri.container-type"] = "container"
    assert policy_from_spec(spec(ann)).checkpoint_id == "ck1"


@pytest.mark.parametrize("cid", ["../x", "/abs", "a/b", ".hidden", "..", ".", "a\x00b", "x" * 129, "",
                                 "caf\u00e9", "\u6a21\u578b", "a b", "a\nb", "a:b", "ck\u0661"])
def test_bad_ids(cid):
    with pytest.raises(AnnotationError, match="warmstart.dev/id"):
        policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.ID: cid}))


@pytest.mark.parametrize("cid", ["x" * 128, "a", "A-b_c.d", "-x", "_x", "0", "a..b"])
def test_good_ids(cid):
    assert policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.ID: cid})).checkpoint_id == cid


def test_non_string_id():
    with pytest.raises(AnnotationError, match="warmstart.dev/id"):
        policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.ID: 5}))


IDENT = {"model": "Qwen/Qwen3-0.6B", "dtype": "bfloat16"}


def test_identity_gives_hash():
    p = policy_from_spec(spec({A.CHECKPOINT: "restore-only", A.IDENTITY: json.dumps(IDENT)}))
    assert p.checkpoint_id == identity_hash(IDENT)
    assert p.id_source == "identity"
    assert p.identity == {**IDENT, "tensorParallelSize": 1, "pipelineParallelSize": 1}


@pytest.mark.parametrize("raw", ["{", "[]", '{"model": 1}', '{"nomodel": "x"}', "null", '"m"'])
def test_bad_identity_names_annotation(raw):
    with pytest.raises(AnnotationError, match="warmstart.dev/identity"):
        policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.IDENTITY: raw}))


def test_id_and_identity():
    h = identity_hash(IDENT)
    p = policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.IDENTITY: json.dumps(IDENT), A.ID: h}))
    assert p.checkpoint_id == h and p.id_source == "id" and p.identity is not None
    with pytest.raises(AnnotationError, match="conflict") as e:
        policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.IDENTITY: json.dumps(IDENT), A.ID: "other"}))
    assert A.ID in str(e.value) and A.IDENTITY in str(e.value)


def test_env_hash_used_without_id_or_identity():
    p = policy_from_spec(spec({A.CHECKPOINT: "on-stop"}, env=["PATH=/bin", "DYN_CHECKPOINT_HASH=abc123"]))
    assert (p.checkpoint_id, p.id_source) == ("abc123", "env")
    # an explicit id wins over the env
    p = policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.ID: "x1"}, env=["DYN_CHECKPOINT_HASH=abc123"]))
    assert p.checkpoint_id == "x1"
    with pytest.raises(AnnotationError, match="DYN_CHECKPOINT_HASH"):
        policy_from_spec(spec({A.CHECKPOINT: "on-stop"}, env=["DYN_CHECKPOINT_HASH=../etc"]))


def test_auto_id():
    p = policy_from_spec(spec({A.CHECKPOINT: "on-stop"}))
    assert p.id_source == "auto" and p.checkpoint_id.startswith("auto-")


@pytest.mark.parametrize("key", ["warmstart.dev/checkpiont", "warmstart.dev/", "warmstart.dev/ID"])
def test_unknown_key(key):
    with pytest.raises(AnnotationError, match="unknown annotation") as e:
        policy_from_spec(spec({A.CHECKPOINT: "on-stop", key: "x"}))
    assert key in str(e.value)


def test_value_limits():
    with pytest.raises(AnnotationError, match="NUL"):
        policy_from_spec(spec({A.CHECKPOINT: "on-stop\x00"}))
    with pytest.raises(AnnotationError):
        policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.IDENTITY: " " * (A.MAX_VALUE + 1)}))


def test_annotations_not_object():
    with pytest.raises(AnnotationError, match="annotations"):
        policy_from_spec({"annotations": ["warmstart.dev/checkpoint"]})


def test_deeply_nested_identity_is_annotation_error():
    with pytest.raises(AnnotationError, match="warmstart.dev/identity"):
        policy_from_spec(spec({A.CHECKPOINT: "on-stop", A.IDENTITY: "[" * 60000}))


# -- fuzz ----------------------------------------------------------------------------

_texts = st.one_of(
    st.text(max_size=140),
    st.text(alphabet="abcXYZ019._-/\\\x00 \u00e9", max_size=140),
    st.sampled_from(["on-stop", "restore-only", "off", "..", ".", "", "../x", "/abs", "a/b", "x" * 128, "x" * 129]),
)
_identity_values = st.one_of(
    _texts,
    st.builds(json.dumps, st.dictionaries(
        st.sampled_from(["model", "dtype", "tensorParallelSize", "maxModelLen", "extraParameters", "bogus"]),
        st.one_of(st.text(max_size=20), st.integers(-3, 2**32), st.none(), st.booleans(),
                  st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
        max_size=5)),
)
_annotations = st.fixed_dictionaries(
    {},
    optional={
        A.CHECKPOINT: st.one_of(st.sampled_from(["on-stop", "restore-only", "off"]), _texts),
        A.ID: _texts,
        A.IDENTITY: _identity_values,
        "warmstart.dev/other": _texts,
        "io.kubernetes.cri.container-type": st.sampled_from(["sandbox", "container"]),
        "unrelated": _texts,
    },
)
_env = st.lists(st.one_of(st.text(max_size=30), st.builds(lambda v: "DYN_CHECKPOINT_HASH=" + v, _texts)),
                max_size=4)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ann=_annotations, env=_env)
def test_fuzz_policy_or_annotation_error(ann, env):
    try:
        p = policy_from_spec({"process": {"args": ["x"], "env": env}, "annotations": ann})
    except AnnotationError as e:
        assert str(e)
        return
    if p is None:
        return
    assert isinstance(p, Policy)
    assert A.ID_RE.fullmatch(p.checkpoint_id), p.checkpoint_id
    assert "/" not in p.checkpoint_id and not p.checkpoint_id.startswith(".")
    assert p.id_source in {"id", "identity", "env", "auto"}
