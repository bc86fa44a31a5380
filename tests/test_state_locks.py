"""File locks held by the tree (flock, POSIX and OFD): collected from fdinfo, shown, taken
again by the restored processes, which check from inside that each lock is held (a fresh
description of their own conflicts with it); what cannot be given back is refused by name."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.commands import run, tool
from tests.support.workloads import ask, proc_state, reap, running_workload, wait_killed

# A python3 workload: fd 5 flock (exclusive) on a, fd 6 POSIX write lock on bytes 10-19 and a
# read lock from 100 to EOF of b, fd 7 an OFD write lock on bytes 0-99 of c; its child (forked
# after opening b, before a and c) holds its own POSIX write lock on bytes 50-59 of b through fd 6.  SIGUSR1:
# each writes DIR/<pid>.check: for every lock, whether a new description of its own conflicts
# (F_OFD_GETLK sees POSIX and OFD locks, a second flock conflicts with the first).
WORKLOAD = r"""
import fcntl, os, signal, struct, sys, time
d = sys.argv[1]
F_OFD_GETLK, F_OFD_SETLK = 36, 37
def flock_struct(kind, start, length):
    return struct.pack("hh4xqqi4x", kind, 0, start, length, 0)
def open_at(name, n):
    fd = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT, 0o644)
    os.dup2(fd, n); os.close(fd)
open_at("b", 6)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
child = os.fork()
if child:
    open_at("a", 5)
    open_at("c", 7)
if child == 0:
    fcntl.lockf(6, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
    checks = [("b", 50, 10, "posix write")]
else:
    fcntl.flock(5, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.lockf(6, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 10)
    fcntl.lockf(6, fcntl.LOCK_SH | fcntl.LOCK_NB, 0, 100)
    fcntl.fcntl(7, F_OFD_SETLK, flock_struct(fcntl.F_WRLCK, 0, 100))
    checks = [("a", None, None, "flock"), ("b", 10, 10, "posix write"), ("b", 100, 0, "posix read"),
              ("c", 0, 100, "ofd write")]
# descriptions of its own to ask with, never closed (closing any fd of a file drops the
# process's POSIX locks on it)
probes = {name: os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT, 0o644) for name in "abc"}
def held(name, start, length):
    probe = probes[name]
    if start is None:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(probe, fcntl.LOCK_UN)
            return "free"
        except BlockingIOError:
            return "held"
    got = fcntl.fcntl(probe, F_OFD_GETLK, flock_struct(fcntl.F_WRLCK, start, length))
    kind = struct.unpack("hh4xqqi4x", got)[0]
    return {fcntl.F_UNLCK: "free", fcntl.F_RDLCK: "held read", fcntl.F_WRLCK: "held write"}[kind]
def report():
    lines = [f"{what} {name} {start} {length}: {held(name, start, length)}" for name, start, length, what in checks]
    lines.append("fds " + " ".join(sorted((n for n in os.listdir("/proc/self/fd") if int(n) >= 5), key=int)))
    tmp = os.path.join(d, f".{os.getpid()}.check")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.rename(tmp, os.path.join(d, f"{os.getpid()}.check"))
if child:
    with open(os.path.join(d, ".ready"), "w") as f:
        f.write(f"{os.getpid()} {child}")
    os.rename(os.path.join(d, ".ready"), os.path.join(d, "ready"))
while True:
    signal.sigwait({signal.SIGUSR1})
    report()
"""


@pytest.fixture
def lockwl(tmp_path):
    with running_workload([sys.executable, "-c", WORKLOAD, str(tmp_path)], tmp_path, cwd=None) as w:
        root, child = map(int, w.ready.split())
        w.pids.update((root, child))
        yield w.popen, root, child, w.pids


def inside(d, pid):
    return ask(d / f"{pid}.check", pid)


def test_file_locks_restored(lockwl, tmp_path):
    popen, root, child = lockwl[:3]
    before = {pid: inside(tmp_path, pid) for pid in (root, child)}
    assert before[root].splitlines()[:4] == [
        "flock a None None: held", "posix write b 10 10: held write", "posix read b 100 0: held read",
        "ofd write c 0 100: held write"], before[root]
    assert before[child].splitlines()[0] == "posix write b 50 10: held write", before[child]

    images = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
    shown = run([tool("cow-show")], images).stdout.decode()
    assert "fd 5 file" in shown and "locks flock write 0-EOF" in shown, shown
    assert "locks posix write 10-19, posix read 100-EOF" in shown and "locks ofdlck write 0-99" in shown, shown
    assert "locks posix write 50-59" in shown, shown
    wait_killed(popen, (root, child))
    # nobody holds them now: the restore must take them again
    for name in "abc":
        with open(tmp_path / name, "r+") as f:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)

    report = tmp_path / "apply.json"
    run([tool("cow-apply"), "--report", str(report)], run([tool("cow-plan")], images).stdout)
    outer = {int(k): int(v) for k, v in json.loads(report.read_text())["pids"].items()}
    lockwl[3].update(outer.values())
    assert outer == {root: root, child: child}
    for pid in (root, child):
        assert inside(tmp_path, pid) == before[pid]
    assert all(proc_state(p) == "S" for p in (root, child))


def test_locked_files_are_refused_by_apply_while_someone_holds_them(lockwl, tmp_path):
    """Restoring beside the running original: its locks are still held, so the plan is refused
    by name before any process is created."""
    popen, root, child = lockwl[:3]
    plan = run([tool("cow-plan")], run([tool("cow-collect"), "--tree", str(root)]).stdout).stdout
    res = subprocess.run([tool("cow-apply"), "--pidns"], input=plan, capture_output=True, timeout=60)
    assert res.returncode == 1, res.stderr
    err = res.stderr.decode()
    assert err.startswith(f"cow-apply: process {root}: fd 5: {tmp_path / 'a'} is flock-locked by another process now"), err
    assert all(proc_state(p) == "S" for p in (root, child))


def fdinfo_pos(pid, fd):
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(f.readline().split()[1])


def test_a_shared_description_with_its_offset_and_flock_restored(tmp_path):
    """A regular file's description shared by a parent and its child (after fork): one
    description again after restore (kcmp), its offset shared (a read by one moves the
    other's) and its flock held (a new description of ours cannot take it)."""
    import fcntl

    from stages._native import lib

    (tmp_path / "a").write_bytes(b"0123456789abcdefghij")
    code = ("import fcntl, os, signal, sys, time\n"
            f"fd = os.open({str(tmp_path / 'a')!r}, os.O_RDWR); os.dup2(fd, 5); os.close(fd)\n"
            "os.read(5, 4); fcntl.flock(5, fcntl.LOCK_EX)\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
            "c = os.fork()\n"
            # written whole, then renamed: the test never reads a half-written file
            f"(open({str(tmp_path / 'ready.tmp')!r}, 'w').write(str(c)), os.rename({str(tmp_path / 'ready.tmp')!r}, "
            f"{str(tmp_path / 'ready')!r})) if c else None\n"
            "while True:\n"
            "    signal.sigwait({signal.SIGUSR1})\n"
            "    os.read(5, 3)\n")  # SIGUSR1: read 3 more bytes through the shared description
    with running_workload([sys.executable, "-c", code], tmp_path, cwd=None) as w:
        p, pids = w.popen, w.pids
        child = int(w.ready)
        pids.add(child)
        assert fdinfo_pos(p.pid, 5) == fdinfo_pos(child, 5) == 4
        images = run([tool("cow-collect"), "--tree", str(p.pid), "--kill"]).stdout
        shown = run([tool("cow-show")], images).stdout.decode()
        assert shown.count(f"fd 5 file {tmp_path / 'a'} flags 0o100002 locks flock write 0-EOF description 1") == 2, shown
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not reap(child):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        report = tmp_path / "apply.json"
        run([tool("cow-apply"), "--report", str(report)], run([tool("cow-plan")], images).stdout)
        pids.update(int(v) for v in json.loads(report.read_text())["pids"].values())
        assert lib.cow_syscall6(312, p.pid, child, 0, 5, 5, 0) == 0  # kcmp KCMP_FILE: one description
        assert fdinfo_pos(p.pid, 5) == fdinfo_pos(child, 5) == 4
        os.kill(child, signal.SIGUSR1)  # the child reads 3 bytes: the parent's offset moves too
        deadline = time.monotonic() + 10
        while fdinfo_pos(p.pid, 5) != 7:
            assert time.monotonic() < deadline, fdinfo_pos(p.pid, 5)
            time.sleep(0.01)
        with open(tmp_path / "a") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert proc_state(p.pid) == "S" and proc_state(child) == "S"
