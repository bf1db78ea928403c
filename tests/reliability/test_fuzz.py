"""Bounded fuzzing (hypothesis) of every parser that reads untrusted input: metadata.json, the checkpoint
marker, deleted.files, rootfs-diff.tar members and the warmstart.dev/* annotations.

Property: each either accepts the input and returns only safe values (relative paths inside the rootfs,
ids from the id alphabet), or raises its own refusal error — never another exception.
WARMSTART_FUZZ_EXAMPLES sets the examples per parser (default 1500).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath

import pytest
from reliability_lib import count

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from warmstart import annotations, metadata, rootfs  # noqa: E402
from warmstart.config import Settings  # noqa: E402
from warmstart.store import CheckpointError, Store  # noqa: E402

pytestmark = [pytest.mark.reliability]
N = int(os.environ.get("WARMSTART_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

path_chars = st.sampled_from(list("ab./\\\x00\n -_") + ["..", "/", "é", "z"])
paths = st.lists(path_chars, min_size=0, max_size=24).map("".join)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=12), ch, max_size=4),
                           max_leaves=20)


def safe_rel(p: str) -> bool:
    pp = PurePosixPath(p)
    return bool(p) and not pp.is_absolute() and ".." not in pp.parts and "\x00" not in p and "\n" not in p


@FUZZ
@given(st.binary(max_size=400) | st.lists(paths, max_size=8).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")))
def test_fuzz_deleted_files(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("del") / "deleted.files"
    f.write_bytes(data)
    count("fuzz.deleted_files")
    try:
        out = rootfs.read_deleted(f)
    except rootfs.RootfsError:
        return
    assert all(safe_rel(p) for p in out), out


entry = st.tuples(paths, st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                          tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]),
                  paths, st.integers(0, 0o7777))


@FUZZ
@given(st.lists(entry, max_size=6))
def test_fuzz_rootfs_diff_members(tmp_path_factory, entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, type_, link, mode in entries:
            ti = tarfile.TarInfo(name.replace("\x00", "") or "x")
            ti.type, ti.mode, ti.linkname = type_, mode, link.replace("\x00", "")
            tar.addfile(ti, io.BytesIO(b"") if type_ == tarfile.REGTYPE else None)
    f = tmp_path_factory.mktemp("tar") / "rootfs-diff.tar"
    f.write_bytes(buf.getvalue())
    count("fuzz.rootfs_diff")
    try:
        members = rootfs.read_members(f)
    except rootfs.RootfsError:
        return
    for m in members:
        assert safe_rel(m.name) and (m.isreg() or m.isdir() or m.issym()), m.name
        assert not m.mode & 0o6000
        if m.issym() and not m.linkname.startswith("/"):
            depth = len(PurePosixPath(m.name).parent.parts)
            for part in PurePosixPath(m.linkname).parts:
                depth += -1 if part == ".." else (0 if part == "." else 1)
                assert depth >= 0, (m.name, m.linkname)


@FUZZ
@given(st.dictionaries(st.sampled_from([annotations.CHECKPOINT, annotations.ID, annotations.IDENTITY,
                                        "warmstart.dev/x", "io.kubernetes.cri.container-type", "other"]),
                       st.text(max_size=40) | paths | json_values.map(json.dumps), max_size=4),
       st.lists(st.sampled_from(["DYN_CHECKPOINT_HASH=../x", "DYN_CHECKPOINT_HASH=ok", "A=b"]), max_size=2))
def test_fuzz_annotations(ann, env):
    count("fuzz.annotations")
    try:
        pol = annotations.policy_from_spec({"annotations": ann, "process": {"env": env, "args": ["x"]}})
    except annotations.AnnotationError:
        return
    if pol is not None:
        assert annotations.ID_RE.fullmatch(pol.checkpoint_id) and "/" not in pol.checkpoint_id


@FUZZ
@given(json_values)
def test_fuzz_metadata_schema(value):
    count("fuzz.metadata")
    try:
        metadata.validate(value)
    except ValueError:
        return
    assert isinstance(value, dict)


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
       st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_open_verified(tmp_path_factory, marker, meta):
    base = tmp_path_factory.mktemp("ov")
    base.chmod(0o700)
    s = Store(Settings(store=base / "store", seal_dir=base / "seals", state_dir=base / "st", log_dir=base / "l"))
    s.ensure()
    p = base / "store" / "fz"
    p.mkdir(mode=0o700)
    for name, data in (("checkpoint.done", marker), ("metadata.json", meta)):
        (p / name).write_bytes(data)
        os.chmod(p / name, 0o600)
    count("fuzz.open_verified")
    with pytest.raises(CheckpointError):
        s.open_verified("fz")
