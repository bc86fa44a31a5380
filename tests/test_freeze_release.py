"""A freeze that fails half way lets go of everything it had seized, as it found it.

freeze_tree is called in this process (a cow-collect that exits is let go of by the
kernel anyway; a caller that lives on is not): after the failure no process of the
tree may be traced by us, and each is running, or stopped if it was stopped before.
The failures: a process of the tree that someone else traces, and a signal (here a
KeyboardInterrupt raised by a wrapped ptrace call) at each step of seizing a thread."""

import contextlib
import os
import signal
import time

import pytest

from stages.linux import freeze, procfs, ptrace
from tests.support.workloads import (RUNNING_STATES, ask, build, proc_state, running_workload, traced_by_another,
                                     tree_pids, workload)  # noqa: F401

def tracer_of(tid):
    try:
        with open(f"/proc/{tid}/status") as f:
            return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])
    except OSError:
        return None


def all_tids(pids):
    return [(pid, int(t)) for pid in pids for t in os.listdir(f"/proc/{pid}/task")]


def assert_let_go(pids, states=RUNNING_STATES):
    """No thread of pids traced by anyone, every one in states (a moment allowed to get there:
    a detached thread runs on to its next wait)."""
    for pid, tid in all_tids(pids):
        assert tracer_of(tid) == 0, f"thread {tid} of process {pid} is traced by {tracer_of(tid)}"
        deadline = time.monotonic() + 5
        while proc_state(tid) not in states:
            assert time.monotonic() < deadline, f"thread {tid} of process {pid} is {proc_state(tid)}"
            time.sleep(0.005)


@pytest.fixture
def holder():
    """holder(pid): a helper process that ptraces pid until the test ends."""
    with contextlib.ExitStack() as held:
        def start(pid):
            p = held.enter_context(traced_by_another(pid))
            assert tracer_of(pid) == p.pid
            return p

        yield start


def test_a_traced_process_in_the_tree_and_the_rest_is_let_go(workload, holder):
    wl = workload("chain", mib=1)
    walk = tree_pids(wl.root)
    victim = walk[-1]  # the last one the freeze meets: the others are seized by then
    other = holder(victim)
    with pytest.raises(freeze.FreezeError, match=f"process {victim}: already traced by process {other.pid}"):
        freeze.freeze_tree(wl.root)
    assert_let_go([pid for pid in walk if pid != victim])
    assert tracer_of(victim) == other.pid
    other.kill()
    other.wait()
    assert all(v.startswith("ok ") for v in wl.check().values())


def test_a_stopped_tree_stays_stopped_when_the_freeze_fails(workload, holder):
    wl = workload("chain", mib=1)
    walk = tree_pids(wl.root)
    victim = walk[-1]
    for pid in walk:
        os.kill(pid, signal.SIGSTOP)
    assert_let_go(walk, states=("T",))
    holder(victim)
    with pytest.raises(freeze.FreezeError, match="already traced"):
        freeze.freeze_tree(wl.root)
    time.sleep(0.05)  # a wrongly woken process would be running by now
    assert_let_go([pid for pid in walk if pid != victim], states=("T",))
    for pid in walk:
        os.kill(pid, signal.SIGCONT)
    assert_let_go([pid for pid in walk if pid != victim])


def signal_stop_of(pid):
    """Send SIGUSR1 to a seized (single-threaded) process and wait for its signal-delivery stop."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while proc_state(pid) != "t":
        assert time.monotonic() < deadline, proc_state(pid)
        time.sleep(0.001)


def interrupt_at(monkeypatch, name, nth, before=False, signal_at=None):
    """Wrap ptrace.NAME so that its nth call raises KeyboardInterrupt, as a SIGINT landing
    there would (before or after the real call).  signal_at: the nth seize is followed by a
    SIGUSR1 and its signal-delivery stop.  Returns a dict: "hit", the tid of the raise."""
    out = {"hit": None}
    calls = {"seize": 0, name: 0}
    real = {n: getattr(ptrace, n) for n in calls}

    def wrapper(n):
        def wrapped(tid, *args):
            calls[n] += 1
            if n == name and calls[n] == nth and before:
                out["hit"] = tid
                raise KeyboardInterrupt
            result = real[n](tid, *args)
            if n == "seize" and calls[n] == signal_at:
                signal_stop_of(tid)
            if n == name and calls[n] == nth:
                out["hit"] = tid
                raise KeyboardInterrupt
            return result
        return wrapped

    for n in calls:
        monkeypatch.setattr(ptrace, n, wrapper(n))
    return out


# the third process's thread caught at each step between not seized and stopped:
# (wrapped call, its nth call, raise before the real call, SIGUSR1 after the third seize)
STEPS = {
    "before the seize": ("seize", 3, True, False),
    "after the seize": ("seize", 3, False, False),
    "after the interrupt": ("interrupt", 3, False, False),
    "after its stop was waited for": ("waitpid", 3, False, False),
    # cowload answers SIGUSR1 with OUTDIR/PID.check: a signal the release drops shows
    "in a signal-delivery stop not waited for": ("seize", 3, False, True),
    "in a signal-delivery stop waited for": ("waitpid", 3, False, True),
    "after the signal was passed on": ("cont", 1, False, True),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_signal_at_any_step_of_the_freeze_lets_everything_go(step, workload, monkeypatch):
    wl = workload("chain", mib=1)
    walk = tree_pids(wl.root)
    name, nth, before, with_signal = STEPS[step]
    answer = os.path.join(wl.outdir, f"{walk[2]}.check")
    stop = interrupt_at(monkeypatch, name, nth, before=before, signal_at=3 if with_signal else None)
    with pytest.raises(KeyboardInterrupt):
        freeze.freeze_tree(wl.root)
    monkeypatch.undo()
    assert stop["hit"] == walk[2], (stop, walk)
    assert_let_go(walk)
    if with_signal:
        # the SIGUSR1 was delivered, not dropped: the process answered it
        deadline = time.monotonic() + 10
        while not os.path.exists(answer):
            assert time.monotonic() < deadline, "the SIGUSR1 sent during the freeze was lost"
            time.sleep(0.005)
    assert all(v.startswith("ok ") for v in wl.check().values())


@pytest.mark.parametrize("name", ["seize", "interrupt", "waitpid"])
def test_a_signal_half_way_through_the_threads_of_a_process(name, tmp_path, monkeypatch):
    """threadwl: 8 threads each, most of them running (2 ms sleeps); the failure hits a
    thread of the second process with some of its threads seized, some not."""
    outdir = tmp_path / "threadwl"
    outdir.mkdir()
    with running_workload([build("threadwl"), str(outdir), "1"], outdir, tree=True) as w:
        root, child = w.order
        # the fifth thread of the second process (the first is seized whole before it)
        stop = interrupt_at(monkeypatch, name, len(os.listdir(f"/proc/{root}/task")) + 5)
        with pytest.raises(KeyboardInterrupt):
            freeze.freeze_tree(root)
        monkeypatch.undo()
        assert stop["hit"] in [tid for _, tid in all_tids([child])]
        assert_let_go(w.order)
        for pid in w.order:
            assert ask(str(outdir / f"{pid}.check"), pid, timeout=15).startswith("ok")


def test_a_process_that_leaves_the_tree_while_it_is_frozen_is_let_go(workload, monkeypatch):
    """The grandchildren of chain are listed under their parent; that parent is killed just
    before they are seized, so they go to a reaper outside the tree.  They are no longer the
    tree's: let go, running, and in no list the freeze hands on (their pids could as well have
    been reused by unrelated processes, which --kill would then kill)."""
    wl = workload("chain", mib=1)
    walk = tree_pids(wl.root)
    middle = walk[1]
    grandchildren = [pid for pid in walk if pid not in (wl.root, middle)]
    assert len(grandchildren) == 2
    real = freeze.FrozenTree._freeze_process

    def freeze_process(self, pid):
        if pid == grandchildren[0]:
            os.kill(middle, signal.SIGKILL)  # frozen: SIGKILL works all the same
            deadline = time.monotonic() + 10
            while any(procfs.read_stat(g)["ppid"] == middle for g in grandchildren):
                assert time.monotonic() < deadline, "the grandchildren were not re-parented"
                time.sleep(0.005)
        return real(self, pid)

    monkeypatch.setattr(freeze.FrozenTree, "_freeze_process", freeze_process)
    tree = freeze.freeze_tree(wl.root)
    try:
        assert not set(grandchildren) & (set(tree.order) | set(tree.threads)), (tree.order, grandchildren)
        assert sorted(tree.departed) == sorted(grandchildren)  # cow-collect names them in a note
        assert_let_go(grandchildren)
        assert tracer_of(wl.root) != 0  # the rest is still held
    finally:
        tree.resume()
    assert_let_go([wl.root])
    wl.pids = [pid for pid in wl.pids if pid != middle]
    assert all(wl.check()[pid].startswith("ok") for pid in grandchildren)
