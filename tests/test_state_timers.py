"""POSIX timers (timer_create): collected with their ids, clocks, sigevents and remaining
times, shown, created again with the same ids (PR_TIMER_CREATE_RESTORE_IDS) and armed; the
restored python3 workload checks them from inside and its periodic timer keeps firing."""

import ctypes
import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.commands import run, tool
from tests.support.workloads import RUNNING_STATES, ask, become_subreaper, proc_state, running_workload, wait_file

# Timers by raw system calls (ids as the kernel gives them): 0 = MONOTONIC, signal 36 with value
# 0x1234, in 1000 s then every 500 s; 1 made and deleted (a hole); 2 = MONOTONIC, SIGUSR2 every
# 50 ms (counted); 3 = REALTIME, no signal, in 2000 s.  SIGUSR1: DIR/check = /proc/self/timers,
# each timer's timer_gettime (interval exact, value in whole seconds) and the SIGUSR2 count.
WORKLOAD = r"""
import ctypes, os, signal, struct, sys
d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def create(clock, signo, notify, sival=0):
    ev = struct.pack("QiiI44x", sival, signo, notify, 0)
    tid = ctypes.c_int(0)
    assert libc.syscall(222, clock, ev, ctypes.byref(tid)) == 0, ctypes.get_errno()
    return tid.value
def arm(t, value, interval):
    its = struct.pack("4q", int(interval), int(interval % 1 * 1e9), int(value), int(value % 1 * 1e9))
    assert libc.syscall(223, t, 0, its, None) == 0, ctypes.get_errno()
def gettime(t):
    buf = ctypes.create_string_buffer(32)
    assert libc.syscall(224, t, buf) == 0, ctypes.get_errno()
    return struct.unpack("4q", buf.raw)
count = 0
def on_usr2(sig, frame):
    global count
    count += 1
signal.signal(signal.SIGUSR2, on_usr2)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
t0 = create(1, 36, 0, 0x1234); arm(t0, 1000, 500)
t1 = create(1, 10, 0); assert libc.syscall(226, t1) == 0
t2 = create(1, signal.SIGUSR2, 0); arm(t2, 0.05, 0.05)
t3 = create(0, 0, 1); arm(t3, 2000, 0)
ids = (t0, t2, t3)
open(os.path.join(d, ".ready"), "w").write(" ".join(map(str, ids)))
os.rename(os.path.join(d, ".ready"), os.path.join(d, "ready"))  # never seen half-written
while True:
    if signal.sigtimedwait({signal.SIGUSR1}, 0.05) is None:
        continue
    lines = [open("/proc/self/timers").read()]
    for t in ids:
        iv_s, iv_ns, v_s, v_ns = gettime(t)
        lines.append(f"timer {t} interval {iv_s}.{iv_ns:09d} value {v_s}")
    lines.append(f"count {count}")
    with open(os.path.join(d, ".check"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.rename(os.path.join(d, ".check"), os.path.join(d, "check"))
"""


def check(d, pid):
    text = ask(d / "check", pid)
    timers, rest = text.split("\ntimer ", 1)
    values = {}
    for line in ("timer " + rest).splitlines():
        words = line.split()
        if words[0] == "timer":
            values[int(words[1])] = (words[3], int(words[5]))
        else:
            values[words[0]] = int(words[1])
    return timers, values


@pytest.fixture
def timerwl(tmp_path):
    with running_workload([sys.executable, "-c", WORKLOAD, str(tmp_path)], tmp_path, cwd=None) as w:
        yield w.popen, w.pids


def test_posix_timers_restored_with_their_ids(timerwl, tmp_path):
    p, pids = timerwl
    assert (tmp_path / "ready").read_text() == "0 2 3"
    time.sleep(0.3)  # the 50 ms timer fires a few times
    timers_before, before = check(tmp_path, p.pid)
    assert "ID: 0\nsignal: 36/0000000000001234\nnotify: signal/pid." in timers_before, timers_before
    assert before[0] == ("500.000000000", before[0][1]) and 990 <= before[0][1] <= 1000
    assert before[2][0] == "0.050000000" and before[3][0] == "0.000000000" and 1990 <= before[3][1] <= 2000
    assert before["count"] > 0

    images = run([tool("cow-collect"), "--tree", str(p.pid), "--kill"]).stdout
    shown = run([tool("cow-show")], images).stdout.decode()
    assert "posix timer 0 clock 1 signal 36 value 0x1234 in 99" in shown and "every 500.000000000s" in shown, shown
    assert "posix timer 2 clock 1 signal 12 value 0x0 in 0." in shown, shown
    assert "posix timer 3 clock 0 no signal value 0x0 in 199" in shown and "posix timer 1 " not in shown, shown
    p.wait(timeout=10)
    report = tmp_path / "apply.json"
    run([tool("cow-apply"), "--report", str(report)], run([tool("cow-plan")], images).stdout)
    outer = {int(k): int(v) for k, v in json.loads(report.read_text())["pids"].items()}
    pids.update(outer.values())
    assert outer == {p.pid: p.pid}
    timers_after, after = check(tmp_path, p.pid)
    assert timers_after == timers_before  # same ids, clocks, signals, values, targets
    for t in (0, 2, 3):
        assert after[t][0] == before[t][0]  # the interval
    for t in (0, 3):  # what was left, restarted: it cannot have grown, and little time passed
        assert before[t][1] - 30 <= after[t][1] <= before[t][1]
    time.sleep(0.5)
    _, later = check(tmp_path, p.pid)
    assert later["count"] >= after["count"] + 3  # the 50 ms timer fires in the restored process
    assert proc_state(p.pid) in RUNNING_STATES


def test_timer_on_another_clock_is_refused(tmp_path):
    """A timer on a clock cowtree does not recreate (here the CPU clock of another process, the
    test's: ~pid << 3 | CPUCLOCK_SCHED) is refused by name."""
    become_subreaper()
    clock = ctypes.c_int32((~os.getpid() << 3) | 2).value
    code = ("import ctypes, struct, time\n"
            "libc = ctypes.CDLL(None, use_errno=True); t = ctypes.c_int(0)\n"
            f"assert libc.syscall(222, {clock}, struct.pack('QiiI44x', 0, 14, 0, 0), ctypes.byref(t)) == 0\n"
            f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
            "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True)
    try:
        wait_file(tmp_path / "ready")
        res = subprocess.run([tool("cow-collect"), "--tree", str(p.pid), "-o", str(tmp_path / "x.cow")],
                             capture_output=True, timeout=60)
        assert res.returncode == 2, res.stderr
        assert (f"cow-collect: process {p.pid}: POSIX timer 0 has clock {clock} (another process's CPU clock, or an "
                "alarm clock): not supported") in res.stderr.decode(), res.stderr
        assert proc_state(p.pid) == "S"
    finally:
        p.kill()
        p.wait(timeout=10)
