"""Two install.sh runs at once on one CRIU cache: they build CRIU once, and both finish with a working CRIU.

Both runs really build (make) in a fresh cache seeded with the node's downloaded CRIU tarball (no network),
into a private CRIU prefix and config dir, so the node's /usr/local/sbin/criu and
/var/cache/warmstart/criu-X build tree are never touched.  Without install.sh's lock on the cache, both
runs find no build, and both extract into and compile in the same tree: two "building CRIU" lines, or a
failed run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "install.sh"
CRIU_VERSION = re.search(r"^CRIU_VERSION=(\S+)$", INSTALL.read_text(), flags=re.M).group(1)
TARBALL = Path("/var/cache/warmstart") / f"criu_{CRIU_VERSION}.orig.tar.xz"

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (install.sh refuses to run otherwise)"),
    pytest.mark.skipif(not TARBALL.exists(), reason=f"needs install.sh's downloaded {TARBALL}"),
    pytest.mark.skipif(not shutil.which("make") or not shutil.which("flock"),
                       reason="needs CRIU's build deps and flock (install.sh's packages step)"),
    # install.sh takes a usable distro CRIU instead of building: nothing to race for.
    pytest.mark.skipif(Path("/usr/sbin/criu").exists(), reason="a distro CRIU at /usr/sbin/criu would be taken"),
]


def test_two_concurrent_installs_build_criu_once(tmp_path: Path) -> None:
    cache, prefix = tmp_path / "cache", tmp_path / "prefix"
    cache.mkdir()
    seed = cache / TARBALL.name
    try:
        os.link(TARBALL, seed)  # install.sh only reads it (a bad hash is replaced, not written to)
    except OSError:
        shutil.copy(TARBALL, seed)
    env = {**os.environ, "WARMSTART_CACHE": str(cache), "WARMSTART_CRIU_PREFIX": str(prefix),
           "WARMSTART_ETC": str(tmp_path / "etc"), "WARMSTART_VENV": str(tmp_path / "venv"),
           "WARMSTART_BIN_DIR": str(tmp_path / "bin")}
    runs = [subprocess.Popen(["bash", str(INSTALL), "--only", "criu"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    try:
        outs = [r.communicate(timeout=600)[0] for r in runs]
    finally:
        for r in runs:
            r.kill()
    report = "\n----\n".join(outs)
    assert [r.returncode for r in runs] == [0, 0], report
    assert report.count("building CRIU") == 1, report
    # The run that waited found the other's CRIU installed and skipped, without rebuilding or reinstalling.
    waited = [o for o in outs if "waiting for another install's CRIU build" in o]
    assert len(waited) == 1, report
    assert f"step criu: skipped ({prefix}/sbin/criu {CRIU_VERSION}" in waited[0], report
    version = subprocess.run([prefix / "sbin" / "criu", "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and f"Version: {CRIU_VERSION}" in version.stdout, version
    shutil.rmtree(cache)  # the build tree (~100 MB); pytest keeps the last runs' tmp dirs


def test_concurrent_config_steps_take_turns_and_make_one_key_pair(tmp_path: Path) -> None:
    """The config step writes config.toml through one temp name and makes the node's signing key once: two
    runs at once (a DaemonSet's node install and an operator's) take turns on the install lock. The test
    holds the lock first, so both runs queue behind it, then lets go."""
    import fcntl  # noqa: PLC0415

    cache, etc = tmp_path / "cache", tmp_path / "etc"
    cache.mkdir()
    env = {**os.environ, "WARMSTART_CACHE": str(cache), "WARMSTART_ETC": str(etc),
           "WARMSTART_STORE": str(tmp_path / "store")}
    with open(cache / "criu.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = [subprocess.Popen(["bash", str(INSTALL), "--only", "config"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
        try:
            outs = [r.communicate(timeout=3)[0] for r in runs]
            pytest.fail(f"a config step ran while another install held the lock: {outs}")
        except subprocess.TimeoutExpired:
            pass
        assert not etc.joinpath("keys").exists(), "nothing written while the lock is held"
        fcntl.flock(held, fcntl.LOCK_UN)
    outs = [r.communicate(timeout=120)[0] for r in runs]
    report = "\n----\n".join(outs)
    assert [r.returncode for r in runs] == [0, 0], report
    assert sum("waiting for another install's config step" in o for o in outs) == 2, report
    assert report.count("node.key (ed25519") == 1, report
    check = ("import sys; from pathlib import Path; from cryptography.hazmat.primitives import serialization as s\n"
             "k = s.load_pem_private_key(Path(sys.argv[1]).read_bytes(), None).public_key()\n"
             "p = s.load_pem_public_key(Path(sys.argv[2]).read_bytes())\n"
             "raw = lambda x: x.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)\n"
             "sys.exit(0 if raw(k) == raw(p) else 1)")
    py = Path(os.environ.get("WARMSTART_VENV", "/opt/warmstart/venv")) / "bin" / "python3"
    keys = etc / "keys"
    assert subprocess.run([py, "-c", check, keys / "node.key", keys / "node.pub"]).returncode == 0, \
        "node.pub is not node.key's public half"
    assert (etc / "config.toml").is_file() and not (etc / "config.toml.tmp").exists()
