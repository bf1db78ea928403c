"""`warmstart doctor`: check this node's set-up, one line per check, with the fix.

Each check yields a Result(check, status, detail, fix) with status `ok`, `warn` or
`FAIL`.  Exit status 0 when nothing FAILs (warnings are fine), 1 otherwise.
Stdlib only (plus warmstart.config), so it runs on a half-installed node.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import INSTALLED_RUNTIME
from ..criu import MIN_VERSION as CRIU_MIN

RUNTIME = INSTALLED_RUNTIME
DEFAULT_VENV = Path("/opt/warmstart/venv")
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
HANDLER = "warmstart"
ANNOTATION_GLOB = "warmstart.dev/*"
INSTALL_HINT = "run install.sh from the warmstart repo"


@dataclass
class Result:
    check: str
    status: str  # "ok" | "warn" | "FAIL"
    detail: str
    fix: str = ""


def ok(check, detail):
    return Result(check, "ok", detail)


def warn(check, detail, fix=""):
    return Result(check, "warn", detail, fix)


def fail(check, detail, fix):
    return Result(check, "FAIL", detail, fix)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of {check, status, detail, fix}")
    parser.add_argument("--containerd-config", type=Path, default=CONTAINERD_CONFIG,
                        help=f"containerd config to inspect (default {CONTAINERD_CONFIG})")
    parser.add_argument("--runtime", type=Path, default=None,
                        help=f"the runtime binary to check (default: the handler's BinaryName, else {RUNTIME})")


# ---------------------------------------------------------------- helpers

def _run(argv, timeout=30.0):
    """(returncode, stdout+stderr); returncode None when it could not run."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    return p.returncode, (p.stdout + p.stderr).strip()


def _version_tuple(text):
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x) for x in m.groups(default="0")) if m else None


def _last_line(text):
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _is_exec(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


# ---------------------------------------------------------------- checks

def check_root():
    if os.geteuid() == 0:
        return [ok("root", "running as root (CAP_CHECKPOINT_RESTORE not needed)")]
    return [warn("root", f"running as uid {os.geteuid()}: criu check and permission checks may be wrong",
                 "run `sudo warmstart doctor`")]


def check_config():
    from warmstart import config  # noqa: PLC0415

    src = os.environ.get("WARMSTART_CONFIG", str(config.DEFAULT_CONFIG))
    try:
        settings = config.load()
    except config.ConfigError as e:
        return None, [fail("config", str(e), f"fix {src} (see config.py for the keys)")]
    where = src if Path(src).exists() else f"{src} absent, defaults"
    return settings, [ok("config", f"loaded ({where})")]


KUBELET_REQUEST_S = 120  # kubelet's default --runtime-request-timeout: containerd's create must end inside it


def check_create_budget(settings) -> tuple:
    """The waits a create may make before its cold start, summed against create_budget_s (budget.py)."""
    from warmstart import budget  # noqa: PLC0415

    waits = {"restore_timeout_s": settings.restore_timeout_s}
    if settings.shared_store.fetches_on_miss:
        waits["shared_store.fetch_deadline_s"] = settings.shared_store.fetch_deadline_s
    if settings.registry.pulls_on_miss:
        waits["registry.pull_deadline_s"] = settings.registry.pull_deadline_s
    room = settings.create_budget_s - budget.RESERVE_S
    terms = " + ".join(f"{k} {v}" for k, v in waits.items())
    hook = "a pod's post-restore hook (warmstart.dev/hook-timeout, 60 s by default) comes on top"
    most = KUBELET_REQUEST_S - 2 * budget.RESERVE_S  # containerd and the shim need their own time around ours
    if settings.create_budget_s > most:
        return warn("config.create_budget", f"{budget.KEY} = {settings.create_budget_s}: a create may run past "
                    f"kubelet's default runtime-request-timeout ({KUBELET_REQUEST_S} s) and fail the pod",
                    f"lower {budget.KEY} to {most} or less, or raise kubelet's --runtime-request-timeout with it")
    if sum(waits.values()) > room:  # by design, not a fault: the budget cuts the later waits, the pod starts cold
        return ok("config.create_budget", f"{terms} = {sum(waits.values())} s exceeds the {room} s that "
                  f"{budget.KEY} = {settings.create_budget_s} leaves for them ({budget.RESERVE_S} s kept for a cold "
                  f"start): the later waits get only what is left; {hook}")
    return ok("config.create_budget", f"{terms} = {sum(waits.values())} s fits the {room} s of {budget.KEY} = "
              f"{settings.create_budget_s} ({budget.RESERVE_S} s kept for a cold start); {hook}, cut to what is left")


def criu_checks(criu: Path, label="criu"):
    out = []
    if not criu.exists():
        out.append(fail(f"{label}.binary", f"{criu} not found",
                        f"{INSTALL_HINT} (builds CRIU 4.2.1 into /usr/local/sbin/criu) or set criu = \"...\" in the config"))
        return out
    if not _is_exec(criu):
        out.append(fail(f"{label}.binary", f"{criu} is not executable", f"chmod 0755 {criu}"))
        return out
    out.append(ok(f"{label}.binary", str(criu)))
    rc, text = _run([str(criu), "--version"], timeout=10)
    m = re.search(r"Version:\s*(\S+)", text or "")
    ver = _version_tuple(m.group(1)) if m else None
    if ver is None:
        out.append(fail(f"{label}.version", f"cannot read `{criu} --version`: {_last_line(text)}",
                        f"reinstall CRIU >= {CRIU_MIN[0]}.{CRIU_MIN[1]} ({INSTALL_HINT})"))
        return out
    vs = m.group(1)
    if ver[:2] < CRIU_MIN:
        out.append(fail(f"{label}.version", f"{vs} < {CRIU_MIN[0]}.{CRIU_MIN[1]} (older CRIU fails on this kernel: vDSO bounds)",
                        f"{INSTALL_HINT}, or point criu = in the config at a CRIU >= {CRIU_MIN[0]}.{CRIU_MIN[1]}"))
        return out
    out.append(ok(f"{label}.version", vs))
    out.append(check_criu_sockopts(criu, ver, label))
    if os.geteuid() != 0:
        out.append(warn(f"{label}.check", "skipped: `criu check` needs root", "run as root"))
        return out
    rc, text = _run([str(criu), "check"], timeout=60)
    if rc == 0 and "Looks good" in text:
        out.append(ok(f"{label}.check", "criu check: Looks good."))
    else:
        out.append(fail(f"{label}.check", f"criu check failed (rc={rc}): {_last_line(text)}",
                        f"run `{criu} check -v4` to see which kernel feature is missing"))
    return out


def check_criu_sockopts(criu: Path, ver: tuple, label: str = "criu") -> tuple:
    """Linux >= 6.16 refuses SO_PASSCRED on inet sockets; CRIU < 4.2 then cannot dump any TCP socket."""
    kernel = _version_tuple(os.uname().release.split("-")[0]) or (0, 0)
    if kernel[:2] < (6, 16) or ver[:2] >= (4, 2):
        return ok(f"{label}.sockopts", f"kernel {os.uname().release} and CRIU {'.'.join(map(str, ver))} agree on socket options")
    stamp = Path(str(criu) + ".warmstart-patch")
    if stamp.exists():
        return ok(f"{label}.sockopts", "an older install.sh build, patched for SO_PASSCRED on this kernel")
    return fail(f"{label}.sockopts", f"CRIU {'.'.join(map(str, ver))} without the SO_PASSCRED fix cannot dump TCP sockets "
                f"on kernel {os.uname().release} (criu#2705)", f"{INSTALL_HINT} (it builds CRIU 4.2.1)")


def check_parallel_reads(settings) -> tuple:
    """Eager restores touch every page of fresh memory; warmstart's CRIU patch spreads that over the CPUs."""
    from ..criu import has_parallel_reads, read_threads  # noqa: PLC0415
    n = read_threads(settings.restore_read_threads)
    if not has_parallel_reads(settings.criu):
        return warn("criu.parallel_reads", f"{settings.criu} reads restored pages with one thread (no warmstart patch)",
                    "`bash install.sh --build-criu` builds CRIU with warmstart's patches")
    if n < 2:
        return ok("criu.parallel_reads", "off (restore_read_threads = 1 in the config, or one CPU)")
    return ok("criu.parallel_reads", f"eager restores read pages with {n} threads (restore_read_threads)")


CAP_SYS_RESOURCE = 24


def check_nofile(status: str | None = None, limits: tuple[int, int] | None = None) -> tuple:
    """CRIU raises its own RLIMIT_NOFILE to fs.nr_open, which needs CAP_SYS_RESOURCE.

    Without it (some sandboxes and VMs drop the capability from the bounding set) every CRIU log
    has `rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted`.  CRIU goes on
    with the inherited limit and keeps its service fds just under it, so a process holding an fd
    numbered near that limit cannot be dumped or restored; anything below is unaffected.
    """
    import resource  # noqa: PLC0415
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            status = ""
    m = re.search(r"^CapEff:\s*([0-9a-f]+)", status, flags=re.M)
    soft, hard = limits if limits is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    if m is None or int(m.group(1), 16) >> CAP_SYS_RESOURCE & 1:
        return ok("criu.nofile", f"CAP_SYS_RESOURCE held: CRIU lifts its fd limit (now {soft}/{hard}) to fs.nr_open")
    return warn("criu.nofile", f"no CAP_SYS_RESOURCE here, so CRIU keeps the fd limit {hard} and logs "
                "`Can't setup RLIMIT_NOFILE for self`; containers with fds numbered near it cannot be checkpointed",
                "run containerd (and so CRIU) with CAP_SYS_RESOURCE, or raise its LimitNOFILE")


def check_runc(runc: Path):
    if not _is_exec(runc):
        return [fail("runc", f"{runc} not found or not executable",
                     "apt-get install runc, or set runc = \"...\" in the config")]
    rc, text = _run([str(runc), "--version"], timeout=10)
    first = (text or "").splitlines()[0] if text else ""
    ver = _version_tuple(first)
    if rc != 0 or ver is None:
        return [fail("runc", f"`{runc} --version` failed: {_last_line(text)}", "reinstall runc")]
    if ver < (1, 1):
        return [warn("runc", f"{first} ({runc}): older than 1.1, untested", "apt-get install runc (>= 1.1)")]
    return [ok("runc", f"{first} ({runc})")]


def _userfaultfd_syscall():
    """errno of userfaultfd(O_CLOEXEC|O_NONBLOCK), 0 on success, None if unknown arch."""
    nr = {"x86_64": 323, "aarch64": 282, "ppc64le": 364, "s390x": 355}.get(platform.machine())
    if nr is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        return 0
    return ctypes.get_errno()


def check_kernel():
    out = [ok("kernel", f"{platform.release()} {platform.machine()}")]
    # userfaultfd: lazy restore (pages fetched on first touch) needs it.
    err = _userfaultfd_syscall()
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    extra = f"; unprivileged_userfaultfd={sysctl.read_text().strip()}" if sysctl.exists() else ""
    if err == 0:
        out.append(ok("kernel.userfaultfd", f"available{extra}"))
    elif err is None:
        out.append(warn("kernel.userfaultfd", f"not probed on {platform.machine()}{extra}"))
    else:
        out.append(warn("kernel.userfaultfd", f"userfaultfd() failed: {errno.errorcode.get(err, err)}{extra}; "
                        "lazy restore unavailable (eager restore still works)",
                        "use a kernel with CONFIG_USERFAULTFD=y"))
    # overlayfs: the container rootfs diff is taken from the overlay upper dir.
    try:
        fss = Path("/proc/filesystems").read_text()
    except OSError:
        fss = ""
    if re.search(r"\boverlay$", fss, flags=re.M):
        out.append(ok("kernel.overlayfs", "overlay in /proc/filesystems"))
    else:
        out.append(warn("kernel.overlayfs", "overlay not in /proc/filesystems (module not loaded?)",
                        "modprobe overlay"))
    # cgroup layout.
    cg = Path("/sys/fs/cgroup")
    try:
        is_v2 = (cg / "cgroup.controllers").exists()
    except OSError:
        is_v2 = False
    if is_v2:
        out.append(ok("kernel.cgroup", "v2 (unified)"))
    elif (cg / "unified").is_dir():
        out.append(ok("kernel.cgroup", "hybrid (v1 controllers + v2 at /sys/fs/cgroup/unified)"))
    elif cg.is_dir():
        out.append(ok("kernel.cgroup", "v1"))
    else:
        out.append(warn("kernel.cgroup", "no /sys/fs/cgroup mounted", "mount cgroup2 on /sys/fs/cgroup"))
    # Transparent huge pages: reported, not judged (it depends on the machine).
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        m = re.search(r"\[(\w+)\]", thp.read_text())
        mode = m.group(1) if m else thp.read_text().strip()
    except OSError:
        mode = None
    if mode is None:
        out.append(ok("kernel.thp", "transparent hugepages not available"))
    else:
        note = ("`always` halved GPU restore times on the H100/H200 machines but made restores on CPU VMs "
                "slow after idle (huge pages zero-filled from a ballooned host); measure per machine")
        out.append(ok("kernel.thp", f"{mode} - {note}"))
    return out


def check_dir(name, path: Path, missing_is_fail=True, missing_fix=None):
    fix_mode = f"chmod 0700 {path}"
    try:
        st = path.lstat()
    except FileNotFoundError:
        fix = missing_fix or f"install -d -m 0700 -o root -g root {path} (or {INSTALL_HINT})"
        return [(fail if missing_is_fail else warn)(name, f"{path} does not exist", fix)]
    except OSError as e:
        return [fail(name, f"{path}: {e}", "check the path and its parents")]
    if stat.S_ISLNK(st.st_mode):
        return [warn(name, f"{path} is a symlink; permissions are checked on the target",
                     f"use a real directory at {path}")] + check_dir(name, path.resolve(), missing_is_fail)
    if not stat.S_ISDIR(st.st_mode):
        return [fail(name, f"{path} is not a directory", f"remove it and {fix_mode.replace('chmod 0700', 'install -d -m 0700')}")]
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return [fail(name, f"{path} is owned by uid {st.st_uid}, not root (checkpoints hold process memory)",
                     f"chown root:root {path} && {fix_mode}")]
    if mode & stat.S_IWOTH:
        return [fail(name, f"{path} is world-writable (mode {mode:04o})", fix_mode)]
    if mode & 0o077:
        return [warn(name, f"{path} mode {mode:04o}: group/other can read it (checkpoints and logs hold process secrets)", fix_mode)]
    return [ok(name, f"{path} root 0700")]


def check_dirs(settings):
    return (check_dir("store", settings.store)
            + check_dir("seal_dir", settings.seal_dir)
            + check_dir("log_dir", settings.log_dir)
            + check_dir("state_dir", settings.state_dir, missing_is_fail=False,
                        missing_fix=f"the runtime creates it on first use; or install -d -m 0700 {settings.state_dir}"))


def check_keys(settings):
    """The node's signing key (no key: no checkpoint is published) and the keys whose signatures it trusts."""
    out = []
    key = settings.signing_key
    fix = f"{INSTALL_HINT} (it creates {key})"
    try:
        st = key.lstat()
        head = key.read_bytes()[:40]
    except OSError as e:
        return [fail("signing_key", f"{key}: {e.strerror}; checkpoints cannot be signed, so none are made", fix)]
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        out.append(fail("signing_key", f"{key} must be a root-owned regular file, mode 0600 "
                        f"(is {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid})", f"chown root:root {key} && chmod 0600 {key}"))
    elif not head.startswith(b"-----BEGIN PRIVATE KEY-----"):
        out.append(fail("signing_key", f"{key} is not a PEM private key", fix))
    else:
        out.append(ok("signing_key", f"{key} root 0600"))
    readable = [k for k in settings.trusted_keys if k.is_file() and k.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")]
    if not readable:
        out.append(fail("trusted_keys", "no readable public key: every restore is refused",
                        f"set trusted_keys in the config (the node's own: {key.with_suffix('.pub')})"))
    else:
        out.append(ok("trusted_keys", ", ".join(str(k) for k in readable)))
    return out


def _cri_runtimes(dump):
    plugins = dump.get("plugins", {})
    for name in ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "cri"):
        if name in plugins:
            return name, plugins[name].get("containerd", {})
    return None, {}


def _containerd_pids():
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "containerd":
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def check_containerd(cfg_path: Path):
    """Returns (results, handler options dict or None)."""
    binary = shutil.which("containerd") or ("/usr/bin/containerd" if Path("/usr/bin/containerd").exists() else None)
    if not binary:
        return [warn("containerd", "containerd not installed; the runtime handler cannot be used",
                     "apt-get install containerd, then " + INSTALL_HINT)], None
    argv = [binary] + (["--config", str(cfg_path)] if cfg_path.exists() else []) + ["config", "dump"]
    rc, text = _run(argv, timeout=30)
    if rc != 0:
        return [fail("containerd.config", f"`{' '.join(argv)}` failed: {_last_line(text)}",
                     f"fix the TOML in {cfg_path} (a backup is at {cfg_path}.warmstart-bak.*)")], None
    try:
        dump = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [warn("containerd.config", f"cannot parse `containerd config dump`: {e}")], None
    out = []
    if "io.containerd.grpc.v1.cri" in dump.get("disabled_plugins", []) or "cri" in dump.get("disabled_plugins", []):
        out.append(fail("containerd.cri", "the CRI plugin is disabled (disabled_plugins), Kubernetes cannot use containerd",
                        f"remove \"cri\" from disabled_plugins in {cfg_path}"))
    plugin, ctd = _cri_runtimes(dump)
    runtimes = ctd.get("runtimes", {})
    default = ctd.get("default_runtime_name", "runc")
    if default and default not in runtimes:
        out.append(fail("containerd.default_runtime", f"default_runtime_name {default!r} has no runtimes.{default} table: "
                        "containerd's CRI plugin will refuse to start", f"add [plugins.\"{plugin}\".containerd.runtimes.{default}] "
                        f"with runtime_type = \"io.containerd.runc.v2\" to {cfg_path} ({INSTALL_HINT} writes it)"))
    ws = runtimes.get(HANDLER)
    if not ws:
        out.append(fail("containerd.handler", f"no runtime handler {HANDLER!r} in `containerd config dump`",
                        INSTALL_HINT + " (adds it to /etc/containerd/config.toml)"))
        return out, None
    opts = ws.get("options", {}) or {}
    problems = []
    if ws.get("runtime_type") != "io.containerd.runc.v2":
        problems.append(f"runtime_type is {ws.get('runtime_type')!r}, want io.containerd.runc.v2")
    bn = opts.get("BinaryName", "")
    if not bn:
        problems.append("options.BinaryName is empty (plain runc would run)")
    elif not _is_exec(Path(bn)):
        problems.append(f"options.BinaryName {bn} is not an executable file")
    if ANNOTATION_GLOB not in ws.get("pod_annotations", []):
        problems.append(f"pod_annotations lacks {ANNOTATION_GLOB!r} (opt-in annotations never reach the container)")
    if problems:
        out.append(fail("containerd.handler", "; ".join(problems), INSTALL_HINT + f", or fix runtimes.{HANDLER} in {cfg_path}"))
    else:
        out.append(ok("containerd.handler", f"runtimes.{HANDLER}: BinaryName {bn}, pod_annotations {ws.get('pod_annotations')}"))
    if ANNOTATION_GLOB not in ws.get("container_annotations", []):
        out.append(warn("containerd.container_annotations", f"container_annotations lacks {ANNOTATION_GLOB!r}: "
                        "per-container annotations are dropped", f"add container_annotations = [\"{ANNOTATION_GLOB}\"]"))
    # Is the running containerd newer than its config? (It reads the config only at start.)
    pids = _containerd_pids()
    if not pids:
        out.append(warn("containerd.running", "containerd is not running",
                        "systemctl start containerd" if Path("/run/systemd/system").is_dir()
                        else "start containerd (no systemd on this machine)"))
    else:
        try:
            started = Path(f"/proc/{pids[0]}").stat().st_mtime
            changed = max(p.stat().st_mtime for p in [cfg_path, *cfg_path.parent.glob("conf.d/*.toml")] if p.exists())
        except (OSError, ValueError):
            started = changed = 0
        if changed > started:
            out.append(warn("containerd.running", f"containerd (pid {pids[0]}) started before {cfg_path} last changed: "
                            "the warmstart handler may not be loaded",
                            "systemctl restart containerd" if Path("/run/systemd/system").is_dir()
                            else "restart containerd (no systemd on this machine)"))
        else:
            out.append(ok("containerd.running", f"pid {pids[0]}, started after the last config change"))
    return out, opts


def _shebang(path: Path):
    try:
        with open(path, "rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
    except OSError:
        return None
    return first[2:].split() if first.startswith("#!") else []


def check_runtime_binary(runtime: Path):
    """Results and the interpreter the runtime runs under (or None)."""
    if not runtime.exists():
        return [fail("runtime.binary", f"{runtime} not found", INSTALL_HINT)], None
    if not _is_exec(runtime):
        return [fail("runtime.binary", f"{runtime} is not executable", f"chmod 0755 {runtime}")], None
    words = _shebang(runtime)
    if not words:
        return [warn("runtime.binary", f"{runtime} has no #! line (not the Python launcher?)")], None
    interp, flags = Path(words[0]), words[1:]
    out = []
    if "python" not in interp.name:
        return [warn("runtime.shebang", f"{runtime} runs {interp}, not the warmstart Python launcher")], None
    if not _is_exec(interp):
        out.append(fail("runtime.shebang", f"interpreter {interp} does not exist", INSTALL_HINT + " (recreates the venv)"))
        return out, None
    letters = "".join(f.lstrip("-") for f in flags if f.startswith("-") and not f.startswith("--"))
    missing = [f"-{c}" for c in "IS" if c not in letters]
    if len(flags) > 1:
        # Linux passes everything after the interpreter as ONE argument: "-I -S" reaches
        # python as a single "-I -S", which it rejects ("Unknown option: -").
        out.append(fail("runtime.shebang", f"#!{' '.join(words)}: the kernel passes {' '.join(flags)!r} as one "
                        "argument and python rejects it, so every container operation fails",
                        f"use '#!{interp} -IS' (install.sh writes it)"))
    elif missing:
        out.append(fail("runtime.shebang", f"#!{' '.join(words)} lacks {' '.join(missing)}: every container "
                        "operation pays for site/user imports", INSTALL_HINT + " (it writes '#!<venv>/bin/python3 -IS')"))
    elif "shims" in str(interp) or "pyenv" in str(interp):
        out.append(fail("runtime.shebang", f"{interp} is a pyenv shim (~36 ms per start)", INSTALL_HINT))
    else:
        out.append(ok("runtime.shebang", f"#!{' '.join(words)}"))
    return out, interp


def check_passthrough(runtime: Path, runc: Path):
    """Cost of the pass-through path: `runtime --version` (exec runc) vs `runc --version`."""
    def best(argv, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            rc, _ = _run(argv, timeout=10)
            times.append(time.perf_counter() - t)
            if rc != 0:
                return None
        return min(times) * 1000
    r, w = best([str(runc), "--version"]), best([str(runtime), "--version"])
    if r is None or w is None:
        return [fail("runtime.passthrough", f"`{runtime} --version` or `{runc} --version` failed",
                     f"run `{runtime} --version` by hand to see the error")]
    detail = f"{runtime.name} --version {w:.1f} ms vs runc {r:.1f} ms (+{w - r:.1f} ms per call, best of 5)"
    if w - r > 30:
        return [warn("runtime.passthrough", detail, "check the shebang (no shim, python3 -IS) and the config file size")]
    return [ok("runtime.passthrough", detail)]


def check_venv(interp: Path | None):
    py = interp or (DEFAULT_VENV / "bin" / "python3")
    if not _is_exec(py):
        py = Path(sys.executable)
    code = ("import warmstart, pycriu; from pycriu.images import images; "
            "print(warmstart.__version__, pycriu.__version__)")
    rc, text = _run([str(py), "-I", "-c", code], timeout=30)
    if rc == 0:
        wv, pv = text.split()[-2:]
        return [ok("python.packages", f"{py}: warmstart {wv}, pycriu {pv}")]
    return [fail("python.packages", f"{py}: {_last_line(text)}",
                 INSTALL_HINT + " (installs warmstart and pycriu from the CRIU 4.2.1 source into the venv)")]


def check_runtime_criu(settings, handler_opts):
    """Which CRIU will runc get when containerd calls our runtime?"""
    crit = handler_opts.get("CriuPath") if handler_opts else ""
    if crit:
        # The shim passes runc `--criu <CriuPath>` itself; our runtime keeps an explicit --criu.
        return [warn("runtime.criu", f"the handler sets options.CriuPath = {crit}, which wins over the config's "
                     f"criu ({settings.criu})", f"remove CriuPath from runtimes.{HANDLER}.options")] + \
            criu_checks(Path(crit), label="runtime.criu")
    out = [ok("runtime.criu", f"warmstart-runtime passes runc --criu {settings.criu} (config)")]
    path_criu = shutil.which("criu", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if path_criu and Path(path_criu) != settings.criu:
        rc, text = _run([path_criu, "--version"], timeout=10)
        m = re.search(r"Version:\s*(\S+)", text or "")
        v = m.group(1) if m else "?"
        if _version_tuple(v) is None or _version_tuple(v)[:2] < CRIU_MIN:
            out.append(ok("runtime.criu.path", f"criu on PATH is {path_criu} {v} (too old, but unused: "
                          "warmstart always passes --criu; plain `runc checkpoint` by hand would use it)"))
    return out


# ---------------------------------------------------------------- main

def collect(args) -> list[Result]:
    results: list[Result] = []
    results += check_root()
    settings, res = check_config()
    results += res
    if settings is None:
        from warmstart.config import Settings  # noqa: PLC0415 - continue with defaults
        settings = Settings()
    results.append(check_create_budget(settings))
    results += criu_checks(settings.criu)
    if settings.criu.exists():
        results.append(check_parallel_reads(settings))
        results.append(check_nofile())
    results += check_runc(settings.runc)
    results += check_kernel()
    results += check_dirs(settings)
    results += check_keys(settings)
    cres, opts = check_containerd(getattr(args, "containerd_config", CONTAINERD_CONFIG) or CONTAINERD_CONFIG)
    results += cres
    runtime = getattr(args, "runtime", None)
    if runtime is None:
        bn = (opts or {}).get("BinaryName")
        runtime = Path(bn) if bn else RUNTIME
    rres, interp = check_runtime_binary(runtime)
    results += rres
    if interp is not None and _is_exec(settings.runc):
        results += check_passthrough(runtime, settings.runc)
    results += check_runtime_criu(settings, opts)
    results += check_venv(interp)
    return results


def run(args) -> int:
    try:
        results = collect(args)
    except Exception as e:  # noqa: BLE001 - a doctor must report, not crash
        results = [fail("doctor", f"internal error: {type(e).__name__}: {e}", "report this as a bug")]
    if getattr(args, "json", False):
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        width = max(len(r.check) for r in results)
        for r in results:
            line = f"{r.status:<4}  {r.check:<{width}}  {r.detail}"
            if r.fix and r.status != "ok":
                line += f"  -> fix: {r.fix}"
            print(line)
        n_fail = sum(r.status == "FAIL" for r in results)
        n_warn = sum(r.status == "warn" for r in results)
        print(f"{'FAIL' if n_fail else 'ok':<4}  {'summary':<{width}}  {n_fail} failed, {n_warn} warnings, "
              f"{len(results) - n_fail - n_warn} ok")
    return 1 if any(r.status == "FAIL" for r in results) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="warmstart doctor")
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
