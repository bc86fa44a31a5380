"""Freezing, remote system calls and the zero page, on real processes."""

import os
import resource
import signal
import subprocess
import sys
import time

from stages.collect import state
from stages.linux import batch, freeze, pagemap, procfs, ptrace, remote
from tests.support.workloads import proc_state, workload  # noqa: F401


def status_of(pid, key):
    return procfs.read_status(pid)[key]


def test_zero_page_pfn_is_what_a_read_fault_maps():
    # a fresh anonymous mapping read in a child shows the same PFN
    code = (
        "import mmap, ctypes, os, struct\n"
        "m = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "v = ctypes.c_char.from_buffer(m); a = ctypes.addressof(v); del v\n"
        "_ = m[4096 * 3]\n"
        "fd = os.open('/proc/self/pagemap', os.O_RDONLY)\n"
        "print(struct.unpack('<Q', os.pread(fd, 8, (a // 4096 + 3) * 8))[0] & ((1 << 55) - 1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == pagemap.zero_pfn() != 0


def test_freeze_then_resume_restarts_the_interrupted_syscall(workload):
    wl = workload("chain", mib=1)
    tree = freeze.freeze_tree(wl.root)
    try:
        assert tree.order[0] == wl.root and sorted(tree.order) == sorted(wl.pids)
        for pid in tree.order:
            assert status_of(pid, "TracerPid") == str(os.getpid())
            regs = ptrace.get_regs(pid)
            assert regs["orig_rax"] == 130  # rt_sigsuspend, interrupted
    finally:
        assert tree.resume() == []
    time.sleep(0.05)
    for pid in wl.pids:
        assert status_of(pid, "TracerPid") == "0"
        with open(f"/proc/{pid}/syscall") as f:
            assert f.read().split()[0] == "130"  # back in sigsuspend, not returned with -ERESTARTNOHAND
    assert all(v.startswith("ok ") for v in wl.check().values())


def process_state(pid, tids, notes=None):
    """(brk, sigactions, tid address) and the view with the rest, as collect reads them."""
    view = state.ProcView(pid, tids)
    return state.remote_state(view, notes), view


def test_remote_brk_and_sigactions(workload):
    wl = workload("same", mib=1)
    tree = freeze.freeze_tree(wl.root)
    try:
        for pid in tree.order:
            vmas = procfs.read_smaps(pid)
            before = ptrace.get_regs_raw(pid)
            mask = ptrace.get_sigmask(pid)
            maps = procfs.read_text(f"/proc/{pid}/maps")
            fds = sorted(os.listdir(f"/proc/{pid}/fd"))
            notes = []
            (brk, acts, tid_address), view = process_state(pid, tree.threads[pid], notes)
            assert notes == []  # in one stop, not one call at a time
            calls = batch.Calls()
            calls.add(39)  # getpid
            with remote.RemoteSyscalls(pid, remote.find_syscall_insn(pid, vmas)) as rs:
                calls.run(rs, ptrace.get_regs(pid)["rsp"])
            assert calls.result(0) == pid
            heap = [v for v in vmas if v["kind"] == "heap"]
            stat = procfs.read_stat(pid)
            if heap:
                assert heap[0]["end"] == (brk + 4095) & ~4095
            else:
                assert brk == stat["start_brk"]
            assert len(acts) == 64
            # cowload handles SIGUSR1 and SIGTERM; SigCgt in status says the same
            caught = int(status_of(pid, "SigCgt"), 16)
            for n in range(1, 65):
                assert bool(acts[n - 1][0] > 1) == bool(caught >> (n - 1) & 1), n
            assert acts[signal.SIGUSR1 - 1][0] > 1
            assert tid_address and view.prctl["dumpable"] == 1 and view.sigaltstack[1] == 2  # SS_DISABLE
            # registers, mask, mappings and fds are exactly as before
            assert ptrace.get_regs_raw(pid) == before
            assert ptrace.get_sigmask(pid) == mask
            assert procfs.read_text(f"/proc/{pid}/maps") == maps
            assert sorted(os.listdir(f"/proc/{pid}/fd")) == fds
    finally:
        tree.resume()
    assert all(v.startswith("ok ") for v in wl.check().values())


def test_process_state_one_call_at_a_time_is_the_same(workload):
    """A process without a free fd cannot have the batch's pipe: the calls are made one by
    one (and a note says so), with the same results."""
    wl = workload("same", mib=1)
    pid = wl.root
    tree = freeze.freeze_tree(pid)
    try:
        (fast, view) = process_state(pid, tree.threads[pid])
        nfds = len(os.listdir(f"/proc/{pid}/fd"))
        old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (nfds + 1, old[1]))
        try:
            notes = []
            (slow, view_slow) = process_state(pid, tree.threads[pid], notes)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
        assert len(notes) == 1 and "one system call at a time" in notes[0] and "Too many open files" in notes[0]
        assert slow == fast
        for name in ("prctl", "itimers", "sigaltstack", "posix_timers"):
            assert getattr(view_slow, name) == getattr(view, name), name
    finally:
        tree.resume()
    assert all(v.startswith("ok ") for v in wl.check().values())


def test_a_sleep_interrupted_for_the_state_batch_finishes_its_sleep():
    """sleep(1) stopped in clock_nanosleep, whose restart needs the thread's restart block: the
    batch's loop must not overwrite it (an interrupted poll() did: sleep then died with
    "cannot read realtime clock: Bad address")."""
    p = subprocess.Popen(["sleep", "1"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        tree = freeze.freeze_tree(p.pid)
        try:
            notes = []
            process_state(p.pid, tree.threads[p.pid], notes)
            assert notes == []  # the batch ran (not one call at a time)
        finally:
            tree.resume()
        assert p.wait(timeout=10) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


def test_ignored_signals_are_read_as_ignored(tmp_path):
    ready = tmp_path / "ready"
    p = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time\n"
         "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
         f"open({str(ready)!r}, 'w').close()\n"
         "time.sleep(600)\n"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ready.exists():
            time.sleep(0.01)
        tree = freeze.freeze_tree(p.pid)
        try:
            (_, acts, _), _ = process_state(p.pid, tree.threads[p.pid])
        finally:
            tree.resume()
        ignored = int(status_of(p.pid, "SigIgn"), 16)
        for n in range(1, 65):
            assert (acts[n - 1][0] == 1) == bool(ignored >> (n - 1) & 1), n
        assert acts[signal.SIGHUP - 1][0] == 1 and acts[signal.SIGPIPE - 1][0] == 1  # python ignores SIGPIPE
        deadline = time.monotonic() + 5
        while proc_state(p.pid) != "S":  # back asleep in its (restarted) sleep
            assert time.monotonic() < deadline and status_of(p.pid, "TracerPid") == "0"
            time.sleep(0.01)
    finally:
        p.kill()
        p.wait()


def test_a_stopped_tree_stays_stopped(workload):
    wl = workload("same", mib=1)
    for pid in wl.pids:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(0.05)
    assert set(wl.states().values()) == {"T"}
    tree = freeze.freeze_tree(wl.root)
    for pid in tree.order:
        with remote.RemoteSyscalls(pid, remote.find_syscall_insn(pid, procfs.read_smaps(pid))) as rs:
            assert rs.call(39) == pid
    tree.resume()
    time.sleep(0.05)
    assert set(wl.states().values()) == {"T"}
    for pid in wl.pids:
        os.kill(pid, signal.SIGCONT)
    assert all(v.startswith("ok ") for v in wl.check().values())


def test_freeze_a_tree_that_forks_all_the_time(tmp_path):
    """Processes appear and exit while the tree is being frozen: never stuck, never lost."""
    code = (
        "import os, time\n"
        "end = time.time() + 60\n"
        "while time.time() < end:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        for _ in range(20):
            tree = freeze.freeze_tree(p.pid)
            try:
                assert tree.order[0] == p.pid
                for pid in tree.order:
                    assert status_of(pid, "TracerPid") == str(os.getpid())
                    assert proc_state(pid) == "t"
                # the frozen tree does not change
                assert [x for x in procfs.walk_tree(p.pid) if x not in tree.zombies] == tree.order
            finally:
                tree.resume()
        assert status_of(p.pid, "TracerPid") == "0" and p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_rseq_robust_list_and_tid_address(workload):
    """glibc registers rseq and a robust list in struct pthread; the tid address points there too."""
    wl = workload("same", mib=1)
    tree = freeze.freeze_tree(wl.root)
    try:
        for pid in tree.order:
            vmas = procfs.read_maps(pid)
            rseq_addr, rseq_len, rseq_sig = ptrace.get_rseq_configuration(pid)
            head, length = ptrace.get_robust_list(pid)
            (_, _, tid_addr), _ = process_state(pid, tree.threads[pid])
            tls = [v for v in vmas if v["start"] <= head < v["end"]]
            assert tls and tls[0]["kind"] == "anon" and tls[0]["prot"] == 3
            assert tls[0]["start"] <= rseq_addr < tls[0]["end"] and rseq_len >= 32 and rseq_sig
            assert tls[0]["start"] <= tid_addr < tls[0]["end"]
            assert length == 24  # sizeof(struct robust_list_head)
            # clear_child_tid is glibc's pthread tid field: it holds the thread's tid
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(tid_addr)
                assert int.from_bytes(mem.read(4), "little") == pid
    finally:
        tree.resume()
    assert all(v.startswith("ok ") for v in wl.check().values())
