"""The node image (packaging/build-agent-image.sh) and its install step, run for real with podman.

The image is built (or reused: the archive is named by a hash of its inputs), loaded into podman and run
with a scratch directory as the node's root, the container's own root filesystem read-only so that a
write anywhere but the scratch root fails the run.  The installed tree then runs on this host from its
real path (/opt/warmstart, bound over in a private mount namespace): the runtime, the CLI, CRIU, pycriu.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build-agent-image.sh"
CRIU_SRC = Path("/var/cache/warmstart/criu-4.2.1/criu/criu")

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("podman") or not shutil.which("umoci"), reason="needs podman and umoci"),
    pytest.mark.skipif(not CRIU_SRC.exists(), reason="needs install.sh's CRIU build in /var/cache/warmstart"),
]
PODMAN_RUN = ["podman", "run", "--rm", "--read-only", "--read-only-tmpfs=false", "--network", "none",
              "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
INSTALLED = {  # node path -> mode (files and dirs) or link target
    "usr/local/bin/warmstart-runtime": 0o755, "etc/warmstart/config.toml": 0o644,
    "etc/warmstart/keys": 0o700, "etc/warmstart/keys/node.key": 0o600, "etc/warmstart/keys/node.pub": 0o644,
    "var/lib/warmstart/checkpoints": 0o700, "var/lib/warmstart/seals": 0o700, "var/log/warmstart": 0o700,
    "run/warmstart": 0o700, "etc/tmpfiles.d/warmstart.conf": 0o644, "opt/warmstart/sbin/criu": 0o755,
    "opt/warmstart/share/install/install.sh": 0o755,
    "opt/warmstart/share/install/config/containerd/warmstart.toml": 0o644,
    "usr/local/bin/warmstart": "/opt/warmstart/venv/bin/warmstart",
    "usr/local/bin/warmstart-hook": "/opt/warmstart/venv/bin/warmstart-hook",
}


@pytest.fixture(scope="module")
def image() -> tuple[Path, str]:
    """(archive, ref): the built image, loaded into podman."""
    env = {**os.environ, "WARMSTART_BUILD_PYTHON": sys.executable}
    p = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    archive, ref = p.stdout.split()[-2:]
    load = subprocess.run(["podman", "load", "-q", "-i", archive], capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr
    return Path(archive), ref


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ino,
                                             os.readlink(p) if p.is_symlink() else None)
    return out


def install(ref: str, root: Path) -> str:
    p = subprocess.run([*PODMAN_RUN, "-v", f"{root}:/host", ref], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_install_step_writes_only_the_scratch_root_and_is_idempotent(image: tuple[Path, str], tmp_path: Path) -> None:
    _, ref = image
    root = tmp_path / "node"
    (root / "etc" / "tmpfiles.d").mkdir(parents=True)  # a systemd node
    first = install(ref, root)
    assert "/opt/warmstart from image" in first and "/usr/local/bin/warmstart-runtime" in first, first
    for rel, want in INSTALLED.items():
        p = root / rel
        if isinstance(want, str):
            assert p.is_symlink() and os.readlink(p) == want, rel
        else:
            assert p.exists() and not p.is_symlink(), f"{rel} missing"
            assert (p.stat().st_mode & 0o7777, p.stat().st_uid) == (want, 0), f"{rel}: {oct(p.stat().st_mode)}"
    assert sorted(os.listdir(root)) == ["etc", "opt", "run", "usr", "var"]
    assert (root / "usr/local/bin/warmstart-runtime").read_text().startswith("#!/opt/warmstart/venv/bin/python3 -IS\n")
    assert 'criu = "/opt/warmstart/sbin/criu"' in (root / "etc/warmstart/config.toml").read_text()
    assert (root / "etc/tmpfiles.d/warmstart.conf").read_text() == "d /run/warmstart 0700 root root -\n"
    handler = (root / "opt/warmstart/share/install/config/containerd/warmstart.toml").read_text()
    assert 'BinaryName = "/usr/local/bin/warmstart-runtime"' in handler

    before = snapshot(root)
    second = install(ref, root)
    assert "up to date, nothing changed" in second, second
    assert snapshot(root) == before

    # An operator's config and a loosened key survive a re-run: the config is kept, the key's mode fixed.
    (root / "etc/warmstart/config.toml").write_text('criu = "/usr/sbin/criu"\nstore = "/data/ckpt"\n')
    (root / "etc/warmstart/keys/node.key").chmod(0o644)
    third = install(ref, root)
    assert (root / "etc/warmstart/config.toml").read_text().startswith('criu = "/usr/sbin/criu"')
    assert (root / "etc/warmstart/keys/node.key").stat().st_mode & 0o777 == 0o600
    assert (root / "data/ckpt").stat().st_mode & 0o7777 == 0o700, third


def test_installed_tree_runs_from_its_node_path(image: tuple[Path, str], tmp_path: Path) -> None:
    """The copied /opt/warmstart works on a host without the image: its own python, libs (RPATH) and CRIU."""
    _, ref = image
    root = tmp_path / "node"
    root.mkdir()
    install(ref, root)
    script = (f"mount --bind {root}/opt/warmstart /opt/warmstart && "
              f"{root}/usr/local/bin/warmstart-runtime --version && "
              "/opt/warmstart/sbin/criu --version && "
              "/opt/warmstart/venv/bin/warmstart --help >/dev/null && echo cli-ok && "
              "/opt/warmstart/venv/bin/python3 -c 'import sys, pycriu.images.images, warmstart.agent; print(sys.prefix)'")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                        "sh", "-ec", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"runc version", p.stdout), p.stdout  # warmstart-runtime passed --version to runc
    assert "Version: 4.2.1" in p.stdout and "cli-ok" in p.stdout, p.stdout
    assert p.stdout.strip().endswith("/opt/warmstart/venv"), p.stdout


def test_containerd_imports_the_image_the_daemonset_names(image: tuple[Path, str], containerd) -> None:  # noqa: ANN001
    archive, ref = image
    manifest = (REPO / "packaging" / "daemonset.yaml").read_text()
    named = set(re.findall(r"^\s+image:\s*(\S+)", manifest, flags=re.M))
    assert named == {ref}, f"daemonset.yaml names {named}, the build makes {ref}"
    assert "warmstart.nodeinstall" in manifest and "warmstart agent --metrics-port" in manifest
    containerd.ctr("images", "import", str(archive))
    assert ref in containerd.ctr("images", "ls", "-q").stdout.split()
