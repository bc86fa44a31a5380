"""Build and launch the C workloads of tests/workloads (see cowload.c for the protocol).

    wl = start_workload("same", 4, tmp_path)      # waits for OUTDIR/ready
    wl.root, wl.pids                               # root pid, every pid of the tree
    wl.check()                                     # SIGUSR1 each process: {pid: "ok <sum>" | "bad <sum>"}
    wl.kill_tree()                                 # SIGKILL everything, reap what we can

The ``workload`` pytest fixture (import it into a test module) starts workloads
and ALWAYS kills every process of every tree it started, pass or fail.
"""

import contextlib
import ctypes
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(os.path.dirname(HERE), "workloads")
PATTERNS = ("same", "moved", "rewrote", "chain", "split", "orphans")
PR_SET_CHILD_SUBREAPER = 36


def build(name="cowload"):
    """Compile tests/workloads/NAME.c into a cache dir keyed by the hash of its source and the
    shared headers (protocol.h); return the binary."""
    src = os.path.join(SOURCES, name + ".c")
    h = hashlib.sha256()
    for path in [src] + sorted(glob.glob(os.path.join(SOURCES, "*.h"))):
        with open(path, "rb") as f:
            h.update(f.read())
    digest = h.hexdigest()[:16]
    cache = os.path.join(tempfile.gettempdir(), f"cowtree-workloads-{digest}")
    binary = os.path.join(cache, name)
    if not os.path.exists(binary):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{binary}.{os.getpid()}.tmp"
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", tmp, src], check=True)
        os.replace(tmp, binary)  # atomic: parallel builders agree
    return binary


def become_subreaper():
    """Orphans of a killed tree are re-parented to us (not to a pid 1 that may never reap them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def children_of(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def tree_pids(root):
    """Pids of the live tree below (and including) root, parents first."""
    order, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid in order or not os.path.exists(f"/proc/{pid}"):
            continue
        order.append(pid)
        todo.extend(children_of(pid))
    return order


# States of a process that runs on: D is a short uninterruptible wait (file
# I/O, a fault being served), not a stop; T, t, Z and X are what we test against.
RUNNING_STATES = ("R", "S", "D")


def proc_state(pid):
    """The one-letter state of /proc/PID/stat, or None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", errors="surrogateescape") as f:  # comm need not be UTF-8
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def reap(pid):
    """Reap pid if it is our child (or was re-parented to us); True when it is gone.  A pid
    that is not our child is gone only when /proc says so: a process of a killed tree is
    re-parented to us (the subreaper) only after its parent has died, and until then its
    pid is still taken."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return proc_state(pid) is None
    return done == pid or proc_state(pid) is None


def wait_file(path, pid=None, timeout=20):
    """Wait for a workload to write path (pid: whose state to name if it never does)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared (state {proc_state(pid) if pid else '?'})"
        time.sleep(0.005)


def wait_killed(popen, pids, timeout=10):
    """After cow-collect --kill: wait for popen, then reap every pid of the killed tree (they
    come to us, the subreaper), so that a restore finds their pids free; fail if one stays."""
    popen.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while not all(reap(p) for p in pids):
        assert time.monotonic() < deadline, {p: proc_state(p) for p in pids}
        time.sleep(0.01)


def kill_and_reap(pids, *popens, timeout=10, gone=None):
    """SIGKILL every pid, wait for the popens, reap them all (we are their subreaper): a
    test's teardown, pass or fail.  gone(pid) says a pid is done with (default: reap);
    True when every pid is, within timeout."""
    gone = gone or reap
    for pid in sorted(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for popen in popens:
        if popen is not None:
            popen.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class Trees:
    """Every process a test started (popens) or restored (pids): kill_all SIGKILLs the live
    tree below each popen and every pid, and reaps them."""

    def __init__(self):
        self.pids = set()
        self.popens = []

    def kill_all(self, gone=None):
        for p in self.popens:
            self.pids.update(tree_pids(p.pid))
        return kill_and_reap(self.pids, *self.popens, gone=gone)


class Running:
    """A workload started by running_workload: outdir, popen, ready (what it wrote to
    outdir/ready), pids (killed at teardown: add the restored ones)."""

    def __init__(self, outdir, popen):
        self.outdir, self.popen, self.pids, self.ready = outdir, popen, {popen.pid}, ""


def ask(path, pid, sig=signal.SIGUSR1, timeout=20):
    """The text a workload writes at path when it gets sig (an old answer removed first)."""
    if os.path.exists(path):
        os.unlink(path)
    os.kill(pid, sig)
    wait_file(path, pid, timeout)
    with open(path) as f:
        return f.read()


def ask_inside(outdir, ns_pid, outer_pid):
    """What process ns_pid reports from inside: SIGUSR1 to outer_pid, then the lines
    "key value" of OUTDIR/<ns_pid>.check as a dict (the C state workloads' protocol)."""
    text = ask(os.path.join(outdir, f"{ns_pid}.check"), outer_pid)
    return dict(line.split(" ", 1) for line in text.splitlines())


# PTRACE_SEIZE the pid in argv[1] (no stop), say so, and hold it until killed
_TRACER = (
    "import ctypes, sys, signal\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.ptrace(0x4206, int(sys.argv[1]), 0, 0) != 0:\n"
    "    sys.exit(ctypes.get_errno())\n"
    "print('seized', flush=True)\n"
    "signal.pause()\n"
)


@contextlib.contextmanager
def traced_by_another(pid):
    """A process of ours (the Popen) that ptraces pid, as a debugger would, until the block
    ends: then it is killed, and pid detached with it."""
    holder = subprocess.Popen([sys.executable, "-c", _TRACER, str(pid)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, close_fds=True)
    try:
        assert holder.stdout.readline() == b"seized\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def read_mem(pid, addr, n):
    """n bytes at addr of pid, through /proc/PID/mem."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def write_mem(pid, addr, data):
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
        f.seek(addr)
        f.write(data)


@contextlib.contextmanager
def running_workload(argv, outdir, cwd="/", tree=False):
    """Start argv (which writes outdir/ready when it is set up) in its own session, wait for
    it, and at the end SIGKILL and reap it, its live tree and every pid in .pids.
    tree: ready holds the pids of the tree (.order, added to .pids)."""
    become_subreaper()
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             close_fds=True, cwd=cwd, start_new_session=True)
    w = Running(str(outdir), popen)
    try:
        ready = os.path.join(w.outdir, "ready")
        wait_file(ready, popen.pid)
        with open(ready) as f:
            w.ready = f.read()
        if tree:
            w.order = [int(x) for x in w.ready.split()]
            w.pids.update(w.order)
        yield w
    finally:
        w.pids.update(tree_pids(popen.pid))
        kill_and_reap(w.pids, popen)


class Workload:
    def __init__(self, pattern, mib, outdir, popen):
        self.pattern, self.mib, self.outdir, self.popen = pattern, mib, outdir, popen
        self.root = popen.pid
        self.pids = []
        self.known = {self.root}  # every pid ever seen, for teardown

    def wait_ready(self, timeout=30):
        ready = os.path.join(self.outdir, "ready")
        error = os.path.join(self.outdir, "error")
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if os.path.exists(error):
                raise RuntimeError(f"workload {self.pattern} failed: {open(error).read().strip()}")
            if self.popen.poll() is not None:
                raise RuntimeError(f"workload {self.pattern} exited with {self.popen.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workload {self.pattern} not ready after {timeout}s")
            time.sleep(0.005)
        with open(ready) as f:
            self.pids = sorted(int(x) for x in f.read().split())
        self.known.update(self.pids)
        return self

    def sums(self):
        out = {}
        for pid in self.pids:
            with open(os.path.join(self.outdir, f"{pid}.sum")) as f:
                out[pid] = f.read().strip()
        return out

    def check(self, timeout=10):
        """Ask every process to verify its memory; {pid: 'ok <sum>' | 'bad <sum>'}."""
        for pid in self.pids:
            path = os.path.join(self.outdir, f"{pid}.check")
            if os.path.exists(path):
                os.unlink(path)
            os.kill(pid, signal.SIGUSR1)
        out = {}
        deadline = time.monotonic() + timeout
        for pid in self.pids:
            path = os.path.join(self.outdir, f"{pid}.check")
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"process {pid} wrote no .check (state {proc_state(pid)})")
                time.sleep(0.005)
            with open(path) as f:
                out[pid] = f.read().strip()
        return out

    def states(self):
        return {pid: proc_state(pid) for pid in self.pids}

    def wait_gone(self, timeout=10):
        """Reap what is ours and wait until no pid of the tree is in /proc; True on success."""
        deadline = time.monotonic() + timeout
        while True:
            left = [pid for pid in sorted(self.known) if not reap(pid)]
            if not left:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def kill_tree(self):
        """SIGKILL every process of the tree (live walk plus every pid seen), then reap."""
        for _ in range(3):
            live = tree_pids(self.root) if proc_state(self.root) not in (None, "Z") else []
            self.known.update(live)
            for pid in sorted(self.known):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.wait_gone(timeout=10)


def start_workload(pattern, mib, tmpdir, no_aslr=False, env=None, timeout=30):
    """Start cowload PATTERN MIB OUTDIR with stdio on /dev/null; wait until it is ready.

    ``tmpdir``: a directory for OUTDIR (a fresh subdirectory is made in it).
    ``no_aslr``: run under personality(ADDR_NO_RANDOMIZE) (setarch -R), for golden files.
    The tree runs in a session of its own, in cwd /, with a fixed small environment.
    """
    binary = build()
    outdir = tempfile.mkdtemp(prefix="cowload-", dir=str(tmpdir))
    argv = [binary, pattern, str(mib), outdir]
    if no_aslr:
        argv = ["setarch", os.uname().machine, "-R"] + argv
    become_subreaper()
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, cwd="/",
        start_new_session=True,  # its own session: pgid = sid = root
        env=env if env is not None else {"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )
    wl = Workload(pattern, mib, outdir, popen)
    try:
        return wl.wait_ready(timeout)
    except BaseException:
        wl.kill_tree()
        raise


@pytest.fixture
def workload(tmp_path):
    """A factory: workload(pattern, mib=4, no_aslr=False, fixed_path=False) -> a ready Workload;
    every process of every tree it started is killed at teardown."""
    started = []

    def start(pattern, mib=4, no_aslr=False, fixed_path=False, **kw):
        # fixed_path: OUTDIR of a fixed length (/tmp/cowload-XXXXXXXX), so argv and with it the
        # stack layout do not depend on the test's name: for golden files
        parent = tempfile.gettempdir() if fixed_path else tmp_path
        wl = start_workload(pattern, mib, parent, no_aslr=no_aslr, **kw)
        wl.remove_outdir = fixed_path
        started.append(wl)
        return wl

    yield start
    for wl in started:
        wl.kill_tree()
        if wl.remove_outdir:
            shutil.rmtree(wl.outdir, ignore_errors=True)
