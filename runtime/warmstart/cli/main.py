"""`warmstart`: the admin CLI. Each subcommand lives in its own module; this file only wires them."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help); the admin verbs live in warmstart.cli, the harness's in
# warmstart.testing.  Imported here when the parser is built, never at import of this module.
COMMANDS = {
    "list": ("warmstart.cli.store_cmds", "list checkpoints and their state"),
    "inspect": ("warmstart.cli.store_cmds", "show a checkpoint's metadata and the privileges its images hold"),
    "verify": ("warmstart.cli.store_cmds", "fully verify a checkpoint (hashes, schema) and seal it"),
    "remove": ("warmstart.cli.store_cmds", "remove a checkpoint"),
    "gc": ("warmstart.cli.store_cmds", "reap abandoned temp dirs (the shared store's too) and incomplete checkpoints"),
    "identity": ("warmstart.cli.store_cmds", "print the checkpoint id for a DynamoCheckpoint identity"),
    "push": ("warmstart.cli.registry", "push a checkpoint to a registry as an OCI image (skopeo)"),
    "pull": ("warmstart.cli.registry", "pull a checkpoint from a registry into the store"),
    "doctor": ("warmstart.cli.doctor", "check this node's set-up; one line per check, with fixes"),
    "agent": ("warmstart.cli.agent_cmd", "run the node agent: Prometheus metrics, store budget (DaemonSet or systemd)"),
    "demo": ("warmstart.testing.demo", "run a real cold start, checkpoint and restore, and print the timings"),
    "bench": ("warmstart.testing.bench", "benchmark restore against cold start and the physical floors"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="warmstart", description="warmstart: CRIU checkpoint/restore for containers")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            p.set_defaults(_missing=name)
            continue
        adder = getattr(module, f"add_{name}_arguments", None) or getattr(module, "add_arguments", None)
        if adder:
            adder(p)
        runner = getattr(module, f"run_{name}", None) or getattr(module, "run")
        p.set_defaults(_run=runner)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"warmstart {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line, not a traceback, for operators
        from warmstart.config import ConfigError  # noqa: PLC0415
        if isinstance(e, (ConfigError, ValueError, OSError)):
            print(f"warmstart {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
