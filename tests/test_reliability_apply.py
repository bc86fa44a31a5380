"""Issue #8: faults during apply.  Files of file mappings gone or changed since the plan, a
pid of a non-root process taken, cow-apply killed (SIGTERM, SIGKILL) in the middle of a
restore.  Every task cow-apply creates is counted in a pids cgroup of its own, so a process
it leaked is seen wherever it was re-parented."""

import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.support.commands import TIMEOUT, tool
from tests.support.commands import run as run_command
from tests.support.workloads import (  # noqa: F401 (workload: fixture)
    become_subreaper, build, children_of, proc_state, reap, workload)
from tests.test_reliability_streams import PIDS_CGROUP, run_counted


def run(argv, data=None):
    return run_command(argv, data).stdout


class Cgroup:
    """A pids cgroup to run cow-apply in; ``close()`` kills whatever is left and removes it."""

    def __init__(self):
        become_subreaper()  # what cow-apply leaves comes to us, to be reaped
        self.path = os.path.join(PIDS_CGROUP, f"cowtree-apply-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)
        self.seen = set()

    def read(self, name):
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def procs(self):
        pids = [int(x) for x in self.read("cgroup.procs").split()]
        self.seen.update(pids)
        return pids

    def current(self):
        return int(self.read("pids.current"))

    def popen(self, argv, **kw):
        wrapper = ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]
        return subprocess.Popen(wrapper, **kw)

    def left_after(self, timeout):
        """Tasks still in the cgroup once `timeout` seconds passed without it emptying."""
        deadline = time.monotonic() + timeout
        while self.procs() and time.monotonic() < deadline:
            for pid in self.procs():  # reap what was re-parented to us
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            time.sleep(0.01)
        return self.procs()

    def close(self):
        deadline = time.monotonic() + 10
        while True:
            for pid in self.procs():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if not self.procs():
                break
            assert time.monotonic() < deadline, f"cannot kill {self.procs()}"
            time.sleep(0.01)
        # dead tasks leave the cgroup before they are reaped: reap every one we saw, so no
        # zombie keeps a pid that the next test restores
        while not all(reap(pid) for pid in self.seen) and time.monotonic() < deadline:
            time.sleep(0.01)
        reap_zombie_children()
        os.rmdir(self.path)


def reap_zombie_children():
    """Reap every zombie child of ours (as subreaper we get the orphans cow-apply left)."""
    for pid in children_of(os.getpid()):
        if proc_state(pid) == "Z":
            reap(pid)


@pytest.fixture
def cgroup():
    cg = Cgroup()
    yield cg
    cg.close()


def images_of_copied_binary(workload_dir, pattern="same", mib=1):
    """A cowload tree run from a private copy of the binary (the file the test then breaks);
    its images; the tree is killed by collect."""
    become_subreaper()  # the killed tree's children come back to us to be reaped
    binary = os.path.join(workload_dir, "cowload-copy")
    shutil.copy(build(), binary)
    outdir = os.path.join(workload_dir, "out")
    os.mkdir(outdir)
    proc = subprocess.Popen([binary, pattern, str(mib), outdir], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(outdir, "ready")):
            assert proc.poll() is None and time.monotonic() < deadline, "workload did not start"
            time.sleep(0.01)
        with open(os.path.join(outdir, "ready")) as f:
            pids = [int(x) for x in f.read().split()]
        images = run([tool("cow-collect"), "--tree", str(proc.pid), "--kill"])
    finally:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not all(reap(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return binary, pids, images


def test_file_of_a_mapping_missing_after_the_plan(tmp_path):
    binary, pids, images = images_of_copied_binary(str(tmp_path))
    plan = run([tool("cow-plan")], images)
    os.unlink(binary)
    res = run_counted([tool("cow-apply")], plan)
    assert res.returncode == 1 and binary in res.err and "No such file" in res.err, res.err
    assert res.peak == 1, "cow-apply created a process before refusing"


def test_file_of_a_mapping_replaced_after_the_plan(tmp_path):
    binary, pids, images = images_of_copied_binary(str(tmp_path))
    plan = run([tool("cow-plan")], images)
    # same bytes, another inode: the new file exists before the old one goes, or the
    # filesystem may hand the freed inode number straight back
    shutil.copy(binary, binary + ".new")
    os.replace(binary + ".new", binary)
    res = run_counted([tool("cow-apply")], plan)
    assert res.returncode == 1 and binary in res.err and "different file" in res.err, res.err
    assert res.peak == 1


def test_file_of_a_mapping_truncated_after_the_plan(tmp_path, cgroup):
    binary, pids, images = images_of_copied_binary(str(tmp_path))
    plan = run([tool("cow-plan")], images)
    os.truncate(binary, os.path.getsize(binary) - 4096)  # same inode, a page shorter
    proc = cgroup.popen([tool("cow-apply")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    out, err = proc.communicate(plan, timeout=TIMEOUT)
    # (a restored tree, if any, is killed by the cgroup fixture)
    assert proc.returncode == 1 and b"changed size" in err, err


def test_file_of_a_mapping_rewritten_in_place_after_the_plan(tmp_path, cgroup):
    binary, pids, images = images_of_copied_binary(str(tmp_path))
    plan = run([tool("cow-plan")], images)
    size = os.path.getsize(binary)
    with open(binary, "r+b") as f:  # same inode, same size, other bytes (the ELF's tail)
        f.seek(size - 64)
        f.write(b"\xff" * 64)
    proc = cgroup.popen([tool("cow-apply")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    out, err = proc.communicate(plan, timeout=TIMEOUT)
    # (a restored tree, if any, is killed by the cgroup fixture)
    assert proc.returncode == 1 and b"changed" in err, err


def take_pid(pid):
    """A sleeping process with exactly this pid (ns_last_pid + fork, retried), or None."""
    for _ in range(50):
        if os.path.exists(f"/proc/{pid}"):
            return None
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def test_pid_of_a_non_root_process_taken(workload):
    wl = workload("chain", 1)
    images = run([tool("cow-collect"), "--tree", str(wl.root), "--kill"])
    assert wl.wait_gone(10)
    plan = run([tool("cow-plan")], images)
    victim = wl.pids[-1]  # a grandchild: the root's pid is free
    squatter = take_pid(victim)
    assert squatter is not None, f"could not take pid {victim}"
    try:
        res = run_counted([tool("cow-apply")], plan)
        assert res.returncode == 1, res.err
        assert res.err.startswith("cow-apply: ") and str(victim) in res.err and "--pidns" in res.err, res.err
        assert res.peak == 1, "cow-apply created a process before refusing"
        assert all(not os.path.exists(f"/proc/{p}") for p in wl.pids if p != victim)
        assert proc_state(victim) == "S"  # the squatter is untouched
    finally:
        squatter.kill()
        squatter.wait(timeout=10)


def start_apply(cgroup, plan_path, *flags):
    return cgroup.popen([tool("cow-apply"), "-i", str(plan_path), *flags], stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_tasks(cgroup, proc, n, timeout=30):
    """Poll until cow-apply has created n - 1 tasks; False if it finished first."""
    deadline = time.monotonic() + timeout
    while cgroup.current() < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


@pytest.fixture(scope="module")
def big_plan(tmp_path_factory):
    """A 4-process tree sharing 128 MiB: filling it takes long enough to interrupt."""
    from tests.support.workloads import start_workload

    tmp = tmp_path_factory.mktemp("big")
    wl = start_workload("same", 128, str(tmp))
    try:
        images = run([tool("cow-collect"), "--tree", str(wl.root), "--kill"])
        assert wl.wait_gone(10)
    finally:
        wl.kill_tree()
    path = tmp / "same.plan"
    path.write_bytes(run([tool("cow-plan")], images))
    return path, wl.pids


# when: after the root agent / after the 3rd process exists; SIGINT is Ctrl-C, which must not
# surface as a KeyboardInterrupt that skips the killing of the partial tree
@pytest.mark.parametrize("when, sig", [(2, signal.SIGTERM), (4, signal.SIGTERM), (2, signal.SIGINT)],
                         ids=["2-term", "4-term", "2-int"])
@pytest.mark.parametrize("flags", [(), ("--pidns",)], ids=["host", "pidns"])
def test_signal_mid_restore_leaves_nothing(big_plan, cgroup, when, sig, flags):
    path, pids = big_plan
    proc = start_apply(cgroup, path, *flags)
    try:
        started = wait_for_tasks(cgroup, proc, when + (1 if flags else 0))
        assert started, f"cow-apply finished before {when - 1} processes existed: {proc.communicate()}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode(errors="replace")
    if proc.returncode == 0:  # the signal came after the last check: the tree is complete, not half
        pytest.fail(f"cow-apply finished despite signal {sig}: {err}")
    assert proc.returncode == 1 and f"terminated by signal {int(sig)}" in err, (proc.returncode, err)
    assert cgroup.left_after(5) == [], f"processes left after signal {sig}"
    deadline = time.monotonic() + 5
    while not all(reap(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(reap(p) for p in pids if not flags), {p: proc_state(p) for p in pids}


def traced(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("TracerPid:")).split()[1]) != 0
    except (OSError, StopIteration):
        return None


def exe(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def stop_apply_when(cgroup, proc, want_untraced, timeout=30):
    """SIGSTOP cow-apply at a moment when it has created an agent and (want_untraced) one of
    its agents is not traced yet, or (not want_untraced) every agent is traced.  The
    condition is checked again once cow-apply is stopped, so it holds when it is killed.
    An untraced process counts only while it is an agent still (cow-apply's executable): a
    restored process that was let go is untraced too, and rightly outlives cow-apply."""
    deadline = time.monotonic() + timeout

    def holds():
        agents = [p for p in cgroup.procs() if p != proc.pid]
        own = exe(proc.pid)  # read now: proc starts as the shell that puts it in the cgroup
        untraced = any(traced(p) is False and exe(p) == own for p in agents)
        if agents and (untraced if want_untraced else False not in [traced(p) for p in agents]):
            return agents
        return None

    def stopped_and_holds():
        os.kill(proc.pid, signal.SIGSTOP)
        while proc_state(proc.pid) not in ("T", None):
            time.sleep(0.0002)
        agents = holds()
        if not agents:
            os.kill(proc.pid, signal.SIGCONT)
        return agents

    known = {proc.pid}
    while time.monotonic() < deadline and proc.poll() is None:
        if want_untraced:
            # an agent is untraced from its fork to cow-apply's seize, a fraction of a
            # millisecond: stop cow-apply as soon as a new process shows, check after
            new = set(cgroup.procs()) - known
            if new:
                known |= new
                agents = stopped_and_holds()
                if agents:
                    return agents
        elif holds():
            agents = stopped_and_holds()
            if agents:
                return agents
    return None


@pytest.mark.parametrize("untraced", [False, True], ids=["all-traced", "one-untraced"])
@pytest.mark.parametrize("flags", [(), ("--pidns",)], ids=["host", "pidns"])
def test_sigkill_mid_restore_kills_every_agent(big_plan, cgroup, flags, untraced):
    """cow-apply cannot clean up after SIGKILL: its agents must die by themselves.  Those it
    has seized do: PTRACE_O_EXITKILL (with --pidns, pid 1 dying also ends the namespace).
    One it has not seized yet (just cloned) does too: its parent death signal is SIGKILL."""
    path, pids = big_plan
    for attempt in range(20):  # an untraced agent lives a moment only (fork to seize): try again
        proc = start_apply(cgroup, path, *flags)
        agents = stop_apply_when(cgroup, proc, want_untraced=untraced)
        if agents:
            break
        proc.communicate(timeout=TIMEOUT)  # it restored the whole tree first: kill it, again
        for pid in cgroup.procs():
            os.kill(pid, signal.SIGKILL)
        assert cgroup.left_after(10) == []
    try:
        assert agents, f"no moment with {'an untraced' if untraced else 'every'} agent in {attempt + 1} restores"
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = cgroup.left_after(5)
    assert left == [], {p: proc_state(p) for p in left}


# -- security -------------------------------------------------------------------------------

def test_image_and_plan_files_are_0600_even_over_an_open_file(tmp_path):
    """cow-collect -o and cow-plan -o: 0600 whatever the umask, also when the file existed
    world-readable before (O_CREAT alone would keep its mode)."""
    orig = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
    images, plan = tmp_path / "images.cow", tmp_path / "plan.cow"
    for f in (images, plan):
        f.write_bytes(b"old")
        os.chmod(f, 0o666)
    old_umask = os.umask(0)
    try:
        time.sleep(0.2)
        run([tool("cow-collect"), "--tree", str(orig.pid), "-o", str(images)])
        run([tool("cow-plan"), "-i", str(images), "-o", str(plan)])
    finally:
        os.umask(old_umask)
        orig.kill()
        orig.wait(timeout=10)
    for f in (images, plan):
        assert oct(os.stat(f).st_mode & 0o777) == "0o600", f


def test_collect_refuses_a_tree_it_cannot_ptrace(tmp_path):
    """A caller without CAP_SYS_PTRACE cannot ptrace another user's process: refused by
    name, no output file, the process runs on.  (The caller stays uid 0 without that one
    capability, so it can run cowtree from a checkout only root may read.)"""
    orig = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "1000"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
    out = tmp_path / "unprivileged.cow"
    try:
        time.sleep(0.2)
        proc = subprocess.run(["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace",
                               tool("cow-collect"), "--tree", str(orig.pid), "-o", str(out)],
                              capture_output=True, timeout=TIMEOUT)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and f"process {orig.pid}" in err and "cannot attach" in err, err
        assert not out.exists()
        time.sleep(0.1)
        assert proc_state(orig.pid) == "S"
    finally:
        orig.kill()
        orig.wait(timeout=10)
