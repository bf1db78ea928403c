"""`warmstart agent`: the node agent in the foreground (its DaemonSet container or systemd unit runs this)."""
from __future__ import annotations

import argparse

from .. import config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-addr", default="0.0.0.0", help="address for /metrics (default 0.0.0.0)")
    p.add_argument("--metrics-port", type=int, default=9464, help="port for /metrics (default 9464)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between store scans (default 60)")
    p.add_argument("--budget", type=config.parse_bytes, metavar="BYTES",
                   help="evict the least recently restored checkpoints beyond BYTES (e.g. 200G); default: "
                        "[registry] cache_budget_bytes, else none")
    p.add_argument("--from-start", action="store_true", help="count the whole runtime log, not only new lines")


def run(args: argparse.Namespace) -> int:
    from ..agent import Agent  # noqa: PLC0415
    from ..log import Logger  # noqa: PLC0415

    settings = config.load()
    log = Logger(log_dir=settings.log_dir, echo=True)
    budget = args.budget if args.budget is not None else (settings.registry.cache_budget_bytes or None)
    Agent(settings, budget_bytes=budget, log=log, from_start=args.from_start).run(
        args.metrics_addr, args.metrics_port, args.interval)
    return 0
