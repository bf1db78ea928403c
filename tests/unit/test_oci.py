"""Pulled checkpoint images are hostile: oci.import_layout on layouts an attacker built.

Each hostile case must be refused with OciError (never another exception), and must not have
written more than its manifest allows into the destination dir. The builders here (layout, entry,
control, sparse_entry) are also used by tests/reliability/test_hostile_pulls.py, which pushes some
of these layouts to a real registry.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import pytest
from test_store import CID, meta, publish, small_tree, store  # noqa: F401 - store, small_tree are fixtures

import zstandard

from warmstart import config, oci, signing
from warmstart.store import MARKER, METADATA, CheckpointError, sha256_file

BIG = 64 << 20  # what a hostile entry expands to; its layer is a few KiB
CAP = 1 << 40


def entry(name: str, data: bytes | int, **attrs: object) -> Iterator[bytes]:
    """One pax tar entry, streamed; an int `data` is that many zero bytes. attrs set TarInfo fields."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = data if isinstance(data, int) else len(data), 0o600, 1_700_000_000
    for k, v in attrs.items():
        setattr(info, k, v)
    yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if isinstance(data, bytes):
        yield data
    else:
        for done in range(0, data, 1 << 20):
            yield bytes(min(1 << 20, data - done))
    yield bytes(-info.size % 512)


def control(sizes: dict[str, int], signing_key: Path | None = None) -> list[Iterator[bytes]]:
    """metadata.json (schema-valid, its manifest listing `sizes`) and checkpoint.done, as a push writes them;
    signed with `signing_key` when given (an unsigned checkpoint is refused once unpacked)."""
    m = meta(CID)
    m["manifest"] = {name: {"sha256": "0" * 64, "size": n} for name, n in sizes.items()}
    raw = json.dumps(m).encode()
    body = {"success": True, "metadata_sha256": hashlib.sha256(raw).hexdigest()}
    if signing_key is not None:
        body["signature"] = signing.sign(signing_key, body["metadata_sha256"])
    return [entry(METADATA, raw), entry(MARKER, json.dumps(body).encode())]


def sparse_entry(name: str, real_size: int, pax: bool) -> Iterator[bytes]:
    """A 512-byte sparse file that unpacks to `real_size` bytes: GNU 'S' header, or GNU sparse 1.0 in pax."""
    if pax:
        headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                   "GNU.sparse.realsize": str(real_size)}
        yield from entry(f"GNUSparseFile.0/{name}", b"1\n0\n512\n".ljust(512, b"\0") + b"x" * 512,
                         pax_headers=headers)
        return
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = tarfile.GNUTYPE_SPARSE, 512, 0o600
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    buf[386:410] = b"%011o\0%011o\0" % (0, 512)  # one data region, then a hole up to the real size
    buf[483:495] = b"%011o\0" % real_size
    buf[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(buf))[0]
    yield bytes(buf)
    yield b"x" * 512


def layout(path: Path, entries: Iterable[Iterable[bytes]], gz: bool = False, cid: str = CID) -> Path:
    """An OCI layout as export_layout writes it, except that its one layer holds `entries` in this order."""
    (path / "empty").mkdir(parents=True)
    oci.export_layout(path / "empty", cid, path / "layout", "checkpoint")
    blobs = path / "layout" / "blobs" / "sha256"
    with gzip.open(path / "layer", "wb", compresslevel=1) if gz else open(path / "layer", "wb") as f:
        for chunk in (c for e in entries for c in e):
            f.write(chunk)
        f.write(bytes(1024))
    digest = sha256_file(path / "layer")
    os.rename(path / "layer", blobs / digest)
    index = json.loads((path / "layout" / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    manifest["layers"] = [{"mediaType": oci.LAYER_TYPE + ("+gzip" if gz else ""), "digest": f"sha256:{digest}",
                           "size": (blobs / digest).stat().st_size}]
    raw = json.dumps(manifest).encode()
    (blobs / hashlib.sha256(raw).hexdigest()).write_bytes(raw)
    index["manifests"][0].update(digest=f"sha256:{hashlib.sha256(raw).hexdigest()}", size=len(raw))
    (path / "layout" / "index.json").write_text(json.dumps(index))
    return path / "layout"


def image_manifest(lay: Path) -> dict:
    blobs = lay / "blobs" / "sha256"
    index = json.loads((lay / "index.json").read_text())
    return json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())


def layer_blob(lay: Path, i: int = 0) -> Path:
    return lay / "blobs" / "sha256" / image_manifest(lay)["layers"][i]["digest"][7:]


def rewrite_manifest(lay: Path, manifest: dict) -> None:
    """Store an edited manifest and point the index at it, as an attacker who rebuilt the image would."""
    raw = json.dumps(manifest).encode()
    (lay / "blobs" / "sha256" / hashlib.sha256(raw).hexdigest()).write_bytes(raw)
    index = json.loads((lay / "index.json").read_text())
    index["manifests"][0].update(digest=f"sha256:{hashlib.sha256(raw).hexdigest()}", size=len(raw))
    (lay / "index.json").write_text(json.dumps(index))


def written(dest: Path) -> int:
    return sum(f.stat().st_size for f in dest.iterdir())


@pytest.fixture
def dest(tmp_path) -> Path:
    d = tmp_path / "unpacked"
    d.mkdir(mode=0o700)
    return d


def refused(lay: Path, dest: Path, needle: str, max_bytes: int = CAP, expect_id: str | None = None) -> None:
    with pytest.raises(oci.OciError, match=needle):
        oci.import_layout(lay, dest, max_bytes, expect_id)


def test_round_trip_puts_the_manifest_first_and_adopts(store, tmp_path, dest):
    ck = publish(store)
    oci.export_layout(ck, CID, tmp_path / "layout", "checkpoint", oci.Packing(compress="none"))
    assert oci.import_layout(tmp_path / "layout", dest, CAP, expect_id=CID) == CID
    with tarfile.open(layer_blob(tmp_path / "layout")) as tar:
        assert tar.getnames()[:2] == [METADATA, MARKER]
    assert {f.name: f.read_bytes() for f in dest.iterdir()} == {f.name: f.read_bytes() for f in ck.iterdir()}
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in dest.iterdir())
    store.remove(CID)
    store.adopt(CID, dest)  # the store's full verification passes on what was unpacked


@pytest.mark.parametrize("pax", [False, True], ids=["gnu-header", "pax-1.0"])
def test_sparse_member_refused(tmp_path, dest, pax):
    """A 1 KiB entry that would unpack to BIG bytes, even with a manifest that admits BIG bytes."""
    lay = layout(tmp_path, [*control({"pages-1.img": BIG}), sparse_entry("pages-1.img", BIG, pax)])
    refused(lay, dest, "pages-1.img.*non-sparse")
    assert written(dest) < 1 << 20


@pytest.mark.parametrize("where", ["entry", "pax-record", "after-the-end"])
def test_gzip_bomb_refused_without_reading_it(tmp_path, dest, where):
    """A layer of ~100 KiB that gunzips to BIG bytes no manifest entry accounts for: in an entry whose
    header is larger than its manifest size, in one pax header record, or as trailing data."""
    entries = control({"pages-1.img": 4096})
    if where == "entry":
        entries.append(entry("pages-1.img", BIG))
    elif where == "pax-record":
        entries.append(entry("pages-1.img", bytes(4096), pax_headers={"comment": "0" * BIG}))
    else:
        entries += [entry("pages-1.img", bytes(4096)), entry("pages-2.img", BIG)]
    lay = layout(tmp_path, entries, gz=True)
    assert layer_blob(lay).stat().st_size < BIG // 100
    needle = {"entry": f"{BIG} bytes in the tar header, 4096 allowed", "pax-record": "more tar data than",
              "after-the-end": "pages-2.img.*not in the manifest"}[where]
    refused(lay, dest, needle)
    assert written(dest) < 1 << 20


def test_pax_mtime_out_of_range_refused(tmp_path, dest):
    lay = layout(tmp_path, [*control({"pages-1.img": 4}), entry("pages-1.img", b"data", mtime=1e300)])
    refused(lay, dest, r"pages-1.img.*mtime 1e\+300 out of range")


def test_member_larger_than_its_manifest_entry_refused(tmp_path, dest):
    lay = layout(tmp_path, [*control({"pages-1.img": 4096}), entry("pages-1.img", bytes(4097))])
    refused(lay, dest, "pages-1.img.*4097 bytes in the tar header, 4096 allowed")
    assert written(dest) < 1 << 20


@pytest.mark.parametrize("name", ["pages-2.img", "../escape", METADATA, "pages-1.img"])
def test_member_not_in_the_manifest_refused(tmp_path, dest, name):
    """Not listed, a path, a second metadata.json, or a listed file a second time."""
    lay = layout(tmp_path, [*control({"pages-1.img": 4}), entry("pages-1.img", b"data"), entry(name, b"evil")])
    refused(lay, dest, "not in the manifest, or there twice")
    assert not (tmp_path / "escape").exists() and not (dest / "pages-2.img").exists()


@pytest.mark.parametrize("order", ["file-first", "marker-missing"])
def test_manifest_must_come_first(tmp_path, dest, order):
    """Nothing is written before the manifest is known: a layer that does not start with it is refused."""
    meta_entry, marker_entry = control({"dump.log": 3})
    entries = [entry("dump.log", b"log"), meta_entry, marker_entry] if order == "file-first" else [meta_entry]
    refused(layout(tmp_path, entries), dest, f"starts with {METADATA} and {MARKER}")
    assert written(dest) == 0


def test_garbage_layer_refused(tmp_path, dest):
    """Whatever tarfile raises on a layer is a refusal, not a traceback."""
    refused(layout(tmp_path, [[b"not a tar header " * 100]]), dest, "cannot unpack the layer: ReadError")
    assert written(dest) == 0


def test_too_many_bytes_for_the_cap_refused(store, tmp_path, dest, monkeypatch):
    ck = publish(store)
    lay = tmp_path / "layout"
    oci.export_layout(ck, CID, lay, "checkpoint")
    manifest = image_manifest(lay)
    blobs = manifest["config"]["size"] + manifest["layers"][0]["size"]  # what the download writes
    total = sum(f.stat().st_size for f in ck.iterdir())
    refused(lay, dest, "blobs take .* over the", max_bytes=blobs - 1)
    refused(lay, dest, f"files take {total} bytes, over the {total - 1}-byte", max_bytes=blobs + total - 1)
    assert written(dest) == 0
    # the store's free space caps a pull as well as max_pull_bytes
    monkeypatch.setattr(os, "statvfs", lambda _: os.statvfs_result((4096, 4096, 0, 0, 1, 0, 0, 0, 0, 255)))
    refused(lay, dest, "files take .* over the 4096-byte")
    assert written(dest) == 0


def test_id_must_match_the_annotation(store, tmp_path, dest):
    oci.export_layout(publish(store), CID, tmp_path / "layout", "checkpoint")
    refused(tmp_path / "layout", dest, f"holds checkpoint '{CID}', not 'someone-elses-id'",
            expect_id="someone-elses-id")
    assert written(dest) == 0


def test_max_pull_bytes_config(tmp_path):
    assert config.Settings().max_pull_bytes == 256 << 30
    (tmp_path / "c.toml").write_text("max_pull_bytes = 1048576\n")
    assert config.load(tmp_path / "c.toml").max_pull_bytes == 1 << 20
    for bad in ("0", "-1", '"1G"', "1.5", "true"):
        (tmp_path / "c.toml").write_text(f"max_pull_bytes = {bad}\n")
        with pytest.raises(config.ConfigError, match="max_pull_bytes"):
            config.load(tmp_path / "c.toml")


# -- format 2: the small files in one layer, big files in content-addressed chunks ----------------------

CHUNK = 1 << 20
BIG_FILES = {"inventory.img": b"\x01inventory", "dump.log": b"criu says hi\n",
             "pages-1.img": os.urandom(CHUNK) + bytes(CHUNK) + bytes(CHUNK) + b"tail"}


def chunked(store, tmp_path, compress: str = "zstd") -> Path:
    """A published checkpoint with a 3 MiB + 4 B page image, exported in 1 MiB chunks."""
    ck = publish(store, files=BIG_FILES)
    oci.export_layout(ck, CID, tmp_path / "layout", "checkpoint", oci.Packing(CHUNK, compress, 1), "_local")
    return tmp_path / "layout"


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_chunked_round_trip_adopts(store, tmp_path, dest, compress):
    lay = chunked(store, tmp_path, compress)
    layers = image_manifest(lay)["layers"]
    assert [x["annotations"]["warmstart.dev/offset"] for x in layers[1:]] == ["0", str(CHUNK), str(2 * CHUNK),
                                                                              str(3 * CHUNK)]
    assert layers[2]["digest"] == layers[3]["digest"]  # two zero chunks: one blob
    if compress == "zstd":
        assert layers[2]["size"] < 1000  # zeros compress
    assert oci.import_layout(lay, dest, CAP, expect_id=CID, expect_scope="_local") == CID
    assert (dest / "pages-1.img").read_bytes() == BIG_FILES["pages-1.img"]
    assert not (lay / "blobs" / "sha256" / layers[2]["digest"][7:]).exists()  # chunks go once written
    store.remove(CID)
    store.adopt(CID, dest)


def test_unchanged_chunks_keep_their_digest(store, tmp_path):
    """The same bytes pack to the same chunk blobs on every push: what lets the registry skip them."""
    one = chunked(store, tmp_path / "a")
    store.remove(CID)
    changed = dict(BIG_FILES, **{"pages-1.img": BIG_FILES["pages-1.img"][:-4] + b"TAIL"})
    oci.export_layout(publish(store, files=changed), CID, tmp_path / "b" / "layout", "checkpoint",
                      oci.Packing(CHUNK, "zstd", 1))
    first, second = ({x["digest"] for x in image_manifest(lay)["layers"][1:]} for lay in (one, tmp_path / "b" / "layout"))
    assert len(second - first) == 1 and len(first & second) == 2


def test_tampered_chunk_refused(store, tmp_path, dest):
    lay = chunked(store, tmp_path, "none")
    blob = layer_blob(lay, 1)
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(data)
    refused(lay, dest, "does not match its digest")


def test_chunk_bomb_refused(store, tmp_path, dest):
    """A chunk that decompresses to more than it declares: refused after its declared size."""
    lay = chunked(store, tmp_path)
    manifest = image_manifest(lay)
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    digest = hashlib.sha256(bomb).hexdigest()
    (lay / "blobs" / "sha256" / digest).write_bytes(bomb)
    manifest["layers"][2].update(digest=f"sha256:{digest}", size=len(bomb))
    rewrite_manifest(lay, manifest)
    refused(lay, dest, "more than the 1048576 bytes it declares")
    assert written(dest) < 8 << 20


@pytest.mark.parametrize("edit,needle", [
    (lambda ls: ls[2]["annotations"].update({"warmstart.dev/offset": "5"}), "a gap or an overlap"),
    (lambda ls: ls[1]["annotations"].update({"warmstart.dev/file": "../escape"}), "not a checkpoint file name"),
    (lambda ls: ls[1]["annotations"].update({"warmstart.dev/file": METADATA}), "not a checkpoint file name"),
    (lambda ls: ls[1]["annotations"].update({"warmstart.dev/size": "1e9"}), "must be byte counts"),
    (lambda ls: ls[1]["annotations"].update({"warmstart.dev/size": str(2 << 30)}), "must be byte counts"),
    (lambda ls: ls.pop(), "its manifest entry says"),
    (lambda ls: ls[1].update(mediaType="application/vnd.oci.image.layer.v1.tar"), "expected a files layer"),
], ids=["overlap", "path", "control-file", "not-decimal", "too-big", "short", "media-type"])
def test_bad_chunk_table_refused(store, tmp_path, dest, edit, needle):
    lay = chunked(store, tmp_path)
    manifest = image_manifest(lay)
    edit(manifest["layers"])
    rewrite_manifest(lay, manifest)
    refused(lay, dest, needle)
    assert not (dest / "pages-1.img").exists() and not (tmp_path / "escape").exists()


def test_chunks_count_against_the_cap(store, tmp_path, dest):
    lay = chunked(store, tmp_path, "none")
    manifest = image_manifest(lay)
    blobs = manifest["config"]["size"] + sum({x["digest"]: x["size"] for x in manifest["layers"]}.values())
    refused(lay, dest, "blobs take .* over the", max_bytes=blobs - 1)
    refused(lay, dest, "blobs and chunked files take", max_bytes=blobs + (3 << 20))
    assert written(dest) == 0


def test_namespace_must_match_the_annotation(store, tmp_path, dest):
    with pytest.raises(oci.OciError, match="namespace '_local', not 'tenant-a'"):
        oci.import_layout(chunked(store, tmp_path), dest, CAP, CID, "tenant-a")
    assert written(dest) == 0


# -- the parallel unpack: chunks side by side, file digests computed on the way -------------------------

SIX = os.urandom(6 * CHUNK)  # six distinct chunks: more than the workers, so some wait in the queue


def six_chunks(store, tmp_path, compress: str = "zstd") -> Path:
    ck = publish(store, files={**BIG_FILES, "pages-1.img": SIX})
    oci.export_layout(ck, CID, tmp_path / "layout", "checkpoint", oci.Packing(CHUNK, compress, 1), "_local")
    return tmp_path / "layout"


@pytest.mark.parametrize("which", [0, 3, 5])
def test_tampered_chunk_fails_the_parallel_unpack_and_leaves_no_chunked_file(store, tmp_path, dest, which):
    lay = six_chunks(store, tmp_path, "none")
    blob = layer_blob(lay, 1 + which)
    data = bytearray(blob.read_bytes())
    data[CHUNK // 2] ^= 1
    blob.write_bytes(data)
    refused(lay, dest, "pages-1.img.*does not match its digest")
    assert not (dest / "pages-1.img").exists()


def test_one_failing_chunk_stops_the_others_and_removes_their_output(store, tmp_path, dest, monkeypatch):
    """The first chunk fails while the second runs: the second stops at its next read, the four queued ones
    never start, and the file they were writing is gone."""
    import threading
    lay = six_chunks(store, tmp_path)
    started, real = [], oci._unpack_chunk
    second_running = threading.Event()

    def flaky(layout, fd, c, piece, pieces, stop, arrival):
        started.append(c.offset)
        if c.offset == 0:
            assert second_running.wait(10)
            raise oci.OciError("chunk 0 failed on purpose")
        second_running.set()
        assert stop.wait(10)  # still running when the first one fails
        return real(layout, fd, c, piece, pieces, stop, arrival)

    monkeypatch.setattr(oci, "_unpack_chunk", flaky)
    monkeypatch.setattr(oci, "UNPACK_WORKERS", 2)
    with pytest.raises(oci.OciError) as e:
        oci.import_layout(lay, dest, CAP)
    assert "chunk 0 failed on purpose" in str(e.value)
    assert sorted(started) == [0, CHUNK]
    assert not (dest / "pages-1.img").exists()


def test_file_digests_come_from_the_unpack_and_bind_the_written_bytes(store, tmp_path, dest, small_tree):
    """Tree pieces (4 KiB here) that lie inside 1 MiB chunks are hashed as the chunks are written: the pull
    hands Store.adopt the manifest's own digest, and adopt reads no page file again; a file changed after
    it was written (same size) is re-read and refused."""
    lay = six_chunks(store, tmp_path)
    want = json.loads((store.path(CID) / METADATA).read_text())["manifest"]["pages-1.img"]
    assert want["hash"] == "sha256-tree-64MiB"
    known: dict = {}
    oci.import_layout(lay, dest, CAP, CID, "_local", known=known)
    assert set(known) == {"pages-1.img"} and known["pages-1.img"].sha256 == want["sha256"]
    store.remove(CID)
    reads = []
    monkeypatch_read = pytest.MonkeyPatch()
    for fn in ("sha256_tree", "sha256_file"):
        real = getattr(small_tree, fn)
        monkeypatch_read.setattr(small_tree, fn, lambda p, *a, _r=real, **k: reads.append(p.name) or _r(p, *a, **k))
    try:
        store.adopt(CID, dest, known=known)
    finally:
        monkeypatch_read.undo()
    assert "pages-1.img" not in reads
    assert store.open_verified(CID).verified_by == "seal"  # adopt sealed it from its one check

    store.remove(CID)
    dest2 = tmp_path / "again"
    dest2.mkdir(mode=0o700)
    known = {}
    oci.import_layout(six_chunks(store, tmp_path / "b"), dest2, CAP, known=known)
    with open(dest2 / "pages-1.img", "r+b") as f:
        f.seek(CHUNK + 5)
        f.write(bytes([SIX[CHUNK + 5] ^ 1]))
    store.remove(CID)
    with pytest.raises(CheckpointError, match="pages-1.img: SHA-256 mismatch"):
        store.adopt(CID, dest2, known=known)


@pytest.mark.parametrize("piece", [3 << 19, 2 << 20], ids=["straddles-chunks", "two-chunks"])
def test_no_known_digest_when_a_piece_spans_chunks(store, tmp_path, dest, small_tree, monkeypatch, piece):
    """A digest piece that no single chunk holds cannot be hashed on the way: the file is left to a re-read."""
    monkeypatch.setattr(small_tree, "TREE_PIECE", piece)
    known: dict = {}
    oci.import_layout(six_chunks(store, tmp_path), dest, CAP, known=known)
    assert known == {}
    store.remove(CID)
    store.adopt(CID, dest, known=known)


# -- unpacking while the download runs (transfer.pull: oci.unpack_image with oci.arrivals) ----------------

def held_back(lay: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """The layout with its chunk blobs moved aside, as a download that has not reached them yet."""
    aside = tmp_path / "aside"
    aside.mkdir()
    blobs = [layer_blob(lay, i) for i in range(1, len(image_manifest(lay)["layers"]))]
    for b in blobs:
        os.rename(b, aside / b.name)
    return aside, blobs


def test_chunks_are_unpacked_as_their_blobs_arrive(store, tmp_path, dest, small_tree):
    """Blobs that appear one by one, the way skopeo renames each finished blob into place: each chunk waits
    for its own, and the result is the same checkpoint, adopted."""
    import threading
    lay = six_chunks(store, tmp_path)
    image = oci.check_manifest(image_manifest(lay), CAP, CID)
    aside, blobs = held_back(lay, tmp_path)
    done = threading.Event()

    def arrive() -> None:
        for b in reversed(blobs):  # the last chunk first: the unpack must wait, not fail
            time.sleep(0.05)
            os.rename(aside / b.name, b)
        done.set()
    t = threading.Thread(target=arrive)
    t.start()
    known: dict = {}
    oci.unpack_image(image, lay, dest, CAP, known=known, arrival=oci.arrivals(lay, done.is_set))
    t.join()
    assert (dest / "pages-1.img").read_bytes() == SIX and set(known) == {"pages-1.img"}
    store.remove(CID)
    store.adopt(CID, dest, known=known)


def test_a_blob_that_never_arrives_fails_once_the_download_is_over(store, tmp_path, dest):
    lay = six_chunks(store, tmp_path)
    image = oci.check_manifest(image_manifest(lay), CAP, CID)
    held_back(lay, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(oci.OciError, match="missing from the pulled image"):
        oci.unpack_image(image, lay, dest, CAP, arrival=oci.arrivals(lay, lambda: time.monotonic() - t0 > 0.2))
    assert not (dest / "pages-1.img").exists()


def test_waiting_for_a_blob_stops_when_another_chunk_fails(tmp_path):
    import threading
    stop = threading.Event()
    stop.set()
    wait = oci.arrivals(tmp_path, lambda: False)
    with pytest.raises(oci.OciError):  # oci._Stopped: the failing chunk's error is the one reported
        wait("sha256:" + "0" * 64, stop)
