"""Terminals: an fd on cow-collect's terminal is restored onto cow-apply's terminal; any other
terminal is refused by name at collect time, and cow-apply without a terminal refuses the plan."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.commands import tool
from tests.support.workloads import ask, proc_state, running_workload

# fd 5 on the pseudo-terminal argv[1]; SIGUSR1: write "hello <pid>" to fd 5, and DIR/check =
# what fd 5 is, from inside
WORKLOAD = r"""
import fcntl, os, signal, sys
d, pts = sys.argv[1], sys.argv[2]
fd = os.open(pts, os.O_RDWR | os.O_NOCTTY)
os.dup2(fd, 5); os.close(fd)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
open(os.path.join(d, "ready"), "w").close()
while True:
    signal.sigwait({signal.SIGUSR1})
    os.write(5, f"hello {os.getpid()}\n".encode())
    with open(os.path.join(d, ".check"), "w") as f:
        f.write(f"{os.ttyname(5)} {os.isatty(5)} {fcntl.fcntl(5, fcntl.F_GETFL):o}")
    os.rename(os.path.join(d, ".check"), os.path.join(d, "check"))
"""


def read_master(master, want, timeout=10):
    os.set_blocking(master, False)
    got, deadline = b"", time.monotonic() + timeout
    while want not in got:
        assert time.monotonic() < deadline, got
        try:
            got += os.read(master, 4096)
        except BlockingIOError:
            time.sleep(0.01)
    return got


@pytest.fixture
def ptys():
    pairs = [os.openpty() for _ in range(2)]
    yield pairs
    for m, s in pairs:
        os.close(m)
        os.close(s)


@pytest.fixture
def ttywl(tmp_path, ptys):
    pts_a = os.ttyname(ptys[0][1])
    with running_workload([sys.executable, "-c", WORKLOAD, str(tmp_path), pts_a], tmp_path, cwd=None) as w:
        yield w.popen, w.pids


def check(tmp_path, pid):
    return ask(tmp_path / "check", pid)


def test_fd_on_the_collect_terminal_goes_onto_the_apply_terminal(ttywl, ptys, tmp_path):
    p, pids = ttywl
    (ma, sa), (mb, sb) = ptys
    pts_a, pts_b = os.ttyname(sa), os.ttyname(sb)
    assert check(tmp_path, p.pid) == f"{pts_a} True 100002"
    read_master(ma, f"hello {p.pid}".encode())

    images = tmp_path / "images.cow"
    res = subprocess.run([tool("cow-collect"), "--tree", str(p.pid), "--kill", "-o", str(images)],
                         stdin=sa, capture_output=True, timeout=60)  # its terminal: pty A
    assert res.returncode == 0, res.stderr
    shown = subprocess.run([tool("cow-show"), str(images)], capture_output=True, timeout=60).stdout.decode()
    assert f"fd 5 tty {pts_a} flags 0o100002" in shown, shown
    p.wait(timeout=10)
    plan = tmp_path / "plan.cow"
    subprocess.run([tool("cow-plan"), "-i", str(images), "-o", str(plan)], check=True, timeout=60)
    report = tmp_path / "apply.json"
    res = subprocess.run([tool("cow-apply"), "-i", str(plan), "--report", str(report)],
                         stdin=sb, capture_output=True, timeout=60)  # its terminal: pty B
    assert res.returncode == 0, res.stderr
    outer = {int(k): int(v) for k, v in json.loads(report.read_text())["pids"].items()}
    pids.update(outer.values())
    assert outer == {p.pid: p.pid}
    assert check(tmp_path, p.pid) == f"{pts_b} True 100002"  # O_NOCTTY is not kept by the kernel
    read_master(mb, f"hello {p.pid}".encode())
    assert proc_state(p.pid) == "S"


def test_other_terminals_are_refused(ttywl, ptys, tmp_path):
    p, _ = ttywl
    pts_a = os.ttyname(ptys[0][1])
    res = subprocess.run([tool("cow-collect"), "--tree", str(p.pid), "-o", str(tmp_path / "x.cow")],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert (f"cow-collect: process {p.pid}: fd 5 is a pseudo-terminal ({pts_a}), not cow-collect's terminal: "
            "not supported") in res.stderr.decode()
    assert proc_state(p.pid) == "S"


def test_apply_without_a_terminal_refuses(ttywl, ptys, tmp_path):
    p, _ = ttywl
    images = tmp_path / "images.cow"
    subprocess.run([tool("cow-collect"), "--tree", str(p.pid), "-o", str(images)], stdin=ptys[0][1],
                   check=True, capture_output=True, timeout=60)
    plan = tmp_path / "plan.cow"
    subprocess.run([tool("cow-plan"), "-i", str(images), "-o", str(plan)], check=True, timeout=60)
    res = subprocess.run([tool("cow-apply"), "-i", str(plan), "--pidns"], stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert (f"cow-apply: process {p.pid}: fd 5 was on cow-collect's terminal ({os.ttyname(ptys[0][1])}): "
            "cow-apply has no terminal on stdin, stdout or stderr to put it on") in res.stderr.decode()
    assert proc_state(p.pid) == "S"
