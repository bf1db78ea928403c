"""createlock: one create per (runc root, container id), held across an exec into runc, never by its fork."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from warmstart import createlock


def held_elsewhere(path: Path) -> bool:
    """Whether another process holds the lock (POSIX locks never conflict within one process)."""
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 1


def test_the_file_name_is_a_hash_of_root_and_id_never_the_id(tmp_path: Path):
    state, root = tmp_path / "state", tmp_path / "runc"
    hostile = createlock.path_for(state, root, "../../../etc/passwd")
    assert hostile.parent == state / "locks" / "create" and len(hostile.name) == 64 + len(".lock")
    assert createlock.path_for(state, root, "a") != createlock.path_for(state, tmp_path / "other", "a")
    assert createlock.path_for(state, root, "a") == createlock.path_for(state, tmp_path / "x" / ".." / "runc", "a")


def test_held_until_the_process_exits_and_kept_across_exec_not_fork(tmp_path: Path):
    state, root = tmp_path / "state", tmp_path / "runc"
    path = createlock.path_for(state, root, "c1")
    # the child takes the lock, forks a grandchild that outlives it (as runc init outlives runc create),
    # then execs a program that holds on (as warmstart execs runc create)
    script = (f"import os, sys, time\nsys.path.insert(0, {str(Path(createlock.__file__).parent.parent)!r})\n"
              f"from warmstart import createlock\ncreatelock.hold(__import__('pathlib').Path({str(state)!r}), "
              f"__import__('pathlib').Path({str(root)!r}), 'c1')\n"
              "if os.fork() == 0:\n    time.sleep(3)\n    os._exit(0)\n"
              "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1)'])\n")
    p = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    while not (path.exists() and held_elsewhere(path)):
        assert time.monotonic() < deadline and p.poll() is None, "the lock was never seen held"
        time.sleep(0.05)
    assert p.poll() is None, "held by the exec'd program"
    p.wait(timeout=10)
    assert not held_elsewhere(path), "the forked child (alive 2 s longer) must not hold it"


def test_a_second_holder_waits_and_remove_hands_it_a_fresh_file(tmp_path: Path):
    state, root = tmp_path / "state", tmp_path / "runc"
    path = createlock.path_for(state, root, "c2")
    fd = createlock.hold(state, root, "c2")  # this process holds it
    waiter = subprocess.Popen([sys.executable, "-c",
                               f"import sys, time; sys.path.insert(0, {str(Path(createlock.__file__).parent.parent)!r})\n"
                               f"from pathlib import Path; from warmstart import createlock\n"
                               f"createlock.hold(Path({str(state)!r}), Path({str(root)!r}), 'c2')\n"
                               "print('got', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert waiter.poll() is None, "the second create must wait"
        os.unlink(path)  # what remove() does while holding it (remove itself would not conflict in-process)
        os.close(fd)
        assert waiter.stdout is not None and waiter.stdout.readline() == "got\n"
        # it holds the file now at the path: one that waited on the unlinked file would hold nothing anyone sees
        assert path.exists() and held_elsewhere(path), "the waiter did not retake the lock on the new file"
    finally:
        waiter.communicate("", timeout=10)
    createlock.remove(state, root, "c2")
    assert not path.exists()
    createlock.remove(state, root, "c2")  # nothing to remove: no error


def test_runc_s_id_rule_decides_before_any_lock():
    """An id runc refuses is passed on untouched (no lock file for it: nothing left behind)."""
    from warmstart import runc
    for ok in ("abc", "a.b_c-d+e", "0", "pod_ns_uid-123"):
        assert runc.valid_container_id(ok), ok
    for bad in ("", ".", "..", "../../cid-escape", "a/b", "a b", "é", "a\0b"):
        assert not runc.valid_container_id(bad), bad
