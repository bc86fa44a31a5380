"""Interval timers, the alternate signal stack and pending signals (both queues, with their
siginfo): collected, restored, and read back from inside (tests/workloads/sigwl.c)."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.support.commands import run as run_command
from tests.support.commands import tool
from tests.support.workloads import ask as ask_workload
from tests.support.workloads import become_subreaper, build, kill_and_reap, proc_state

DRAINED = ["28 0 0", "12 -1 4242", "35 -1 1", "35 -1 2"]  # SIGWINCH (tgkill), SIGUSR2, SIGRTMIN+1 x2


def run(argv, data=None):
    return run_command(argv, data).stdout


def ask(outdir, ns_pid, outer_pid, sig, suffix):
    return ask_workload(os.path.join(outdir, f"{ns_pid}.{suffix}"), outer_pid, sig, timeout=10).splitlines()


@pytest.fixture
def sigwl(tmp_path):
    become_subreaper()
    outdir = str(tmp_path / "sigwl")
    os.mkdir(outdir)
    popen = subprocess.Popen([build("sigwl"), outdir], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, close_fds=True, cwd="/", start_new_session=True)
    pids = {popen.pid}
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(outdir, "ready")):
            assert time.monotonic() < deadline and popen.poll() is None, "sigwl did not start"
            time.sleep(0.005)
        yield outdir, popen, pids
    finally:
        kill_and_reap(pids, popen)


def timers(lines):
    return {k: v.split() for k, v in (line.split(" ", 1) for line in lines) if k.startswith("timer")}


@pytest.mark.parametrize("pidns", [False, True], ids=["same-pid", "pidns"])
def test_timers_altstack_and_pending_signals_restored(sigwl, tmp_path, pidns):
    outdir, popen, pids = sigwl
    pid = popen.pid
    before = ask(outdir, pid, pid, signal.SIGUSR1, "check")
    assert "pending 12 28 35" in before and "altstack 1 65536 -2147483648" in before, before
    images = run([tool("cow-collect"), "--tree", str(pid)] + ([] if pidns else ["--kill"]))
    shown = run([tool("cow-show")], images).decode()
    assert "pending (shared) 12 35 35" in shown and "virtual:300." in shown and "pending 28" in shown, shown
    if not pidns:
        popen.wait(timeout=10)
    report = tmp_path / "apply.json"
    run([tool("cow-apply"), "--report", str(report)] + (["--pidns"] if pidns else []), run([tool("cow-plan")], images))
    rep = json.loads(report.read_text())
    outer = int(rep["pids"][str(pid)])
    pids.update([outer] + ([rep["init_pid"]] if rep.get("init_pid") else []))
    after = ask(outdir, pid, outer, signal.SIGUSR1, "check")
    # the same but for the time the real timer ran on meanwhile
    assert [l for l in after if not l.startswith("timer0")] == [l for l in before if not l.startswith("timer0")]
    t0, t1 = timers(before)["timer0"], timers(after)["timer0"]
    assert t1[0] == t0[0] == "500.000000" and int(t0[1]) - 5 <= int(t1[1]) <= int(t0[1]), (t0, t1)
    assert timers(after)["timer1"] == ["7.000000", "300"]
    # the queued signals come out with their siginfo, in order (this takes them)
    assert ask(outdir, pid, outer, signal.SIGHUP, "drain") == DRAINED
    assert "pending" == ask(outdir, pid, outer, signal.SIGUSR1, "check")[-1].strip()
    assert proc_state(outer) == "S"
