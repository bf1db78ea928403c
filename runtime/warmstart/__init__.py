"""warmstart: transparent CRIU checkpoint/restore behind a runc-compatible runtime."""

__version__ = "0.1.0"
