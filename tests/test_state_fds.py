"""Directory fds and FIFOs: collected, shown, restored at the same fd numbers with their flags
and positions, the FIFO the same named pipe shared by the same processes with its unread
bytes (tests/workloads/fdwl.c checks from inside)."""

import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from stages._native import lib
from tests.support.commands import run, tool
from tests.support.workloads import ask_inside, build, proc_state, running_workload, wait_file, wait_killed

SYS_KCMP, KCMP_FILE = 312, 0
NAMES = [f"entry-{i:03d}" for i in range(60)]


@pytest.fixture
def fdwl():
    """fdwl in a fresh directory with d/ (60 entries) and a FIFO; every process it started,
    and every pid added to .pids, is killed and reaped at teardown."""
    outdir = tempfile.mkdtemp(prefix="fdwl-", dir="/tmp")
    os.mkdir(os.path.join(outdir, "d"))
    for name in NAMES:
        open(os.path.join(outdir, "d", name), "w").close()
    os.mkfifo(os.path.join(outdir, "fifo"))
    try:
        with running_workload([build("fdwl"), outdir], outdir, tree=True) as w:
            yield w
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def same_description(pid1, fd1, pid2, fd2):
    r = lib.cow_syscall6(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2, 0)
    assert r >= 0, os.strerror(-r)
    return r == 0


def fd_numbers(pid):
    return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))


def test_directories_and_fifo_restored(fdwl, tmp_path):
    root, child = fdwl.order
    before = {pid: ask_inside(fdwl.outdir, pid, pid) for pid in (root, child)}
    seen, rest = before[root]["seen"].split(), before[root]["rest"].split()
    # the workload did read part of d/ (so a lost position would show)
    assert len(seen) >= 8 and seen and rest and not set(seen) & set(rest) and sorted(seen + rest) == NAMES
    assert before[root]["fd10"].endswith("unread 10") and before[child]["fd11"].endswith("unread 10")
    assert "cloexec 1" in before[root]["fd9"] and "cloexec 0" in before[root]["fd7"]
    fds_before = {pid: fd_numbers(pid) for pid in (root, child)}
    assert fds_before[root] == [0, 1, 2, 7, 8, 9, 10, 12] and fds_before[child] == [0, 1, 2, 10, 11]
    assert before[root]["fd8"].startswith("flags 0102001 cloexec 0 pos 7 ")  # O_APPEND|O_LARGEFILE|O_WRONLY

    images = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
    shown = run([tool("cow-show")], images).stdout.decode()
    fifo = os.path.join(fdwl.outdir, "fifo")
    assert f"fd 7 dir {fdwl.outdir}/d flags 0o300000 pos " in shown, shown
    assert f"fd 10 fifo {fifo} pipe 1 read-write end, description 1" in shown, shown
    assert f"fd 12 fifo {fifo} pipe 1 write end, description 2 flags 0o104001" in shown, shown
    assert f"pipe 1 (FIFO {fifo}): capacity 65536, 10 bytes unread b'fifo-bytes'" in shown, shown
    wait_killed(fdwl.popen, (root, child))

    report = tmp_path / "apply.json"
    run([tool("cow-apply"), "--report", str(report)], run([tool("cow-plan")], images).stdout)
    outer = {int(k): int(v) for k, v in json.loads(report.read_text())["pids"].items()}
    fdwl.pids.update(outer.values())
    assert outer == {root: root, child: child}
    for pid in (root, child):
        after = ask_inside(fdwl.outdir, pid, pid)
        assert after == before[pid], {k: (before[pid].get(k), after.get(k)) for k in after if after.get(k) != before[pid].get(k)}
        assert fd_numbers(pid) == fds_before[pid]
    # the same FIFO (the inode is in the report), shared as before
    assert same_description(root, 10, child, 10)
    assert not same_description(root, 10, child, 11) and not same_description(root, 12, child, 11)
    # its bytes come out of the restored child's own end
    os.kill(child, signal.SIGUSR2)
    wait_file(os.path.join(fdwl.outdir, f"{child}.fifo"), child)
    with open(os.path.join(fdwl.outdir, f"{child}.fifo")) as f:
        assert f.read() == "fifo-bytes"
    assert all(proc_state(p) == "S" for p in (root, child))


def test_fifo_whose_path_is_gone_is_refused(fdwl, tmp_path):
    root, child = fdwl.order
    fifo = os.path.join(fdwl.outdir, "fifo")
    os.rename(fifo, fifo + ".moved")  # the fds now show the new path: still dumpable
    os.unlink(fifo + ".moved")
    res = subprocess.run([tool("cow-collect"), "--tree", str(root), "-o", str(tmp_path / "x.cow")],
                         capture_output=True, timeout=60)
    assert res.returncode == 2, res.stderr
    err = res.stderr.decode()
    assert f"cow-collect: process {root}: fd 10 is a FIFO whose path is gone ({fifo}.moved (deleted)): not supported" in err, err
    assert f"cow-collect: process {child}: fd 11 is a FIFO whose path is gone ({fifo}.moved (deleted)): not supported" in err, err
    assert all(proc_state(p) == "S" for p in (root, child))


def test_fifo_replaced_after_the_dump_is_refused_by_apply(fdwl, tmp_path):
    root, child = fdwl.order
    images = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
    fdwl.popen.wait(timeout=10)
    fifo = os.path.join(fdwl.outdir, "fifo")
    os.mkfifo(fifo + ".new")
    os.rename(fifo + ".new", fifo)  # same path, another FIFO (made first: another inode)
    res = subprocess.run([tool("cow-apply"), "--report", str(tmp_path / "apply.json")],
                         input=run([tool("cow-plan")], images).stdout, capture_output=True, timeout=60)
    if res.returncode == 0:  # the bug this test looks for: end what it restored
        fdwl.pids.update(int(v) for v in json.loads((tmp_path / "apply.json").read_text())["pids"].values())
    assert res.returncode == 1, res.stderr
    assert f"fd 10: {fifo} is a different file now" in res.stderr.decode(), res.stderr


def test_fifo_still_holding_bytes_is_not_refilled(fdwl, tmp_path):
    """Restoring beside the running original: its FIFO still holds the unread bytes, so
    refilling would double them; cow-apply stops before creating any process."""
    root, child = fdwl.order
    plan = run([tool("cow-plan")], run([tool("cow-collect"), "--tree", str(root)]).stdout).stdout
    res = subprocess.run([tool("cow-apply"), "--pidns"], input=plan, capture_output=True, timeout=60)
    assert res.returncode != 0, res.stderr
    fifo = os.path.join(fdwl.outdir, "fifo")
    assert f"FIFO {fifo} (pipe 1) holds unread bytes now: another process has it open" in res.stderr.decode(), res.stderr
    assert not [p for p in os.listdir("/proc") if p.isdigit() and p not in ("1",)
                and _cmdline(p).startswith(os.path.join(os.path.dirname(build("fdwl")), "fdwl"))
                and int(p) not in (root, child)]
    assert all(proc_state(p) == "S" for p in (root, child))


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
