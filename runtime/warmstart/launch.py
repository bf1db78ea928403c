#!/usr/bin/env python3
"""warmstart-runtime: the runc-compatible entry point that containerd's shim calls.

This file runs on *every* container operation of the node, so it imports only
`os` and `sys` and decides with one file read (create, restore) or one stat (start,
kill, delete) whether the call concerns an opted-in container.  Everything else is
`execv(runc, same argv)`: same flags, same exit code, same stdio.  install.sh
copies this file to /usr/local/bin/warmstart-runtime with a `python3 -IS`
shebang; the heavy path adds the venv's site-packages itself.
"""
import os
import sys

DEFAULT_CONFIG = "/etc/warmstart/config.toml"
DEFAULTS = {"runc": "/usr/sbin/runc", "state_dir": "/run/warmstart"}
# runc's global flags that take a value (urfave/cli accepts -x and --x, and x=v).
VALUE_FLAGS = {"log", "log-format", "root", "criu", "rootless"}
INTERCEPTED = {"create", "restore", "start", "kill", "delete"}


def fast_settings():
    """runc and state_dir from the config, by a line scan: tomllib costs ~15 ms."""
    out = dict(DEFAULTS)
    try:
        with open(os.environ.get("WARMSTART_CONFIG") or DEFAULT_CONFIG, "rb") as f:
            text = f.read().decode()
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            break  # only top-level keys matter here
        key, sep, val = line.partition("=")
        key, val = key.strip(), val.strip()
        if sep and key in out and val[:1] in ("'", '"'):
            end = val.find(val[0], 1)
            tail = val[end + 1:].strip() if end > 0 else "x"
            if not tail or tail.startswith("#"):  # a quoted value, then nothing or a comment
                out[key] = val[1:end]
    return out


def split_argv(argv):
    """Index of the subcommand in runc's argv, or -1 when there is none."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-") or a == "-":
            return i
        name = a.lstrip("-")
        if "=" not in name and name in VALUE_FLAGS:
            i += 1
        i += 1
    return -1


def needs_intercept(argv, sub_i, settings):
    sub = argv[sub_i]
    rest = argv[sub_i + 1:]
    if sub in ("create", "restore"):  # restore: the client's own (podman container restore)
        bundle = "."
        for j, a in enumerate(rest):
            if a in ("--bundle", "-bundle", "-b", "--b") and j + 1 < len(rest):
                bundle = rest[j + 1]
            elif a.startswith(("--bundle=", "-bundle=", "-b=")):
                bundle = a.split("=", 1)[1]
        try:
            with open(os.path.join(bundle, "config.json"), "rb") as f:
                return b"warmstart.dev/" in f.read()
        except OSError:
            return False
    # start/kill/delete: only containers we created carry a state dir.
    state = container_state_dir(argv, sub_i, settings)
    return state is not None and os.path.isdir(state)


def container_state_dir(argv, sub_i, settings):
    """warmstart's state dir for the container a start/kill/delete names (None for a bad id)."""
    positional = [a for a in argv[sub_i + 1:] if not a.startswith("-")]
    if not positional or "/" in positional[0] or positional[0] in (".", ".."):
        return None
    return os.path.join(settings["state_dir"], "containers", positional[0])


def restored(argv, sub_i, settings):
    """`start` of a container warmstart restored (the marker is StateDir.restored_marker)."""
    state = container_state_dir(argv, sub_i, settings)
    return state is not None and os.path.exists(os.path.join(state, "restored"))


def main():
    argv = sys.argv[1:]
    settings = fast_settings()
    sub_i = split_argv(argv)
    if sub_i >= 0 and argv[sub_i] == "start" and restored(argv, sub_i, settings):
        sys.exit(0)  # `runc restore --detach` left it running: start is a no-op (saves ~65 ms of imports)
    if sub_i >= 0 and argv[sub_i] in INTERCEPTED and needs_intercept(argv, sub_i, settings):
        if sys.flags.no_site:
            import site  # noqa: PLC0415 - deliberately late: only intercepted calls pay for it
            site.main()
        from warmstart.intercept import main as intercept_main  # noqa: PLC0415
        sys.exit(intercept_main(argv, sub_i))
    runc = settings["runc"]
    os.execv(runc, [runc] + argv)


if __name__ == "__main__":
    main()
