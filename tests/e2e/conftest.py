"""Fixtures that play kubelet against a private containerd (see docs/cri-harness.md).

`containerd` is one private containerd 1.6 per session (own root, state,
sockets, CNI bridge; pause image imported); `worker_image` is the reference
worker image imported into it; `cri` is a CRI client that removes every pod
after each test so tests stay independent while sharing one containerd.
Session teardown fails loudly if anything is left on the host.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Import `warmstart` from this working tree (runtime/warmstart/), not an installed copy: the tests
# must exercise the repo, and the package may not be installed (or be installed non-editable).
sys.path.insert(0, str(ROOT / "runtime"))

from warmstart.testing.cri import images  # noqa: E402
from warmstart.testing.cri.client import CriClient  # noqa: E402
from warmstart.testing.cri.containerd import Containerd  # noqa: E402

# The runtime handler containerd calls for RuntimeClass "warmstart"; tests of
# an uninstalled tree can point it at another launcher.
# One name for it across the harnesses: WARMSTART_RUNTIME (shim.py's); WARMSTART_RUNTIME_BINARY still read.
WARMSTART_BINARY = Path(os.environ.get("WARMSTART_RUNTIME") or os.environ.get("WARMSTART_RUNTIME_BINARY")
                        or "/usr/local/bin/warmstart-runtime")


def _cri_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (containerd, mounts, network namespaces)"
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "umoci", "skopeo", "ip"):
        if not shutil.which(tool):
            return f"{tool} not installed (install.sh installs containerd, runc, umoci, skopeo, iproute2)"
    if not Path("/usr/lib/cni/bridge").exists():
        return "CNI plugins missing in /usr/lib/cni (apt-get install containernetworking-plugins)"
    return None


def _criu_path() -> str:
    for p in ("/usr/local/sbin/criu", "/usr/sbin/criu"):
        if Path(p).exists():
            return p
    return "/usr/local/sbin/criu"


@pytest.fixture(scope="session")
def warmstart_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node config pointing every warmstart path into the session's tmp dir."""
    base = tmp_path_factory.mktemp("warmstart-node")
    cfg = base / "config.toml"
    cfg.write_text(
        f'store = "{base / "checkpoints"}"\n'
        f'seal_dir = "{base / "seals"}"\n'
        f'state_dir = "{base / "state"}"\n'
        f'log_dir = "{base / "log"}"\n'
        f'runc = "{shutil.which("runc") or "/usr/sbin/runc"}"\n'
        f'criu = "{_criu_path()}"\n')
    return cfg


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory, warmstart_config: Path) -> Iterator[Containerd]:
    """One private containerd for the session, with the pause image imported."""
    reason = _cri_skip_reason()
    if reason:
        pytest.skip(reason)
    # A run killed with SIGKILL leaves its containerd, pods and bridge behind; clean them first.
    Containerd.reap_stale(str(tmp_path_factory.getbasetemp().parent / "pytest-*" / "*"))
    ctrd = Containerd(tmp_path_factory.mktemp("containerd"), warmstart_binary=WARMSTART_BINARY,
                      env={"WARMSTART_CONFIG": str(warmstart_config)})
    with ctrd:
        images.ensure_pause_image(ctrd)
        yield ctrd
        shim_pids_during = ctrd.shim_pids()
    # After stop(): nothing of this instance may remain on the host.
    leftovers = ctrd.leftovers()
    assert not leftovers, f"containerd fixture left things behind: {leftovers} (shims seen: {shim_pids_during})"


@pytest.fixture(scope="session")
def worker_image(containerd: Containerd) -> str:
    """The reference worker image (built once, cached in /var/cache/warmstart/images)."""
    return images.ensure_worker_image(containerd)


@pytest.fixture
def cri(containerd: Containerd) -> Iterator[CriClient]:
    """A CRI client; every pod a test leaves is stopped and removed afterwards."""
    client = containerd.client()
    try:
        yield client
    finally:
        try:
            client.remove_all()
        finally:
            client.close()

