"""Locks that hold across nodes on a shared filesystem: POSIX byte-range locks (fcntl F_SETLK, `lockf`).

Why these and not `flock`: NFSv4 carries byte-range locks in the protocol (NFSv3 through NLM), so a
lock taken on one node is seen by every other.  `flock` on NFS is at best emulated as a whole-file
byte-range lock (Linux since 2.6.12), and with `local_lock=flock` (or on other clients) it is purely
local: two nodes would both "hold" it.  O_EXCL lock files would need a lease and a staleness rule
(a node that dies leaves its file behind); a byte-range lock is released by the kernel when its
process dies, and by the NFS server when a dead client's lease expires (NFSv4: 90 s by default).

Their one trap: a process's POSIX locks on a file all go when it closes *any* fd of that file.  So a
`LockFile` is the only fd this process opens on its lock file, and the separate things it guards are
separate bytes of it (sharedfs.py: byte 0 = who publishes an id, byte 1 = its content), taken and
released through that one fd.  Locks of one process never conflict with each other: contention is
between processes (and nodes).

Waits poll with F_SETLK rather than block in F_SETLKW: a blocked F_SETLKW on a hung NFS server cannot
be bounded, a poll loop can.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from types import TracebackType

from .fileutil import lock_within


class LockError(OSError):
    """The lock file cannot be used (a symlink, a FIFO, unreadable); the message says which."""


class LockFile:
    """One lock file on the share, opened once (no symlink followed, never a FIFO or device)."""

    def __init__(self, dir_fd: int, name: str, writable: bool = True) -> None:
        """`name` in the directory `dir_fd`: created 0600 when writable; a read-only share (or a reader
        without write access) opens it read-only, which still takes shared locks."""
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            if not writable:
                raise PermissionError(errno.EACCES, "read-only")
            self.fd = os.open(name, os.O_RDWR | os.O_CREAT | flags, 0o600, dir_fd=dir_fd)
            self.writable = True
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise LockError(e.errno, f"lock file {name}: {e.strerror}") from None
            try:
                self.fd = os.open(name, os.O_RDONLY | flags, dir_fd=dir_fd)
            except OSError as e2:
                raise LockError(e2.errno, f"lock file {name}: {e2.strerror}") from None
            self.writable = False
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise LockError(errno.EINVAL, f"lock file {name}: not a regular file; refusing it")
        self.name = name

    def take(self, byte: int, exclusive: bool, timeout_s: float = 0) -> bool:
        """Lock one byte, shared or exclusive, waiting up to timeout_s; False when someone else holds it."""
        if exclusive and not self.writable:
            raise LockError(errno.EBADF, f"lock file {self.name}: read-only; an exclusive lock needs write access")
        how = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        return lock_within(lambda: fcntl.lockf(self.fd, how, 1, byte, os.SEEK_SET), timeout_s)

    def release(self, byte: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, byte, os.SEEK_SET)

    def close(self) -> None:
        """Closing the fd drops every lock this process holds on the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LockFile:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

