"""Multi-threaded processes: every thread dumped and recreated with its tid, its registers,
TLS, memory and kernel registrations, blocked system calls going on (tests/workloads/threadwl.c,
and python3 threading), checked from inside the restored threads and from /proc."""

import os
import signal
import subprocess
import time

import pytest

from stages.linux import ptrace
from stages.linux.memstat import tree_frames
from stages.stream import StreamReader
from tests.support.commands import run, tool
from tests.support.workloads import ask, become_subreaper, build, kill_and_reap, proc_state, wait_killed
from tests.test_apply_e2e import apply, outer, plan, restored  # noqa: F401 (fixture)

NTHREADS = 8


class ThreadTree:
    """A running threadwl tree; killed (every pid ever seen) at teardown."""

    def __init__(self, tmp_path, children):
        become_subreaper()
        self.outdir = str(tmp_path / "threadwl")
        os.mkdir(self.outdir)
        self.popen = subprocess.Popen([build("threadwl"), self.outdir, str(children)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                      cwd="/", start_new_session=True)
        self.known = {self.popen.pid}
        ready = os.path.join(self.outdir, "ready")
        deadline = time.monotonic() + 20
        while not os.path.exists(ready):
            error = os.path.join(self.outdir, "error")
            assert not os.path.exists(error), open(error).read()
            assert self.popen.poll() is None and time.monotonic() < deadline, "threadwl did not start"
            time.sleep(0.005)
        with open(ready) as f:
            self.pids = [int(x) for x in f.read().split()]
        self.known.update(self.pids)

    def check(self, ns_pid, outer_pid):
        """The process's own report: ({thread index: fields}, first line, dataset line)."""
        lines = ask(os.path.join(self.outdir, f"{ns_pid}.check"), outer_pid, timeout=15).splitlines()
        threads = {}
        for line in lines[1:-1]:
            words = line.split()
            threads[int(words[1])] = {words[i]: int(words[i + 1]) for i in range(2, len(words), 2)}
        return lines[0], threads, lines[-1]

    def wait_gone(self):
        """After collect --kill: reap the tree (its children come to us) so its pids are free."""
        wait_killed(self.popen, self.known)

    def kill(self):
        kill_and_reap(self.known, self.popen)


@pytest.fixture
def threadwl(tmp_path):
    trees = []

    def start(children=0):
        trees.append(ThreadTree(tmp_path, children))
        return trees[-1]

    yield start
    for tree in trees:
        tree.kill()


def task_tids(pid):
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def ns_tid(outer_pid, tid):
    """The innermost NSpid of a thread seen from here."""
    with open(f"/proc/{outer_pid}/task/{tid}/status") as f:
        return int([line.split()[-1] for line in f if line.startswith("NSpid:")][0])


def names_and_nice(pid):
    """{tid: (comm, nice)} of every thread of pid."""
    out = {}
    for tid in task_tids(pid):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            out[tid] = (f.read().strip(), int(fields[16]))
    return out


def image_threads(images):
    return {r.body["pid"]: [t["tid"] for t in r.body["threads"]]
            for r in StreamReader(__import__("io").BytesIO(images)) if r.kind == "process"}


def assert_threads_run_on(tree, ns_pid, outer_pid, before):
    """Restored threads report good memory, TLS and tids; every counter goes on from where it
    was (it never restarts from 0) and keeps increasing."""
    head, first, dataset = tree.check(ns_pid, outer_pid)
    assert head == "ok" and dataset == "dataset 1", (head, first, dataset)
    time.sleep(0.7)
    head, second, dataset = tree.check(ns_pid, outer_pid)
    assert head == "ok", second
    for i in range(NTHREADS):
        assert first[i]["tid"] == before[i]["tid"] == first[i]["now"], (i, first[i], before[i])
        # thread 3's own pending SIGWINCH, and nothing else pending anywhere
        assert first[i]["pend"] == before[i]["pend"] == (1 << signal.SIGWINCH if i == 3 else 0), (i, first[i])
        assert first[i]["count"] >= before[i]["count"], (i, first[i], before[i])
        assert second[i]["count"] > first[i]["count"], (i, first[i], second[i])
    return first


def test_eight_threads_restored_with_their_tids_memory_and_counters(threadwl, restored, tmp_path):
    tree = threadwl()
    pid = tree.pids[0]
    head, before, _ = tree.check(pid, pid)
    assert head == "ok", before
    tids = task_tids(pid)
    named = names_and_nice(pid)
    assert len(tids) == NTHREADS + 1
    assert sorted([pid] + [before[i]["tid"] for i in range(NTHREADS)]) == tids
    images = run([tool("cow-collect"), "--tree", str(pid), "--kill"]).stdout
    assert image_threads(images) == {pid: [pid] + sorted(set(tids) - {pid})}
    tree.popen.wait(timeout=10)
    shown = run([tool("cow-show")], images).stdout.decode()
    assert shown.count("  thread ") == NTHREADS + 1 and "tid address" in shown, shown[:3000]
    rep = apply(plan(images), tmp_path, restored)
    assert outer(rep, pid) == pid
    assert task_tids(pid) == tids
    assert names_and_nice(pid) == named and named[before[5]["tid"]] == ("wl-5", 7), named
    assert_threads_run_on(tree, pid, pid, before)
    # the per-thread kernel registrations glibc made are back, each pointing into its thread
    records = [r.body for r in StreamReader(__import__("io").BytesIO(images)) if r.kind == "process"][0]["threads"]
    for rec in records:
        tid = rec["tid"]
        assert list(ptrace.get_robust_list(tid)) == list(rec["robust_list"]), tid
        assert rec["robust_list"][0] and rec["tid_address"], rec
    with open(f"/proc/{pid}/task/{tids[-1]}/wchan") as f:
        wchan = f.read()
    assert "nanosleep" in wchan or "futex" in wchan or wchan == "0", wchan


def test_threads_blocked_in_futex_and_nanosleep_go_on(threadwl, restored, tmp_path):
    """The futex waiter (thread 6) and the 300 ms sleeper (thread 7) are inside their system
    calls at the dump; after restore they wait again and wake as before."""
    tree = threadwl()
    pid = tree.pids[0]
    _, before, _ = tree.check(pid, pid)
    time.sleep(0.2)
    with open(f"/proc/{pid}/task/{before[6]['tid']}/wchan") as f:
        assert "futex" in f.read()
    images = run([tool("cow-collect"), "--tree", str(pid), "--kill"]).stdout
    regs = {}
    for rec in [r.body for r in StreamReader(__import__("io").BytesIO(images)) if r.kind == "process"][0]["threads"]:
        regs[rec["tid"]] = ptrace.regs_from_bytes(rec["regs"])
    assert regs[before[6]["tid"]]["orig_rax"] == 202  # futex
    assert regs[before[7]["tid"]]["orig_rax"] == 230  # clock_nanosleep
    tree.popen.wait(timeout=10)
    apply(plan(images), tmp_path, restored)
    time.sleep(0.3)
    for i in (6, 7):
        with open(f"/proc/{pid}/task/{before[i]['tid']}/wchan") as f:
            assert ("futex" if i == 6 else "nanosleep") in f.read(), i
    assert_threads_run_on(tree, pid, pid, before)


def test_forked_multithreaded_tree_in_pidns_keeps_sharing(threadwl, restored, tmp_path):
    tree = threadwl(children=3)
    befores = {}
    for pid in tree.pids:
        head, befores[pid], _ = tree.check(pid, pid)
        assert head == "ok"
    tids = {pid: task_tids(pid) for pid in tree.pids}
    frames_before = tree_frames(tree.pids[0])["distinct_frames"]
    images = run([tool("cow-collect"), "--tree", str(tree.pids[0]), "--kill"]).stdout
    tree.popen.wait(timeout=10)
    rep = apply(plan(images), tmp_path, restored, "--pidns")
    for pid in tree.pids:
        out = outer(rep, pid)
        assert sorted(ns_tid(out, t) for t in task_tids(out)) == tids[pid]
        assert_threads_run_on(tree, pid, out, befores[pid])
    frames_after = tree_frames(outer(rep, tree.pids[0]))["distinct_frames"]
    # the 4 MiB dataset is shared by all four processes again: far below 4 private copies
    assert frames_after <= frames_before + 16, (frames_after, frames_before)


PY_THREADS = """
import hashlib, os, sys, threading, time
out = sys.argv[1]
counts = [0] * 4
ok = [True] * 4
def work(i):
    tids[i] = threading.get_native_id()
    data = bytes((i * 7 + k) % 251 for k in range(200000))
    digest = hashlib.sha256(data).hexdigest()
    while True:
        counts[i] += 1
        ok[i] = ok[i] and hashlib.sha256(data).hexdigest() == digest and threading.get_native_id() == tids[i]
        time.sleep(0.01)
tids = [0] * 4
threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
for t in threads:
    t.start()
while not all(tids):
    time.sleep(0.001)
while True:
    with open(out + ".tmp", "w") as f:
        f.write(" ".join(f"{tids[i]}:{counts[i]}:{int(ok[i])}" for i in range(4)) + "\\n")
    os.replace(out + ".tmp", out)
    time.sleep(0.05)
"""


def read_py_report(path):
    with open(path) as f:
        return [tuple(int(x) for x in w.split(":")) for w in f.read().split()]


def test_python3_threads_restored_and_running(restored, tmp_path):
    become_subreaper()
    script = tmp_path / "threads.py"
    script.write_text(PY_THREADS)
    out = tmp_path / "threads.out"
    orig = subprocess.Popen(["python3", str(script), str(out)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/")
    try:
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        before = read_py_report(out)
        tids = task_tids(orig.pid)
        assert len(tids) == 5 and all(ok for _, _, ok in before)
        images = run([tool("cow-collect"), "--tree", str(orig.pid), "--kill"]).stdout
        orig.wait(timeout=10)
        rep = apply(plan(images), tmp_path, restored, "--pidns")
        pid = outer(rep, orig.pid)
        time.sleep(0.5)
        first = read_py_report(out)
        time.sleep(0.5)
        second = read_py_report(out)
        assert sorted(ns_tid(pid, t) for t in task_tids(pid)) == tids
        for b, f, s in zip(before, first, second):
            assert b[0] == f[0] == s[0]  # the tid python knows is the thread's tid
            assert f[2] == s[2] == 1  # its data and tid checks hold
            assert b[1] <= f[1] < s[1]  # it counts on from where it was
    finally:
        orig.kill()
        orig.wait(timeout=10)


SPAWNER = (
    # keeps starting threads while we freeze it: long-lived ones, and short ones that exit
    "import threading, time\n"
    "for i in range(120):\n"
    "    threading.Thread(target=time.sleep, args=(600 if i % 2 else 0.005,), daemon=True).start()\n"
    "    time.sleep(0.005)\n"
    "time.sleep(600)\n"
)


def test_threads_created_and_exiting_while_frozen(tmp_path):
    """collect freezes until no new thread shows up: every thread that lived through the dump
    is in the image, each frozen (the tree runs on untraced afterwards)."""
    become_subreaper()
    p = subprocess.Popen(["python3", "-c", SPAWNER], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    try:
        time.sleep(0.1)
        grew = False
        for i in range(4):
            alive_before = set(task_tids(p.pid))
            images = run([tool("cow-collect"), "--tree", str(p.pid)]).stdout
            order = image_threads(images)[p.pid]
            dumped = set(order)
            alive_after = set(task_tids(p.pid))
            long_lived = alive_before & alive_after
            assert order[0] == p.pid and len(order) == len(dumped)
            assert long_lived <= dumped, long_lived - dumped
            grew = grew or len(alive_after) > len(dumped)
            for tid in long_lived:  # these do not exit
                with open(f"/proc/{p.pid}/task/{tid}/status") as f:
                    assert "TracerPid:\t0" in f.read()
        assert grew, "the process had stopped starting threads: this test froze a still process"
        assert p.poll() is None
    finally:
        p.kill()
        p.wait(timeout=10)


def test_failing_thread_operation_kills_the_partial_tree(threadwl, tmp_path):
    """A thread whose own restorer operation fails (an rseq area the kernel refuses): cow-apply
    names the thread and the operation, and kills every process it created."""
    from tests.test_apply_e2e import rewrite_plan

    tree = threadwl(children=2)
    last = tree.pids[-1]
    images = run([tool("cow-collect"), "--tree", str(tree.pids[0]), "--kill"]).stdout
    tree.wait_gone()
    bad_tid = []

    def bad_rseq(proc):
        if proc["pid"] == last:
            thread = proc["image"]["threads"][-1]
            thread["rseq"] = {"addr": 8, "len": 32, "sig": 0x53053053}  # not mapped
            bad_tid.append(thread["tid"])

    proc = run([tool("cow-apply")], rewrite_plan(plan(images), bad_rseq), check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert f"process {last}: thread {bad_tid[0]}: restorer operation" in err and "OP_SYSCALL" in err, err
    deadline = time.monotonic() + 10
    while any(proc_state(p) not in (None, "Z") for p in tree.pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(proc_state(p) in (None, "Z") for p in tree.pids), {p: proc_state(p) for p in tree.pids}


def test_thread_ids_in_use_or_twice_are_refused_before_anything_runs(threadwl, tmp_path):
    from tests.test_apply_e2e import rewrite_plan

    tree = threadwl()
    pid = tree.pids[0]
    images = run([tool("cow-collect"), "--tree", str(pid), "--kill"]).stdout
    tree.popen.wait(timeout=10)
    planned = plan(images)
    taken = os.getpid()  # a pid in use: ours

    def tid_taken(proc):
        proc["image"]["threads"][3]["tid"] = taken

    def tid_twice(proc):
        proc["image"]["threads"][3]["tid"] = proc["image"]["threads"][2]["tid"]

    for change, words in ((tid_taken, [str(taken), "in use"]), (tid_twice, ["is also a thread of process"])):
        proc = run([tool("cow-apply")], rewrite_plan(planned, change), check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and all(w in err for w in words), err
        assert proc_state(pid) is None, f"process {pid} exists: {proc_state(pid)}"  # nothing was created


LEADERLESS_C = r"""
#include <pthread.h>
#include <unistd.h>
static void *spin(void *a) { for (;;) sleep(100); return a; }
int main(void) { pthread_t t; pthread_create(&t, 0, spin, 0); pthread_exit(0); }
"""


def test_process_whose_main_thread_exited_is_refused_by_name(tmp_path):
    """pthread_exit in main leaves a zombie leader with live threads: refused, not mistaken for
    an exited process or a zombie, and its thread runs on untraced."""
    src = tmp_path / "leaderless.c"
    src.write_text(LEADERLESS_C)
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(tmp_path / "leaderless"), str(src)], check=True)
    become_subreaper()
    p = subprocess.Popen([str(tmp_path / "leaderless")], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while proc_state(p.pid) != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc = run([tool("cow-collect"), "--tree", str(p.pid)], check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert f"cow-collect: process {p.pid}: its main thread has exited (1 other threads run on): not supported" \
            in err.splitlines(), err
        (other,) = [t for t in task_tids(p.pid) if t != p.pid]
        with open(f"/proc/{p.pid}/task/{other}/status") as f:
            assert "TracerPid:\t0" in f.read()
    finally:
        p.kill()
        p.wait(timeout=10)


def test_thread_inside_an_rseq_critical_section_goes_to_its_abort_handler(restored, tmp_path):
    """rseqwl's worker spins inside an rseq critical section and leaves it only through the
    abort handler.  collect moves it there (as the kernel would): the original goes on
    aborting after the dump, the image's registers are at the handler (right after the
    signature), and the restored thread goes on aborting too."""
    become_subreaper()
    outdir = tmp_path / "rseqwl"
    outdir.mkdir()
    p = subprocess.Popen([build("rseqwl"), str(outdir)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/")

    def aborts(ns_pid, outer_pid):
        return int(ask(outdir / f"{ns_pid}.check", outer_pid, timeout=10).split()[1])

    def goes_on(ns_pid, outer_pid):
        # the worker aborts only when preempted: on a busy machine it may not run for a
        # while, so wait up to 5 s for one more abort (a stuck worker never makes one)
        first = aborts(ns_pid, outer_pid)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if aborts(ns_pid, outer_pid) > first:
                return True
        return False

    try:
        deadline = time.monotonic() + 10
        while not (outdir / "ready").exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.005)
        assert goes_on(p.pid, p.pid)
        images = run([tool("cow-collect"), "--tree", str(p.pid)]).stdout
        assert goes_on(p.pid, p.pid), "the original thread is stuck in its critical section after the dump"
        worker = [r.body for r in StreamReader(__import__("io").BytesIO(images)) if r.kind == "process"][0]["threads"][1]
        rip = ptrace.regs_from_bytes(worker["regs"])["rip"]
        with open(f"/proc/{p.pid}/mem", "rb") as mem:
            mem.seek(rip - 4)
            assert mem.read(4) == (0x53053053).to_bytes(4, "little"), "the dumped thread is not at the abort handler"
        images = run([tool("cow-collect"), "--tree", str(p.pid), "--kill"]).stdout
        p.wait(timeout=10)
        rep = apply(plan(images), tmp_path, restored, "--pidns")
        assert goes_on(p.pid, outer(rep, p.pid)), "the restored thread does not abort any more"
    finally:
        p.kill()
        p.wait(timeout=10)


def test_each_thread_keeps_its_own_scheduler_policy_and_cpus(threadwl, restored, tmp_path):
    """Policy and CPU affinity are per thread: two threads given their own (from outside)
    have them again after restore, and the main thread keeps the process's."""
    tree = threadwl()
    root = tree.pids[0]
    main_policy, main_cpus = os.sched_getscheduler(root), os.sched_getaffinity(root)
    a, b = task_tids(root)[1:3]
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setscheduler(a, os.SCHED_BATCH, os.sched_param(0))
    os.sched_setaffinity(a, {cpus[0]})
    os.sched_setscheduler(b, os.SCHED_IDLE, os.sched_param(0))
    os.sched_setaffinity(b, {cpus[-1]})
    want = {tid: (os.sched_getscheduler(tid), os.sched_getaffinity(tid)) for tid in task_tids(root)}
    assert want[a] == (os.SCHED_BATCH, {cpus[0]}) and want[b] == (os.SCHED_IDLE, {cpus[-1]})
    images = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
    tree.wait_gone()
    apply(plan(images), tmp_path, restored)
    got = {tid: (os.sched_getscheduler(tid), os.sched_getaffinity(tid)) for tid in task_tids(root)}
    assert got == want
    assert got[root] == (main_policy, main_cpus)


def test_thread_records_survive_a_round_trip(threadwl, restored, tmp_path):
    """Dump, restore, dump again: every thread's kernel-side state is what it was (tid, name,
    nice, registrations, alternate stack, mask, TLS base); only what the threads did since
    (their registers but fs_base) may differ."""
    import io

    tree = threadwl(children=1)
    root = tree.pids[0]
    first = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
    tree.wait_gone()
    apply(plan(first), tmp_path, restored)
    second = run([tool("cow-collect"), "--tree", str(root)]).stdout

    def threads(images):
        out = {}
        for rec in StreamReader(io.BytesIO(images)):
            if rec.kind == "process":
                for t in rec.body["threads"]:
                    out[(rec.body["pid"], t["tid"])] = (
                        t["comm"], t["nice"], t.get("rseq"), list(t["robust_list"]), t["tid_address"],
                        list(t.get("sigaltstack") or []), t["sigmask"], ptrace.regs_from_bytes(t["regs"])["fs_base"])
        return out

    before, after = threads(first), threads(second)
    assert len(before) == 2 * (NTHREADS + 1)
    assert after == before


def test_threads_of_a_process_of_another_user_get_its_credentials(restored, tmp_path):
    """Credentials are per thread in the kernel: every restored thread has the dumped uids and
    gids (each thread sets them itself), not only the main thread."""
    become_subreaper()
    code = ("import os, threading, time\n"
            "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
            "for i in range(3): threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
            "time.sleep(600)\n")
    p = subprocess.Popen(["python3", "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/")

    def creds(pid):
        out = {}
        for tid in task_tids(pid):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[tid] = [line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:"))]
        return out

    try:
        deadline = time.monotonic() + 10
        while len(task_tids(p.pid)) < 4:
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        before = creds(p.pid)
        assert all(c == [["65534"] * 4, ["65534"] * 4] for c in before.values()), before
        images = run([tool("cow-collect"), "--tree", str(p.pid), "--kill"]).stdout
        p.wait(timeout=10)
        pid = outer(apply(plan(images), tmp_path, restored, "--pidns"), p.pid)
        after = creds(pid)
        assert sorted(ns_tid(pid, t) for t in after) == sorted(before)
        assert list(after.values()) == list(before.values()), after
    finally:
        p.kill()
        p.wait(timeout=10)
