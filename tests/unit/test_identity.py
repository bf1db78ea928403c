"""Checkpoint ids: Go-compatible identity hash vectors, validation, and the fallback hash."""
from __future__ import annotations

import copy
import hashlib
import json
import random

import pytest

from warmstart import identity as ident
from warmstart.cli import main as cli_main
from warmstart.identity import IdentityError, identity_bytes, identity_hash

# (input identity, the exact bytes Go's json.Marshal writes for the DynamoCheckpoint struct)
SEED = {
    "model": "Qwen/Qwen3-0.6B", "backendFramework": "vllm", "frameworkVersion": "0.14.0",
    "tensorParallelSize": 1, "pipelineParallelSize": 1, "dtype": "bfloat16", "maxModelLen": 8192,
    "extraParameters": {"enableChunkedPrefill": "true"},
}
SEED_BYTES = (b'{"model":"Qwen/Qwen3-0.6B","backendFramework":"vllm","frameworkVersion":"0.14.0",'
              b'"tensorParallelSize":1,"pipelineParallelSize":1,"dtype":"bfloat16","maxModelLen":8192,'
              b'"extraParameters":{"enableChunkedPrefill":"true"}}')

HOSTILE = {
    "extraParameters": {"z": "last", "a": "<script>", "\u00e9": "accent", "B": "upper", "k&v": "x>y"},
    "dtype": "\x01\x7f\b\f\r",
    "model": "a<b>&\"q\"\\\n\t\u2028\u2029 \u00e9 \u6a21\u578b/",
    "tensorParallelSize": 8,
}
HOSTILE_BYTES = (
    b'{"model":"a\\u003cb\\u003e\\u0026\\"q\\"\\\\\\n\\t\\u2028\\u2029 ' + "\u00e9 \u6a21\u578b/".encode()
    + b'","tensorParallelSize":8,"pipelineParallelSize":1,"dtype":"\\u0001\x7f\\b\\f\\r",'
    + b'"extraParameters":{"B":"upper","a":"\\u003cscript\\u003e","k\\u0026v":"x\\u003ey","z":"last",'
    + "\"\u00e9\":\"accent\"}}".encode()
)

VECTORS = [
    ({"model": "m"}, b'{"model":"m","tensorParallelSize":1,"pipelineParallelSize":1}'),
    (SEED, SEED_BYTES),
    (HOSTILE, HOSTILE_BYTES),
    ({"model": "m", "backendFramework": "", "frameworkVersion": "", "tensorParallelSize": 0,
      "pipelineParallelSize": 0, "dtype": "", "maxModelLen": 0, "extraParameters": {}},
     b'{"model":"m","tensorParallelSize":1,"pipelineParallelSize":1}'),
    ({"model": "m", "pipelineParallelSize": 2, "maxModelLen": 2**31 - 1, "frameworkVersion": "1"},
     b'{"model":"m","frameworkVersion":"1","tensorParallelSize":1,"pipelineParallelSize":2,"maxModelLen":2147483647}'),
    ({"model": "m", "backendFramework": None, "dtype": None},
     b'{"model":"m","tensorParallelSize":1,"pipelineParallelSize":1}'),
]


@pytest.mark.parametrize("raw, want", VECTORS)
def test_identity_bytes_match_go(raw, want):
    assert identity_bytes(raw) == want
    assert identity_hash(raw) == hashlib.sha256(want).hexdigest()[:16]


def test_seed_identity_hash_value():
    h = identity_hash(SEED)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert h == hashlib.sha256(SEED_BYTES).hexdigest()[:16]


@pytest.mark.parametrize("raw, want", VECTORS[:3])
def test_input_key_order_irrelevant(raw, want):
    rng = random.Random(1)
    for _ in range(10):
        items = list(raw.items())
        rng.shuffle(items)
        shuffled = dict(items)
        if "extraParameters" in shuffled:
            ep = list(shuffled["extraParameters"].items())
            rng.shuffle(ep)
            shuffled["extraParameters"] = dict(ep)
        assert identity_bytes(shuffled) == want


def test_identity_bytes_does_not_mutate_input():
    raw = {"model": "m", "tensorParallelSize": 0}
    before = copy.deepcopy(raw)
    identity_bytes(raw)
    assert raw == before


def test_go_string_escapes():
    g = ident.go_json_string
    assert g("<>&") == '"\\u003c\\u003e\\u0026"'
    assert g("\u2028\u2029") == '"\\u2028\\u2029"'
    assert g("\x00\x1f") == '"\\u0000\\u001f"'
    assert g("\ud800") == '"\\ufffd"'
    assert g("\U0001F600") == '"\U0001F600"'
    assert g("/") == '"/"'


@pytest.mark.parametrize("raw, field", [
    ({"model": 1}, "model"),
    ({"model": "m", "backendFramework": 3}, "backendFramework"),
    ({"model": "m", "tensorParallelSize": "1"}, "tensorParallelSize"),
    ({"model": "m", "tensorParallelSize": True}, "tensorParallelSize"),
    ({"model": "m", "pipelineParallelSize": -1}, "pipelineParallelSize"),
    ({"model": "m", "maxModelLen": 1.5}, "maxModelLen"),
    ({"model": "m", "maxModelLen": 2**31}, "maxModelLen"),
    ({"model": "m", "extraParameters": {"a": 1}}, "extraParameters"),
    ({"model": "m", "extraParameters": ["a"]}, "extraParameters"),
    ({"model": "m", "mystery": "x"}, "mystery"),
    ({"model": ""}, "model"),
    ({}, "model"),
])
def test_bad_identity_names_field(raw, field):
    with pytest.raises(IdentityError, match=field):
        identity_bytes(raw)


@pytest.mark.parametrize("raw", [None, [], "m", 3])
def test_identity_must_be_object(raw):
    with pytest.raises(IdentityError, match="identity"):
        identity_hash(raw)


# -- CLI ---------------------------------------------------------------------------

def test_cli_identity_prints_hash(capsys):
    shuffled = {k: SEED[k] for k in reversed(list(SEED))}
    assert cli_main.main(["identity", "--json", json.dumps(shuffled)]) == 0
    out, err = capsys.readouterr()
    assert out == identity_hash(SEED) + "\n"
    assert err == ""


@pytest.mark.parametrize("arg, needle", [("{not json", "not valid JSON"), ('{"model": 5}', "model"),
                                         ('{"model": "m", "x": 1}', "'x'")])
def test_cli_identity_errors(capsys, arg, needle):
    assert cli_main.main(["identity", "--json", arg]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert needle in err


# -- fallback hash -------------------------------------------------------------------

BASE_SPEC = {
    "process": {"args": ["python3", "-m", "server"], "cwd": "/app",
                "env": ["PATH=/usr/bin", "MODEL=qwen", "HOSTNAME=pod-abc"]},
    "annotations": {"io.kubernetes.cri.image-name": "registry/img:1"},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
               {"destination": "/data", "type": "bind", "source": "/var/lib/kubelet/pods/uid-1/volumes/data"}],
}


def _spec(**changes):
    s = copy.deepcopy(BASE_SPEC)
    for path, val in changes.items():
        cur = s
        keys = path.split("__")
        for k in keys[:-1]:
            cur = cur[k]
        cur[keys[-1]] = val
    return s


def test_fallback_hash_shape():
    h = ident.fallback_hash(BASE_SPEC)
    assert h.startswith("auto-") and len(h) == 21
    from warmstart.annotations import validate_id
    validate_id(h)


@pytest.mark.parametrize("env_extra", [
    ["HOSTNAME=pod-xyz"],
    ["KUBERNETES_SERVICE_HOST=10.0.0.1", "KUBERNETES_SERVICE_PORT=443", "KUBERNETES_PORT_443_TCP=tcp://x"],
    ["POD_NAME=worker-7f9", "POD_IP=10.1.2.3", "NODE_NAME=node-3"],
    ["MYSVC_SERVICE_HOST=10.0.0.9", "MYSVC_PORT=tcp://10.0.0.9:80", "MYSVC_PORT_80_TCP_ADDR=10.0.0.9"],
    ["DYN_CHECKPOINT_SIGNAL_FILE=/x", "DYN_RESTORE_FOO=1"],
])
def test_fallback_hash_ignores_volatile_env(env_extra):
    env = [e for e in BASE_SPEC["process"]["env"] if not e.startswith("HOSTNAME=")] + env_extra
    assert ident.fallback_hash(_spec(process__env=env)) == ident.fallback_hash(BASE_SPEC)


def test_fallback_hash_ignores_mount_sources_and_order():
    mounts = [dict(m, source=m["source"].replace("uid-1", "uid-2")) for m in reversed(BASE_SPEC["mounts"])]
    assert ident.fallback_hash(_spec(mounts=mounts)) == ident.fallback_hash(BASE_SPEC)
    env = list(reversed(BASE_SPEC["process"]["env"]))
    assert ident.fallback_hash(_spec(process__env=env)) == ident.fallback_hash(BASE_SPEC)


@pytest.mark.parametrize("changes", [
    {"process__args": ["python3", "-m", "server", "--tp", "2"]},
    {"process__cwd": "/other"},
    {"process__env": ["PATH=/usr/bin", "MODEL=llama", "HOSTNAME=pod-abc"]},
    {"annotations": {"io.kubernetes.cri.image-name": "registry/img:2"}},
    {"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data2", "type": "bind", "source": "/var/lib/kubelet/pods/uid-1/volumes/data"}]},
])
def test_fallback_hash_changes_with_what_matters(changes):
    assert ident.fallback_hash(_spec(**changes)) != ident.fallback_hash(BASE_SPEC)
