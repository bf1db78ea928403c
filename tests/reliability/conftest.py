"""The reliability suite's pytest wiring: the `reliability` marker, the counts summary, shared fixtures.

Helpers live in reliability_lib.py (tests import from there).
"""
from __future__ import annotations

from reliability_lib import COUNTS, _subreaper, node  # noqa: F401 - fixtures are found by name here


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: fault injection, hostile input, concurrency and soak "
                                       "tests through the real runtime (root, runc, CRIU)")


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        terminalreporter.write_sep("-", "reliability counts")
        for k in sorted(COUNTS):
            terminalreporter.write_line(f"{k}: {COUNTS[k]}")
