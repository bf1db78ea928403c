"""One deadline for a whole opted-in `create`: each wait on the restore path gets at most what is left of it.

Why: kubelet gives containerd's CreateContainer 2 minutes (its runtime-request-timeout), and the cold
start a failed restore promises must fit in them too.  Each wait has its own bound (fetch_deadline_s,
pull_deadline_s, restore_timeout_s, warmstart.dev/hook-timeout, ...), right alone but not summed: a slow
pull then a hung restore (30 + 90 s) filled the whole window and the pod failed.  `create_budget_s` is
measured from the runtime's own start; RESERVE_S of it is kept for the cleanup of an abandoned restore
and the cold `runc create`, and every wait gets min(its own bound, what is left).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

KEY = "create_budget_s"
DEFAULT_S = 100
RESERVE_S = 10  # kept back for a failed restore's cleanup and the cold `runc create` after it
MIN_S = RESERVE_S + 5
MAX_S = 3600


class BudgetSpent(Exception):
    """Nothing is left of the create's budget for the next step of the restore: abandon it, start cold."""


@dataclass(frozen=True)
class Limit:
    """One wait's bound: its seconds, and what set them, as its log line names it."""
    seconds: float
    source: str  # "restore_timeout_s in the config", or the budget's phrase

    @property
    def by_budget(self) -> bool:
        return self.source.startswith(f"what was left of {KEY}")


def process_age_s(stat: Path = Path("/proc/self/stat")) -> float:
    """Seconds since this process began (the shim's exec of the runtime): the interpreter's start counts too."""
    try:
        start_ticks = int(stat.read_bytes().rsplit(b")", 1)[1].split()[19])  # field 22, starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass(frozen=True)
class CreateBudget:
    total_s: float
    started: float  # time.monotonic() at the start of create
    reserve_s: float = RESERVE_S

    @classmethod
    def start(cls, total_s: float) -> "CreateBudget":
        """The budget of this process's create, counted from the process's start: only for the runtime's
        own process, which the shim execs for this one call (a long-lived caller would find it spent)."""
        return cls(total_s, time.monotonic() - process_age_s())

    @classmethod
    def from_now(cls, total_s: float) -> "CreateBudget":
        """A budget counted from now: for a create made inside a process that lives on (tests, tools)."""
        return cls(total_s, time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        """Seconds the restore path may still wait (the reserve excluded); 0 when spent."""
        return max(0.0, self.total_s - self.reserve_s - self.elapsed())

    def limit(self, own_s: float, own_source: str) -> Limit:
        """min(own_s, what is left), named by whichever is smaller."""
        left = self.left()
        if own_s <= left:
            return Limit(own_s, own_source)
        return Limit(left, f"what was left of {KEY} = {self.total_s:g} in the config, "
                           f"{self.reserve_s:g}s of it kept for a cold start")

    def check(self, before: str) -> None:
        """BudgetSpent when nothing is left for the step `before` names."""
        if self.left() <= 0:
            raise BudgetSpent(f"{KEY} = {self.total_s:g} in the config spent before {before} "
                              f"({self.reserve_s:g}s of it kept for a cold start)")

