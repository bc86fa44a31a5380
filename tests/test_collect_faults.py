"""cow-collect when things go wrong: processes that exit or fork while frozen, a reader that
goes away, a full disk, a tree someone else traces, bad pids.  Whatever happens, the tree
runs on (not traced, not stopped) and no partial image file is left behind."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from stages.stream import StreamError, StreamReader
from tests.support.images import Images
from tests.support.workloads import (RUNNING_STATES, become_subreaper, proc_state, traced_by_another, tree_pids,
                                     workload)  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECT = [sys.executable, "-m", "stages.collect.cli"]


def collect(root, *args, out=None, timeout=60):
    argv = COLLECT + ["--tree", str(root)] + (["-o", str(out)] if out else []) + list(args)
    return subprocess.run(argv, capture_output=True, timeout=timeout, cwd=ROOT)


def status_field(pid, name):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None


def tracer(pid):
    value = status_field(pid, "TracerPid")
    return None if value is None else int(value)


def wait_until(cond, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def assert_running_untraced(pids):
    for pid in pids:
        assert tracer(pid) == 0, f"process {pid} is still traced"
        assert proc_state(pid) in RUNNING_STATES, f"process {pid} is {proc_state(pid)}"


@pytest.fixture
def pytree():
    """Start a python3 program in a session of its own; at teardown every process of its
    tree (and its session) is killed and reaped, pass or fail."""
    started = []
    become_subreaper()  # orphans come to us, so we can reap them

    def start(code):
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             close_fds=True, start_new_session=True)
        started.append(p)
        return p

    yield start
    for p in started:
        # every process it forked is in its session (start_new_session): kill by session until
        # none is left, so a child forked during the kill cannot escape
        deadline = time.monotonic() + 10
        while True:
            members = session_pids(p.pid)
            if not members:
                break
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:  # the killed ones come to us (subreaper): reap them
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            assert time.monotonic() < deadline, f"processes of session {p.pid} not reaped: {members}"
            time.sleep(0.001)


def session_pids(sid):
    """Every process (zombies included) whose session id is sid."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                out.append(int(name))
    return out


# -- processes that exit or fork while the tree is frozen -----------------------------

def test_child_killed_while_frozen(workload, tmp_path):
    """A frozen child dies (SIGKILL works on a traced, stopped process): collect fails naming
    it (or refuses the zombie it left), or finishes if it had read it already; the rest of
    the tree runs on."""
    wl = workload("same", mib=64)
    victim = max(wl.pids)
    out = tmp_path / "images.cow"
    proc = subprocess.Popen(COLLECT + ["--tree", str(wl.root), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        wait_until(lambda: tracer(victim) == proc.pid, what="cow-collect to seize the victim")
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode in (0, 1, 2), err
    if proc.returncode == 1:  # it died after it was frozen
        assert f"process {victim}: exited while the tree was frozen" in err, err
    elif proc.returncode == 2:  # it died while being frozen: its parent has not reaped it
        assert f"process {victim}: is a zombie" in err, err
    if proc.returncode:
        assert "Traceback" not in err and not out.exists()
    else:
        assert victim in Images(out).pids  # read completely before it died
    survivors = [pid for pid in wl.pids if pid != victim]
    assert_running_untraced(survivors)
    wl.pids = survivors
    assert all(v.startswith("ok ") for v in wl.check().values())
    # its parent has not reaped it: a second collect refuses the zombie by name
    res = collect(wl.root, out=tmp_path / "again.cow")
    assert res.returncode == 2, res.stderr.decode()
    assert f"process {victim}: is a zombie" in res.stderr.decode()
    assert not (tmp_path / "again.cow").exists()
    assert_running_untraced(survivors)


def test_root_killed_while_its_pages_are_read(workload):
    """The root dies while its pages stream out: the failed read is blamed on its death.
    The stream goes to a pipe that we stop reading, so that the kill lands while most of
    the root's pages (the first 64 MiB of the stream) are still to be read."""
    wl = workload("same", mib=64)
    proc = subprocess.Popen(COLLECT + ["--tree", str(wl.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        got = proc.stdout.read(4 << 20)  # 4 MiB of the stream: the pages are being written
        assert len(got) == 4 << 20
        os.kill(wl.root, signal.SIGKILL)
        rest = proc.stdout.read()  # the same buffered reader: communicate() would skip what it holds
        err = proc.stderr.read()  # a few lines: cannot fill its pipe while stdout is drained
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 1, err
    assert f"process {wl.root}: exited while the tree was frozen" in err and "Traceback" not in err, err
    with pytest.raises(StreamError, match="truncated"):  # no trailer: the stream says it is incomplete
        StreamReader(io.BytesIO(got + rest)).records()
    survivors = [pid for pid in wl.pids if pid != wl.root]
    assert_running_untraced(survivors)
    wl.pids = survivors
    assert all(v.startswith("ok ") for v in wl.check().values())


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGINT)],
                         ids=["term", "int", "term-then-int"])
def test_signal_while_pages_come_through_the_pager(workload, signals):
    """cow-collect stopped by SIGTERM or Ctrl-C while the root's pages stream out of its
    pager: the tree runs on exactly as before (no mapping, pipe or register of the pager
    left), also when a second signal comes while it is letting the tree go."""
    wl = workload("same", mib=64)

    def looks(pid):
        with open(f"/proc/{pid}/maps") as f:
            return f.read(), sorted(os.listdir(f"/proc/{pid}/fd"))

    before = {pid: looks(pid) for pid in wl.pids}
    proc = subprocess.Popen(COLLECT + ["--tree", str(wl.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert len(proc.stdout.read(4 << 20)) == 4 << 20  # the pages are being written
        with open(f"/proc/{wl.root}/maps") as f:
            assert "rwxp" in f.read()  # the pager's mapping, while it runs
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.002)  # the second one while the first is being handled
        proc.stdout.read()
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    expected = f"terminated by signal {int(signals[0])}; the tree was resumed"
    assert proc.returncode == 1 and expected in err and "Traceback" not in err, err
    assert_running_untraced(wl.pids)
    assert {pid: looks(pid) for pid in wl.pids} == before
    assert all(v.startswith("ok ") for v in wl.check().values())


def test_sigkill_while_pages_come_through_the_pager(workload):
    """cow-collect killed by SIGKILL (it cannot clean up) while the root runs its pager: the
    kernel detaches the tree, the pager sees its watch pipe close and puts the root's mask
    and registers back itself.  The tree runs on, every checksum right; only the pager's
    mapping stays in the root."""
    wl = workload("same", mib=64)

    def syscall_nr(pid):
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0]

    waiting_in = syscall_nr(wl.root)  # cowload waits for requests in a system call
    proc = subprocess.Popen(COLLECT + ["--tree", str(wl.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert len(proc.stdout.read(4 << 20)) == 4 << 20  # the pages are being written
        with open(f"/proc/{wl.root}/maps") as f:
            assert "rwxp" in f.read()  # the pager runs
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    deadline = time.monotonic() + 10
    while any(tracer(pid) or proc_state(pid) not in RUNNING_STATES for pid in wl.pids):
        assert time.monotonic() < deadline, {pid: (tracer(pid), proc_state(pid)) for pid in wl.pids}
        time.sleep(0.05)
    assert syscall_nr(wl.root) == waiting_in  # restarted, as the kernel would have
    assert all(v.startswith("ok ") for v in wl.check().values())


CHURN = (
    # children that live a few ms and exit, forever: some exit while being frozen
    "import os, time\n"
    "while True:\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        time.sleep(0.002)\n"
    "        os._exit(0)\n"
    "    os.waitpid(pid, 0)\n"
)


def test_processes_exiting_while_frozen(pytree, tmp_path):
    p = pytree(CHURN)
    time.sleep(0.2)
    results = []
    for i in range(12):
        out = tmp_path / f"{i}.cow"
        res = collect(p.pid, out=out)
        err = res.stderr.decode()
        # done, or refused because a child had exited and was not reaped yet: never a crash
        assert res.returncode in (0, 2), err
        assert "Traceback" not in err
        if res.returncode == 2:
            assert "is a zombie" in err and not out.exists()
        else:
            assert Images(out).pids[0] == p.pid
        results.append(res.returncode)
        assert tracer(p.pid) == 0 and proc_state(p.pid) in RUNNING_STATES
    assert 0 in results  # the churn does not make collect impossible
    assert p.poll() is None


FORKER = (
    # keeps adding long-lived children (and grandchildren) while we freeze it
    "import os, signal, time\n"
    "for i in range(90):\n"
    "    if os.fork() == 0:\n"
    "        if i % 3 == 0 and os.fork() == 0:\n"
    "            signal.pause()\n"
    "        signal.pause()\n"
    "    time.sleep(0.01)\n"
    "signal.pause()\n"
)


def test_processes_forking_while_frozen(pytree, tmp_path):
    p = pytree(FORKER)
    time.sleep(0.1)
    grew = False
    for i in range(3):
        out = tmp_path / f"{i}.cow"
        res = collect(p.pid, out=out)
        assert res.returncode == 0, res.stderr.decode()
        img = Images(out)
        # a consistent tree: every process's parent is in the image, parents first
        seen = set()
        for rec in img.processes:
            assert rec["pid"] == p.pid or rec["ppid"] in seen, (rec["pid"], rec["ppid"])
            seen.add(rec["pid"])
        live = set(tree_pids(p.pid))
        assert seen <= live  # nobody exits here: every dumped process still exists
        assert len(seen) > 1
        grew = grew or len(live) > len(seen)  # it went on forking right after the dump
        assert_running_untraced(live)
    assert grew, "the tree had stopped forking: this test froze a still tree"


# -- the output goes away -------------------------------------------------------------

def test_broken_pipe_mid_stream(workload):
    wl = workload("same", mib=32)
    proc = subprocess.Popen(COLLECT + ["--tree", str(wl.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        got = proc.stdout.read(4 << 20)  # 4 MiB of the stream: the pages are being written
        assert len(got) == 4 << 20
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert b"broken pipe" in err and b"Traceback" not in err
    assert_running_untraced(wl.pids)
    assert all(v.startswith("ok ") for v in wl.check().values())


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs, unmounted at teardown."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full(workload, tiny_fs):
    wl = workload("same", mib=4)
    out = tiny_fs / "images.cow"
    out.write_bytes(b"an earlier image")
    res = collect(wl.root, out=out)
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert "ENOSPC" in err and str(out) in err and "Traceback" not in err, err
    assert f"{out} was left as it was" in err, err
    # the partial image had no name; the earlier one is still there
    assert os.listdir(tiny_fs) == ["images.cow"] and out.read_bytes() == b"an earlier image"
    assert_running_untraced(wl.pids)
    assert all(v.startswith("ok ") for v in wl.check().values())


# -- trees we may not trace -----------------------------------------------------------

def test_already_traced_process_is_refused(workload, tmp_path):
    wl = workload("split", mib=1)
    victim = max(wl.pids)
    with traced_by_another(victim) as holder:
        assert tracer(victim) == holder.pid
        out = tmp_path / "images.cow"
        res = collect(wl.root, out=out)
        err = res.stderr.decode()
        assert res.returncode == 1, err
        assert f"process {victim}" in err and f"already traced by process {holder.pid}" in err, err
        assert "Traceback" not in err
        assert not out.exists()
        # the processes collect had frozen before it met the victim run on
        assert_running_untraced([pid for pid in wl.pids if pid != victim])
        assert tracer(victim) == holder.pid
    wait_until(lambda: tracer(victim) == 0, what="the victim's tracer to go")
    assert all(v.startswith("ok ") for v in wl.check().values())


# -- bad pids ---------------------------------------------------------------------------

@pytest.mark.parametrize("pid", ["0", "-1", "-4711"])
def test_pid_zero_or_negative_is_a_usage_error(pid, tmp_path):
    out = tmp_path / "x.cow"
    res = subprocess.run(COLLECT + ["--tree", pid, "-o", str(out)], capture_output=True, timeout=60, cwd=ROOT)
    assert res.returncode == 64, res.stderr.decode()
    assert f"bad pid {pid}" in res.stderr.decode()
    assert not out.exists()


@pytest.mark.parametrize("pid", ["4194303", "99999999", "12x"])
def test_pid_that_does_not_exist(pid, tmp_path):
    out = tmp_path / "x.cow"
    res = subprocess.run(COLLECT + ["--tree", pid, "-o", str(out)], capture_output=True, timeout=60, cwd=ROOT)
    err = res.stderr.decode()
    if pid == "12x":
        assert res.returncode == 64, err
    else:
        assert res.returncode == 1, err
        assert f"process {pid}: no such process" in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_thread_id_is_not_a_process(tmp_path):
    """/proc/TID exists for a non-main thread too; collect wants the process."""
    p = subprocess.Popen([sys.executable, "-c",
                          "import threading, signal, sys\n"
                          "t = threading.Thread(target=signal.pause, daemon=True); t.start()\n"
                          "print(t.native_id, flush=True)\n"
                          "signal.pause()\n"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        tid = int(p.stdout.readline())
        res = collect(tid, out=tmp_path / "x.cow")
        err = res.stderr.decode()
        assert res.returncode == 1, err
        assert f"process {tid}" in err and "Traceback" not in err, err
        assert tracer(p.pid) == 0 and not (tmp_path / "x.cow").exists()
    finally:
        p.kill()
        p.wait()


def test_tiny_fs_fixture_really_is_small(tiny_fs):
    # the disk-full test means nothing if the file system could hold the image
    with pytest.raises(OSError) as exc:
        with open(tiny_fs / "fill", "wb") as f:
            f.write(b"\0" * (2 << 20))
    assert exc.value.errno == 28
    os.unlink(tiny_fs / "fill")
