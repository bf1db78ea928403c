"""Helpers and fixtures of the reliability suite (a uniquely named module: `from conftest import` would be
ambiguous with tests/unit and tests/e2e conftests in one pytest run) (faults, hostile input, concurrency, soak).

Everything runs end to end through the installed `warmstart-runtime` with real
runc and CRIU, driven by tests/e2e/shim.py (the test plays containerd's
runc-v2 shim).  Each node is private (store, seals, state, logs, runc root
under one temp dir); container names carry a random prefix so that cgroups
and processes cannot be confused with another suite running on the machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))
import shim  # noqa: E402

CRIU = shim.CRIU
RUNC = Path("/usr/sbin/runc")
ON_STOP = "on-stop"
# The e2e workload runs as the PID namespace's init, which the kernel protects from signals it has no
# handler for: SIGTERM alone would never stop it.  This wrapper installs a handler, so "the container
# stopped on SIGTERM" is observable (and stops take milliseconds, not the shim's grace period).
TERM_WRAPPER = ("import runpy, signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
                "sys.argv = ['/workload.py'] + sys.argv[1:]; runpy.run_path('/workload.py', run_name='__main__')")
# Counts the suite reports (faults injected, hostile inputs, fuzz examples, soak cycles); see docs/reliability.md.
COUNTS: dict[str, int] = {}


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (runc, CRIU, mounts)"
    if not CRIU.exists() or not shutil.which("runc"):
        return f"needs runc and CRIU >= 4.1 at {CRIU} (bash install.sh)"
    if not Path(shim.RUNTIME).exists():
        return f"{shim.RUNTIME} not installed (bash install.sh)"
    return None


def count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


@pytest.fixture(scope="session", autouse=True)
def _subreaper():
    if os.geteuid() == 0:
        shim.become_subreaper()


class RNode(shim.Node):
    """shim.Node plus: config overrides, tagged workloads, resource snapshots."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tag = "rl" + secrets.token_hex(3)
        self.extra_config: dict[str, object] = {}
        self.bin = self.base / "bin"
        self.bin.mkdir(exist_ok=True)

    def set_config(self, **kw: object) -> None:
        self.extra_config.update(kw)
        lines = [f'store = "{self.store_root}"', f'seal_dir = "{self.base}/seals"', f'state_dir = "{self.base}/state"',
                 f'log_dir = "{self.base}/logs"']
        merged = {"criu": str(CRIU), **self.extra_config}
        for k, v in merged.items():
            lines.append(f"{k} = {json.dumps(v)}")  # JSON strings, ints and string lists are valid TOML
        self.config.write_text("\n".join(lines) + "\n")

    def name(self, short: str) -> str:
        return f"{self.tag}-{short}"

    def args(self, size: int = 8 << 20) -> list[str]:
        return ["python3", "-c", TERM_WRAPPER, str(size), self.tag]

    def ctr(self, short: str, annotations: dict[str, str], size: int = 8 << 20, **kw) -> shim.Container:
        return self.container(self.name(short), annotations, args=kw.pop("args", None) or self.args(size), **kw)

    def warmstart(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(["warmstart", *args], capture_output=True, text=True, check=check,
                              env={**os.environ, **self.env()}, timeout=120)

    def log_msgs(self, since: int = 0) -> list[str]:
        return [r.get("msg", "") for r in self.runtime_log()[since:]]

    # -- leaks ---------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """What a container operation could leave behind, as comparable values."""
        return {
            "processes": sorted(tagged_pids(self.tag)),
            "mounts": sorted(ln.split(" - ")[0].split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                             if str(self.base) in ln),
            "cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/warmstart-test/{self.tag}-*")),
            "runc_state": sorted(p.name for p in self.root.iterdir()) if self.root.exists() else [],
            "state_dirs": sorted(p.name for p in (self.base / "state" / "containers").iterdir())
            if (self.base / "state" / "containers").exists() else [],
            "store_tmp": sorted(p.name for p in (self.store / ".tmp").iterdir()) if (self.store / ".tmp").exists() else [],
        }


def tagged_pids(tag: str) -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if tag.encode() in cmd and b"/workload.py" in cmd:
            out.add(int(p.name))
    return out


def assert_clean(node: RNode, before: dict[str, object], what: str = "") -> None:
    """Nothing of the containers since `before` is left: processes, mounts, cgroups, runc and warmstart state."""
    deadline = time.monotonic() + 10
    while True:
        shim.reap()
        now = node.snapshot()
        if now == before or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    diff = {k: (before[k], now[k]) for k in now if now[k] != before[k]}
    assert not diff, f"left behind {what}: {diff}"


def new_node(tmp_path_factory, name: str) -> RNode:
    """A private node with its config written; skips the test where the suite cannot run."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    n = RNode(tmp_path_factory.mktemp(name))
    n.set_config()
    return n


@pytest.fixture
def node(tmp_path_factory):
    n = new_node(tmp_path_factory, "rel")
    yield n
    for c in n.containers:
        c.runtime("kill", "--all", c.id, "9", check=False)
    for pid in tagged_pids(n.tag):
        shim.kill_quietly(pid)
    n.cleanup()


def ann(cid: str, mode: str = ON_STOP) -> dict[str, str]:
    return {"warmstart.dev/checkpoint": mode, "warmstart.dev/id": cid}


def start_ready(c: shim.Container) -> dict:
    c.create()
    c.start()
    return c.readline()


def make_checkpoint(node: RNode, cid: str, short: str = "dumper", size: int = 8 << 20, asks: int = 2,
                    annotations: dict[str, str] | None = None, prepare=None, **kw) -> dict:
    """A real checkpoint of a running workload; returns what the workload said (random, counter).

    prepare(container) runs before create: what it puts in the rootfs is part of the image, which a
    restoring container must then have too (image_id.fingerprint)."""
    c = node.ctr(short, annotations or ann(cid), size=size, **kw)
    if prepare:
        prepare(c)
    ready = start_ready(c)
    last = {}
    for _ in range(asks):
        last = c.ask()
    p = c.stop()
    c.delete()
    assert p.returncode == 0, p.stderr
    scope = (annotations or {}).get("io.kubernetes.cri.sandbox-namespace", "_local")
    assert (node.store_root / scope / cid / "checkpoint.done").is_file(), node.log_msgs()
    return {"random": ready["random"], "counter": last["counter"]}


def rootfs_listing(root: Path) -> dict[str, tuple]:
    """Every entry under root: type, mode, owner, size, content hash or link target (no mtimes of dirs)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            else:
                extra = ""
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if stat.S_ISREG(st.st_mode) else 0, extra)
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


def reseal_manifest(path: Path, sign: bool = True) -> None:
    """After editing files of a checkpoint: rewrite the manifest and the marker's metadata hash to match.

    This makes a damaged checkpoint *consistent*, so that what refuses it is the
    check under test (rootfs diff validation, schema, …) and not the hash check.
    With `sign`, it is signed again with the node's key: a hostile checkpoint from a
    trusted signer (a compromised node sharing a cluster key) still meets every other
    check.  Without, it is what a forger without the key can make.
    """
    meta = json.loads((path / "metadata.json").read_text())
    manifest = {}
    for f in sorted(path.iterdir()):
        if f.name in ("checkpoint.done", "metadata.json"):
            continue
        manifest[f.name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}
    meta["manifest"] = manifest
    write_meta(path, meta, sign)


def write_meta(path: Path, meta: dict, sign: bool = True) -> None:
    raw = json.dumps(meta, indent=1, sort_keys=True).encode()
    (path / "metadata.json").write_bytes(raw)
    os.chmod(path / "metadata.json", 0o600)
    marker = json.loads((path / "checkpoint.done").read_text())
    marker["metadata_sha256"] = hashlib.sha256(raw).hexdigest()
    if sign:
        from warmstart import config, signing  # noqa: PLC0415 - the node key install.sh made
        marker["signature"] = signing.sign(config.Settings().signing_key, marker["metadata_sha256"])
    (path / "checkpoint.done").write_text(json.dumps(marker))


def drop_seal(node: RNode, cid: str) -> None:
    (node.seals / f"{cid}.json").unlink(missing_ok=True)


def write_criu_wrapper(node: RNode) -> Path:
    """A `criu` that logs each call and, driven by files in node.bin, sleeps or gets SIGKILLed mid-operation.

    - bin/criu-sleep: seconds to sleep before exec'ing the real CRIU; bin/criu-sleep-swrk: the same, only
      for the calls runc makes to dump or restore (`criu swrk`), not `criu --version`
    - bin/criu-kill-glob: a shell glob; once a path matches it (e.g. pages-*.img in the dump's temp
      dir), the watcher SIGKILLs this CRIU; bin/criu-kill-grep: "FILE|TEXT", kill once FILE contains TEXT
    - bin/criu-kill-second-child: once runc (this CRIU's parent) has a second child — with `RstSibling` the
      restored root task, cloned as runc's child while it still holds the swrk socket — kill this CRIU
    - bin/criu-sleep-swrk-nth: "N SECONDS": sleep only in the Nth `criu swrk` call (runc's first is its
      version check; a restore's second runs after runc bind-mounted the rootfs at <root>/<id>/criu-root)
    - every kill is appended to bin/criu-killed.  The kill takes CRIU's children first (in swrk mode the
      restore runs in a forked `criu: restore` child; killing only the parent leaves that child and runc
      waiting on each other — see docs/reliability.md)
    """
    d = node.bin
    w = d / "criu"
    w.write_text(f"""#!/bin/sh
D={d}
echo "$$ $*" >> $D/criu-calls
[ "$1" = swrk ] && echo "$$" >> $D/criu-swrk-calls
if [ -e $D/criu-kill-glob ] || [ -e $D/criu-kill-grep ] || [ -e $D/criu-kill-second-child ]; then
  runc=$(cut -d' ' -f4 /proc/$$/stat)
  (
    while kill -0 $$ 2>/dev/null; do
      if [ -e $D/criu-kill-glob ] && ls $(cat $D/criu-kill-glob) >/dev/null 2>&1; then hit=1; fi
      if [ -e $D/criu-kill-second-child ] && [ "$(cat /proc/$runc/task/*/children | wc -w)" -ge 2 ]; then hit=1; fi
      if [ -e $D/criu-kill-grep ]; then
        f=$(cut -d'|' -f1 $D/criu-kill-grep); t=$(cut -d'|' -f2- $D/criu-kill-grep)
        grep -qF "$t" $f 2>/dev/null && hit=1
      fi
      if [ -n "$hit" ]; then
        # the whole CRIU: in swrk mode the restore runs in a forked "criu: restore" child
        me=$(sh -c 'echo $PPID'); kids=$(pgrep -P $$ | grep -vx "$me")
        for k in $kids; do kill -9 $(pgrep -P $k) $k 2>/dev/null; done
        kill -9 $$ 2>/dev/null; echo "$$ $kids" >> $D/criu-killed; exit 0
      fi
      sleep 0.01
    done
  ) 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- </dev/null >/dev/null 2>&1 &
fi
[ -e $D/criu-sleep ] && sleep "$(cat $D/criu-sleep)"
[ "$1" = swrk ] && [ -e $D/criu-sleep-swrk ] && sleep "$(cat $D/criu-sleep-swrk)"
if [ "$1" = swrk ] && [ -e $D/criu-sleep-swrk-nth ]; then
  n=$(cut -d' ' -f1 $D/criu-sleep-swrk-nth)
  [ "$(wc -l < $D/criu-swrk-calls)" -eq "$n" ] && sleep "$(cut -d' ' -f2 $D/criu-sleep-swrk-nth)"
fi
exec {CRIU} "$@"
""")
    w.chmod(0o755)
    node.set_config(criu=str(w))
    return w
