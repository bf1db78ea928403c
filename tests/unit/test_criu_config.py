"""CRIU config rendering, restore options, version parsing; and the runc argv shapes we build."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from warmstart import criu, runc


def test_render_one_option_per_line(tmp_path):
    c = criu.CriuConfig(["tcp-close", "timeout 30"])
    assert c.render() == "tcp-close\ntimeout 30\n"
    c.write(tmp_path / "sub" / "criu.conf")
    assert (tmp_path / "sub" / "criu.conf").read_text() == "tcp-close\ntimeout 30\n"
    assert (tmp_path / "sub" / "criu.conf").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("opt", ["tcp-close\nshell-job", "--tcp-close", "-v4", "ok\n"])
def test_render_rejects_injection(opt):
    with pytest.raises(ValueError, match="CRIU option"):
        criu.CriuConfig(["timeout 1", opt]).render()


def test_dump_config():
    text = criu.dump_config(600).render()
    assert "timeout 600\n" in text and "link-remap\n" in text


def test_restore_config_cgroup_root():
    text = criu.restore_config("/kubepods/pod1/c2", {"/run/nvidia-ctk-hook-a": "/run/nvidia-ctk-hook-b"}).render()
    lines = text.splitlines()
    assert "cgroup-root :/kubepods/pod1/c2" in lines
    assert "ext-mount-map /run/nvidia-ctk-hook-a:/run/nvidia-ctk-hook-b" in lines
    assert "tcp-close" in lines
    assert not any(ln.startswith("cgroup-root") for ln in criu.restore_config(None).render().splitlines())


def test_read_threads_automatic_is_one_per_cpu_capped(monkeypatch):
    monkeypatch.setattr(criu.os, "cpu_count", lambda: 2)
    assert criu.read_threads(0) == 2
    monkeypatch.setattr(criu.os, "cpu_count", lambda: 96)
    assert criu.read_threads(0) == criu.MAX_READ_THREADS
    monkeypatch.setattr(criu.os, "cpu_count", lambda: None)
    assert criu.read_threads(0) == 1
    assert criu.read_threads(3) == 3 and criu.read_threads(1) == 1


def test_has_parallel_reads_looks_for_the_patch_in_the_binary(tmp_path):
    patched, stock = tmp_path / "criu-patched", tmp_path / "criu-stock"
    patched.write_bytes(b"\x7fELF...getenv\0CRIU_PARALLEL_READS\0...")
    stock.write_bytes(b"\x7fELF...getenv\0CRIU_LIBS_DIR\0...")
    assert criu.has_parallel_reads(patched) and not criu.has_parallel_reads(stock)
    assert not criu.has_parallel_reads(tmp_path / "missing")


def test_restore_env_carries_the_thread_count_and_the_rest(monkeypatch):
    monkeypatch.setenv("PATH", "/custom/bin")
    monkeypatch.setenv(criu.PARALLEL_READS_ENV, "9")  # the config decides, not a stray env var
    env = criu.restore_env(3)
    assert env[criu.PARALLEL_READS_ENV] == "3" and env["PATH"] == "/custom/bin"


def test_restore_config_rejects_newline_in_cgroup():
    with pytest.raises(ValueError):
        criu.restore_config("/a\nshell-job").render()


@pytest.mark.parametrize("s, want", [("4.1", (4, 1)), ("4.1.1", (4, 1, 1)), (" 3.19\n", (3, 19)),
                                     ("4", None), ("4.1-rc1", None), ("", None), ("v4.1", None), ("4.1.1.1", None)])
def test_parse_version(s, want):
    assert criu.parse_version(s) == want


def test_version_str():
    assert criu.version_str((4, 1)) == "4.1" and criu.version_str(None) == "unknown"


def test_version_of_fake_binary(tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 4.1.1'\necho 'GitID: v4.1.1'\n")
    fake.chmod(0o755)
    assert criu.version(fake) == (4, 1, 1)
    assert criu.version(tmp_path / "missing") is None


# -- runc argv shapes --------------------------------------------------------------------

def test_global_opts_parse_all_forms():
    argv = ["--root", "/r", "--log=/l.json", "-log-format", "json", "--criu", "/c", "--systemd-cgroup", "--debug"]
    g = runc.GlobalOpts.parse(argv)
    assert (g.root, g.log, g.log_format, g.criu, g.systemd_cgroup) == ("/r", "/l.json", "json", "/c", True)
    assert g.argv == argv
    assert g.with_criu(Path("/ours")) == argv  # the caller's --criu wins
    g2 = runc.GlobalOpts.parse(["--root=/r"])
    assert g2.with_criu(Path("/ours")) == ["--root=/r", "--criu", "/ours"]


def test_logging_to_replaces_the_callers_log_in_every_form():
    for argv in (["--root", "/r", "--log", "/l", "--log-format", "text"], ["--log=/l", "--root=/r", "-log-format=json"],
                 ["--root", "/r"]):
        g = runc.GlobalOpts.parse(argv).logging_to(Path("/ours.log"))
        assert (g.log, g.log_format) == ("/ours.log", "json")
        assert "/l" not in g.argv and g.argv.count("--log") == 1 and g.root == "/r"


def test_stdio_handoff_moves_the_pipes_off_runcs_own_fds(tmp_path):
    """The dumped stdio pipes are read by runc at index base+i, and the caller's fd i sits on fd base+i."""
    import json
    import os
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "descriptors.json").write_text(json.dumps(["/dev/null", "pipe:[11]", "pipe:[12]"]))
    (ckpt / "pages-1.img").write_bytes(b"p")
    h = runc.StdioHandOff.prepare(ckpt, tmp_path / "images", tmp_path / "out")
    assert h is not None
    try:
        moved = json.loads((h.images / "descriptors.json").read_text())
        base = h.fds[0] - 1
        assert base >= runc.HANDOFF_FD_MIN and h.fds == (base + 1, base + 2)
        assert [i for i, d in enumerate(moved) if d] == [base + 1, base + 2] and moved[base + 2] == "pipe:[12]"
        assert os.path.sameopenfile(1, base + 1) and os.path.sameopenfile(2, base + 2)
        link = h.images / "pages-1.img"
        assert not os.readlink(link).startswith("/") and link.read_bytes() == b"p"  # relative: see prepare
        # runc recorded its CRIU's stdio (ours: /dev/null, the log); the next checkpoint must get the container's
        (tmp_path / "root" / "c1").mkdir(parents=True)
        state = tmp_path / "root" / "c1" / "state.json"
        state.write_text(json.dumps({"id": "c1", "external_descriptors": ["/dev/null", "/x.log", "/x.log"]}))
        h.record(tmp_path / "root", "c1")
        got = json.loads(state.read_text())
        assert got["id"] == "c1" and got["external_descriptors"] == [os.readlink(f"/proc/self/fd/{i}") for i in range(3)]
        assert state.stat().st_mode & 0o777 == 0o600
    finally:
        h.close()
    (ckpt / "descriptors.json").write_text(json.dumps(["/dev/null", "/dev/null", "/dev/pts/0"]))
    assert runc.StdioHandOff.prepare(ckpt, tmp_path / "images", tmp_path / "out") is None


def test_create_args_parse():
    c = runc.CreateArgs.parse(["--bundle", "/b", "--pid-file=/p", "--console-socket", "/s", "--no-pivot",
                               "--no-new-keyring", "--preserve-fds", "2", "c1"])
    assert (c.id, c.bundle, c.pid_file, c.console_socket, c.no_pivot, c.no_new_keyring, c.preserve_fds) == \
        ("c1", Path("/b"), "/p", "/s", True, True, "2")
    assert runc.CreateArgs.parse(["-b=/x", "c"]).bundle == Path("/x")
    r = runc.CreateArgs.parse(["--image-path", "/i", "--work-path=/w", "--bundle", "/b", "--detach",
                               "--manage-cgroups-mode", "soft", "--pid-file", "/p", "c2"])  # a client's restore
    assert (r.id, r.bundle, r.pid_file) == ("c2", Path("/b"), "/p")
    with pytest.raises(ValueError, match="one container id"):
        runc.CreateArgs.parse(["--bundle", "/b"])
    with pytest.raises(ValueError):
        runc.CreateArgs.parse(["a", "b"])


def test_restore_command_drops_create_only_flags():
    rc = runc.Runc(Path("/runc"), runc.GlobalOpts.parse(["--root", "/r"]), Path("/criu"))
    c = runc.CreateArgs.parse(["--bundle", "/b", "--pid-file", "/p", "--no-new-keyring", "--preserve-fds", "1", "c1"])
    argv = rc.restore_command("c1", runc.RestoreOpts(Path("/img"), Path("/work"), c, no_subreaper=True))
    assert argv[:5] == ["/runc", "--root", "/r", "--criu", "/criu"]
    assert argv[5:7] == ["restore", "--detach"] and argv[-2:] == ["--no-subreaper", "c1"]
    assert "--no-new-keyring" not in argv and "--preserve-fds" not in argv and "--lsm-profile" not in argv
    assert argv[argv.index("--pid-file") + 1] == "/p" and argv[argv.index("--image-path") + 1] == "/img"
    lazy = rc.restore_command("c1", runc.RestoreOpts(Path("/i"), Path("/w"), runc.CreateArgs("c1", Path("/b")), lsm_profile="p",
                                                       lazy_pages=True))
    assert lazy[-4:] == ["--lsm-profile", "p", "--lazy-pages", "c1"] and "--pid-file" not in lazy


def test_checkpoint_command():
    rc = runc.Runc(Path("/runc"), runc.GlobalOpts.parse(["--criu", "/theirs"]), Path("/criu"))
    argv = rc.checkpoint_command("c1", runc.CheckpointOpts(Path("/img"), Path("/w"), leave_running=True))
    assert argv[:3] == ["/runc", "--criu", "/theirs"] and argv.count("--criu") == 1  # the caller's CRIU wins
    assert argv[-1] == "c1" and "--leave-running" in argv and "--tcp-established" in argv and "--file-locks" in argv
    assert "--leave-running" not in rc.checkpoint_command("c1", runc.CheckpointOpts(Path("/img"), Path("/w")))


def test_plain_verbs_replay_the_callers_global_flags():
    rc = runc.Runc(Path("/runc"), runc.GlobalOpts.parse(["--root", "/r", "--log", "/l"]), Path("/criu"))
    assert rc.command("state", "c1") == ["/runc", "--root", "/r", "--log", "/l", "state", "c1"]  # no --criu
    assert rc.logging_to(Path("/ours")).command("x")[-5:] == ["--log", "/ours", "--log-format", "json", "x"]
    assert rc.root == Path("/r") and runc.Runc(Path("/runc")).root == Path(runc.DEFAULT_ROOT)


def test_wait_exit_returns_the_code_and_times_out():
    import subprocess
    p = subprocess.Popen(["sh", "-c", "exit 3"])
    assert runc.wait_exit(p, 10) == 3
    p = subprocess.Popen(["sleep", "30"])
    with pytest.raises(subprocess.TimeoutExpired):
        runc.wait_exit(p, 0.1)
    p.kill()
    assert runc.wait_exit(p, 10) == -9


def test_run_bounded_kills_the_whole_group_past_the_deadline(tmp_path):
    fake = tmp_path / "runc"
    fake.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {tmp_path}/child\nwait\n")
    fake.chmod(0o755)
    with pytest.raises(runc.Timeout, match="killed after"):
        runc.run_bounded(fake, ["restore", "c1"], timeout=0.5)
    child = int((tmp_path / "child").read_text())

    def dead() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return True
    deadline = time.monotonic() + 10  # SIGKILL is sent; the exit itself takes a moment
    while not dead() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dead(), "runc's child (CRIU's place) outlived the deadline kill"


def test_network_lock_reaches_both_criu_configs_and_is_validated(tmp_path):
    from warmstart import config, criu
    assert "network-lock skip" in criu.dump_config(60, "skip").options
    assert "network-lock nftables" in criu.restore_config("/x", network_lock="nftables").options
    assert not any(o.startswith("network-lock") for o in criu.dump_config(60).options)  # CRIU's default
    cfg = tmp_path / "c.toml"
    cfg.write_text('network_lock = "skip"\n')
    assert config.load(cfg).network_lock == "skip"
    cfg.write_text('network_lock = "off"\n')
    with pytest.raises(config.ConfigError, match="network_lock must be one of iptables, nftables, skip"):
        config.load(cfg)
