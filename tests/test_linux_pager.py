"""The pager (stages/linux/pager.py): a frozen process vmsplices its own pages into pipes
(through inject.py, which batch.py shares: its code is checked here too).

Checked from outside on real workloads: the bytes are the process's, its sharing is
untouched (distinct PFNs), nothing of the pager stays in it (maps, fds, registers),
and every failure leaves the process as it was, running on afterwards."""

import contextlib
import os
import resource
import signal
import subprocess
import threading
import time

import pytest

from stages.collect.collector import Collection
from stages.linux import batch, freeze, inject, pager, ptrace, remote
from stages.linux.memory import ProcessMemory
from stages.linux.memstat import tree_frames
from tests.support.workloads import proc_state, workload  # noqa: F401

PAGE = 4096


@pytest.mark.parametrize("asm, code", [(pager.PAGER_ASM, pager.PAGER_CODE), (batch.BATCH_ASM, batch.BATCH_CODE)],
                         ids=["pager", "batch"])
def test_injected_code_is_its_assembly(tmp_path, asm, code):
    """The code run in a tracee is what its listing assembles to (the bytes are reviewed as
    assembly), and ends in its park loop."""
    src, obj, raw = tmp_path / "code.S", tmp_path / "code.o", tmp_path / "code.bin"
    src.write_text(asm)
    subprocess.run(["gcc", "-c", str(src), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    assert raw.read_bytes() == code
    assert code.count(inject.PARK) == 1 and code.endswith(bytes(inject.RESUME.size))  # TAIL_ASM


@contextlib.contextmanager
def frozen(wl):
    """The workload's tree frozen and inspected; resumed afterwards whatever happens."""
    tree = freeze.freeze_tree(wl.root)
    try:
        coll = Collection(tree)
        coll.inspect()
        coll.read()
        yield coll
    finally:
        tree.resume()


def root_ranges(coll):
    """[(addr, length)] of the runs first seen in the root process, and its view."""
    return [(addr, n * PAGE) for _, proc, addr, n in coll.table.runs if proc == 0], coll.views[0]


def snapshot(pid):
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return maps, sorted(os.listdir(f"/proc/{pid}/fd")), ptrace.get_regs(pid), ptrace.get_sigmask(pid)


def without_rseq(data, ranges, pid):
    """data (the bytes of ranges) with the thread's rseq area zeroed: the kernel rewrites its
    cpu fields whenever the thread returns to user space, as the pager's loop does."""
    addr, size, _ = ptrace.get_rseq_configuration(pid)
    offset = 0
    for a, n in ranges:
        if a <= addr < a + n:
            at = offset + addr - a
            return data[:at] + bytes(size) + data[at + size:]
        offset += n
    return data


def read_all(p, ranges):
    """The whole stream, read by two threads taking turns as collect's readers do."""
    total = sum(n for _, n in ranges)
    buf = bytearray(total)
    view = memoryview(buf)
    pieces = [(o, min(256 * 1024, total - o)) for o in range(0, total, 256 * 1024)]
    errors = []

    def reader(mine):
        try:
            for o, n in mine:
                p.read_at(o, view[o:o + n])
        except OSError as exc:
            errors.append(exc)
            p.cancel()

    threads = [threading.Thread(target=reader, args=(pieces[i::2],), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            p.poll()
            for t in threads:
                t.join(0.05)
    finally:
        p.cancel()  # when poll() raised: the readers give up instead of outliving the test
        for t in threads:
            t.join()
    return bytes(buf), errors


def page_through(view, ranges):
    """The frozen process of view gives ranges through a pager: the bytes are its memory's
    (rseq areas aside), and its registers, mask and mappings are as before."""
    state = snapshot(view.pid)
    p = pager.Pager(view.pid, remote.find_syscall_insn(view.pid, view.vmas), ranges)
    p.start()
    got, errors = read_all(p, ranges)
    p.finish()
    assert not errors
    assert snapshot(view.pid) == state
    with ProcessMemory(view.pid) as mem:
        live = b"".join(mem.read(a, n) for a, n in ranges)
    assert without_rseq(got, ranges, view.pid) == without_rseq(live, ranges, view.pid)


def test_pager_gives_the_bytes_and_leaves_nothing_behind(workload):
    wl = workload("same", mib=8)
    before = tree_frames(wl.root)
    with frozen(wl) as coll:
        ranges, view = root_ranges(coll)
        assert sum(n for _, n in ranges) >= 8 << 20
        page_through(view, ranges)
    assert tree_frames(wl.root)["distinct_frames"] == before["distinct_frames"]
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_a_range_it_cannot_splice_fails_cleanly(workload):
    """An unmapped range: vmsplice fails, the loop closes its pipes (the reader sees the
    end instead of waiting), finish() names the error, the process is as it was."""
    wl = workload("same", mib=4)
    with frozen(wl) as coll:
        ranges, view = root_ranges(coll)
        state = snapshot(view.pid)
        bad = ranges[:1] + [(PAGE, PAGE)] + ranges[1:]  # page 1 is never mapped
        p = pager.Pager(view.pid, remote.find_syscall_insn(view.pid, view.vmas), bad)
        p.start()
        _, errors = read_all(p, bad)
        assert errors and "stopped early" in str(errors[0])
        with pytest.raises(pager.PagerError, match="vmsplice of its pages failed: Bad address"):
            p.finish()
        assert snapshot(view.pid) == state
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_no_fd_left_for_a_pipe_means_unavailable_and_untouched(workload):
    wl = workload("same", mib=4)
    pid = wl.root
    nfds = len(os.listdir(f"/proc/{pid}/fd"))
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (nfds + 1, old[1]))  # room for half a pipe
    try:
        with frozen(wl) as coll:
            ranges, view = root_ranges(coll)
            state = snapshot(pid)
            p = pager.Pager(pid, remote.find_syscall_insn(pid, view.vmas), ranges)
            with pytest.raises(pager.Unavailable, match="pipe2: Too many open files"):
                p.start()
            assert snapshot(pid) == state
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_a_process_killed_while_paging_ends_the_reading(workload):
    wl = workload("same", mib=8)
    with frozen(wl) as coll:
        ranges, view = root_ranges(coll)
        p = pager.Pager(view.pid, remote.find_syscall_insn(view.pid, view.vmas), ranges)
        p.start()
        buf = memoryview(bytearray(PAGE))
        p.read_at(0, buf)  # it runs; the pipes are full behind this page
        os.kill(view.pid, signal.SIGKILL)
        with pytest.raises(OSError):
            read_all(p, ranges)  # the rest: end of file (or poll() sees the death)
            p.poll()
            raise AssertionError("reading went on after SIGKILL")
        with pytest.raises(OSError):
            p.finish()


@contextlib.contextmanager
def watchdog(pids, seconds=20):
    """SIGKILL pids if the block takes longer (a tracer waiting for a stop that never comes
    then sees them die instead of hanging the suite), and fail."""
    fired = threading.Event()

    def bite():
        fired.set()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(seconds, bite)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    assert not fired.is_set(), f"still waiting after {seconds} s"


def wait_state(pid, state, timeout=10):
    deadline = time.monotonic() + timeout
    while proc_state(pid) != state:
        assert time.monotonic() < deadline, f"process {pid}: state {proc_state(pid)}, not {state}"
        time.sleep(0.005)


def test_a_stopped_process_gives_its_state_and_pages_and_stays_stopped(workload):
    """A group-stopped process (kill -STOP): its state read in one stop (batch), its pages
    through the pager, each run and stopped again; afterwards it is still stopped."""
    wl = workload("same", mib=8)
    os.kill(wl.root, signal.SIGSTOP)
    wait_state(wl.root, "T")
    with watchdog(wl.pids):
        with frozen(wl) as coll:  # the state read: batch.py's code in the process
            assert coll.tree.stopped == {wl.root}
            ranges, view = root_ranges(coll)
            page_through(view, ranges)
    wait_state(wl.root, "T")  # detached, it goes back into its group stop
    os.kill(wl.root, signal.SIGCONT)
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_code_closed_while_it_runs_is_stopped_first(workload):
    """close() without stop() (as when a SIGTERM of cow-collect cuts stop() short): the code
    is stopped before anything is taken out, the process is left as it was."""
    wl = workload("same", mib=8)
    with frozen(wl) as coll:
        ranges, view = root_ranges(coll)
        state = snapshot(view.pid)
        p = pager.Pager(view.pid, remote.find_syscall_insn(view.pid, view.vmas), ranges)
        p.start()
        p.read_at(0, memoryview(bytearray(PAGE)))  # it runs: blocked on the full pipes
        p.code.close()
        assert snapshot(view.pid) == state
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}
