"""What cow-collect refuses: by name, exit code 2, nothing written, the tree running on."""

import os
import subprocess
import sys
import time

import pytest

from tests.support.workloads import RUNNING_STATES, become_subreaper, proc_state, reap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECT = [sys.executable, "-m", "stages.collect.cli"]


@pytest.fixture
def spawn():
    """Start a python3 program (stdio /dev/null unless told); killed at teardown."""
    procs = []

    def start(code, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen([sys.executable, "-c", code], close_fds=True, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def wait_for(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def refused(pid, out):
    res = subprocess.run(COLLECT + ["--tree", str(pid), "-o", str(out)], capture_output=True, timeout=60, cwd=ROOT)
    return res.returncode, res.stderr.decode()


def on_tmpfs(path):
    from stages.linux.memstat import TMPFS_MAGIC, fs_type
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return fs_type(fd) == TMPFS_MAGIC
    finally:
        os.close(fd)


def still_running(pid):
    with open(f"/proc/{pid}/status", errors="surrogateescape") as f:  # its Name need not be UTF-8
        status = dict(line.split(":", 1) for line in f)
    return status["TracerPid"].strip() == "0" and proc_state(pid) in RUNNING_STATES


def test_tcp_socket_is_refused(spawn, tmp_path):
    ready = tmp_path / "ready"
    p = spawn(
        "import socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        f"open({str(ready)!r}, 'w').write(str(s.fileno()))\n"
        "time.sleep(600)\n"
    )
    wait_for(ready)
    time.sleep(0.05)
    fd = int(ready.read_text())
    out = tmp_path / "x.cow"
    code, err = refused(p.pid, out)
    assert code == 2
    assert f"cow-collect: process {p.pid}: fd {fd} is a TCP socket: not supported" in err.splitlines()
    assert not out.exists()
    assert still_running(p.pid)


def test_pipe_in_a_child_is_refused(spawn, tmp_path):
    # the child's stdout is a pipe whose read end the test holds: outside the tree
    # (pipes between processes of the tree are dumped: tests/test_state_pipes.py)
    become_subreaper()  # so that we can reap the child once its parent is gone
    ready = tmp_path / "ready"
    p = spawn(
        "import subprocess, time\n"
        "c = subprocess.Popen(['sleep', '600'], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"open({str(ready)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(600)\n",
        stdout=subprocess.PIPE,
    )
    wait_for(ready)
    time.sleep(0.05)
    child = int(ready.read_text())
    try:
        code, err = refused(p.pid, tmp_path / "x.cow")
        assert code == 2
        outside = f"fd 1 is a pipe shared with a process outside the tree (process {os.getpid()}): not supported"
        assert f"cow-collect: process {child}: {outside}" in err.splitlines(), err
        assert still_running(p.pid) and still_running(child)
    finally:
        os.kill(child, 9)
        p.kill()
        p.wait(timeout=10)
        p.stdout.close()
        deadline = time.monotonic() + 10
        while not reap(child):  # re-parented to us when p died
            assert time.monotonic() < deadline, f"child {child} not reaped"
            time.sleep(0.01)


def test_unix_socket_of_a_threaded_process_is_refused(spawn, tmp_path):
    ready = tmp_path / "ready"
    p = spawn(
        "import socket, threading, time\n"
        "a, b = socket.socketpair()\n"
        "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
        f"open({str(ready)!r}, 'w').write(str(a.fileno()))\n"
        "time.sleep(600)\n"
    )
    wait_for(ready)
    time.sleep(0.05)
    fd = int(ready.read_text())
    code, err = refused(p.pid, tmp_path / "x.cow")
    lines = err.splitlines()
    assert code == 2
    assert not any("thread" in line for line in lines), lines  # threads are dumped now
    assert f"cow-collect: process {p.pid}: fd {fd} is a UNIX socket: not supported" in lines
    assert still_running(p.pid)


def test_private_memfd_mapping_and_sealed_memfd_are_refused(spawn, tmp_path):
    # shared anonymous memory and MAP_SHARED memfds are restored (tests/test_shmem.py);
    # a private mapping of a memfd and a sealed memfd are not
    ready = tmp_path / "ready"
    p = spawn(
        "import fcntl, mmap, os, time\n"
        "a = os.memfd_create('priv'); os.ftruncate(a, 8192)\n"
        "m = mmap.mmap(a, 8192, flags=mmap.MAP_PRIVATE); m[0] = 1\n"
        "b = os.memfd_create('sealed', os.MFD_ALLOW_SEALING); os.ftruncate(b, 4096)\n"
        "fcntl.fcntl(b, 1033, 4)\n"  # F_ADD_SEALS, F_SEAL_GROW
        "s = mmap.mmap(-1, 8192, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS); s[0] = 1\n"
        "h = os.memfd_create('huge', os.MFD_HUGETLB)\n"
        f"d = os.open({str(tmp_path / 'gone')!r}, os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(d, 4096)\n"
        "g = mmap.mmap(d, 4096, flags=mmap.MAP_SHARED); g[0] = 1; os.close(d)\n"
        f"os.unlink({str(tmp_path / 'gone')!r})\n"
        f"open({str(ready)!r}, 'w').write(f'{{b}} {{h}}')\n"
        "time.sleep(600)\n"
    )
    wait_for(ready)
    time.sleep(0.05)
    sealed, huge = map(int, ready.read_text().split())
    code, err = refused(p.pid, tmp_path / "x.cow")
    lines = err.splitlines()
    assert code == 2
    assert any(line.startswith(f"cow-collect: process {p.pid}: private mapping of a memfd at 0x")
               and "(/memfd:priv (deleted)): not supported" in line for line in lines), lines
    assert f"cow-collect: process {p.pid}: fd {sealed}: a sealed memfd (seals 0x4): not supported" in lines
    assert f"cow-collect: process {p.pid}: fd {huge}: shared memory not on shmem (hugetlbfs?): not supported" in lines
    if not on_tmpfs(tmp_path):  # a deleted tmpfs file would be restored (tests/test_shmem.py)
        assert any(line.startswith(f"cow-collect: process {p.pid}: shared memory at 0x") and
                   line.endswith(f": MAP_SHARED mapping of a deleted file not on tmpfs ({tmp_path / 'gone'}): "
                                 "not supported") for line in lines), lines
    assert not any("/dev/zero" in line or "shared anonymous" in line for line in lines), lines
    assert still_running(p.pid)


def test_shared_memory_held_outside_the_tree_is_refused(spawn, tmp_path):
    # the child is dumped alone: its parent, outside the tree, maps the same shared region
    ready = tmp_path / "ready"
    p = spawn(
        "import ctypes, mmap, os, time\n"
        "s = mmap.mmap(-1, 8192, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS); s[0] = 1\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ctypes.CDLL(None).prctl(1, 9)\n"  # PR_SET_PDEATHSIG SIGKILL: gone with the test's process
        "    time.sleep(600)\n"
        f"open({str(ready)!r}, 'w').write(str(pid))\n"
        "time.sleep(600)\n"
    )
    wait_for(ready)
    time.sleep(0.05)
    child = int(ready.read_text())
    code, err = refused(child, tmp_path / "x.cow")
    lines = err.splitlines()
    assert code == 2
    assert any(line.startswith(f"cow-collect: process {child}: shared memory at 0x") and
               line.endswith(f": shared memory also held by process {p.pid} outside the tree: not supported")
               for line in lines), lines
    assert still_running(child)


def test_epoll_eventfd_and_sysv_shm_are_refused(spawn, tmp_path):
    ready = tmp_path / "ready"
    p = spawn(
        "import ctypes, os, select, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "shmid = libc.shmget(0, 8192, 0o1600)\n"  # IPC_PRIVATE, IPC_CREAT | 0600
        "assert shmid >= 0\n"
        "assert libc.shmat(shmid, None, 0) not in (None, ctypes.c_void_p(-1).value)\n"
        "libc.shmctl(shmid, 0, None)\n"  # IPC_RMID: gone once detached
        "ep = select.epoll(); ev = os.eventfd(0)\n"
        f"open({str(ready)!r}, 'w').write(f'{{ep.fileno()}} {{ev}}')\n"
        "time.sleep(600)\n"
    )
    wait_for(ready)
    time.sleep(0.05)
    ep, ev = map(int, ready.read_text().split())
    code, err = refused(p.pid, tmp_path / "x.cow")
    lines = err.splitlines()
    assert code == 2
    assert f"cow-collect: process {p.pid}: fd {ep} is an epoll instance: not supported" in lines
    assert f"cow-collect: process {p.pid}: fd {ev} is an eventfd: not supported" in lines
    assert any(line.startswith(f"cow-collect: process {p.pid}: SysV shared memory attachment at 0x") for line in lines), lines
    assert still_running(p.pid)


def test_leases_terminals_deleted_and_chroot_are_refused(spawn, tmp_path):
    """Everything of issue 5 not restored yet is refused by name, one line each."""
    ready = tmp_path / "ready"
    gone, dead, jail = tmp_path / "gone", tmp_path / "dead", tmp_path / "jail"
    jail.mkdir()
    p = spawn(
        "import fcntl, os, time\n"
        f"open({str(tmp_path / 'a')!r}, 'w').close(); a = open({str(tmp_path / 'a')!r})\n"
        "fcntl.fcntl(a, fcntl.F_SETLEASE, fcntl.F_RDLCK)\n"
        "m, s = os.openpty()\n"
        f"os.mkdir({str(gone)!r}); d = os.open({str(gone)!r}, os.O_RDONLY | os.O_DIRECTORY); os.rmdir({str(gone)!r})\n"
        f"x = os.open({str(dead)!r}, os.O_RDWR | os.O_CREAT); os.unlink({str(dead)!r})\n"
        f"open({str(ready)!r}, 'w').write(' '.join(map(str, (a.fileno(), m, s, d, x))))\n"
        f"os.chroot({str(jail)!r})\n"
        "time.sleep(600)\n"
    )
    wait_for(ready)
    time.sleep(0.2)
    a, m, s, d, x = map(int, ready.read_text().split())
    out = tmp_path / "x.cow"
    code, err = refused(p.pid, out)
    assert code == 2, err
    lines = set(err.splitlines())
    pts = os.readlink(f"/proc/{p.pid}/fd/{s}")
    for text in (
        f"fd {a} holds a lease read lock on {tmp_path / 'a'}",  # flock, POSIX, OFD: tests/test_state_locks.py
        f"fd {m} is a pseudo-terminal master (/dev/ptmx), not cow-collect's terminal",
        f"fd {s} is a pseudo-terminal ({pts}), not cow-collect's terminal",
        f"fd {d} is a deleted directory ({gone} (deleted))",
        f"fd {x} is a deleted file ({dead} (deleted))",
        f"has a changed root directory ({jail})",
    ):
        assert f"cow-collect: process {p.pid}: {text}: not supported" in lines, (text, err)
    assert not out.exists()
    assert still_running(p.pid)


def test_a_file_name_that_is_not_utf8_is_refused(spawn, tmp_path):
    # streams hold paths as UTF-8 strings: such a name was a UnicodeEncodeError traceback
    ready = tmp_path / "ready"
    odd = os.fsencode(tmp_path) + b"/odd-\xff\xfe"
    odd_dir = os.fsencode(tmp_path) + b"/dir-\xff"
    os.mkdir(odd_dir)
    p = spawn(
        "import ctypes, mmap, os, time\n"
        f"f = open({odd!r}, 'w+b'); f.write(bytes(8192)); f.flush()\n"
        "m = mmap.mmap(f.fileno(), 8192, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)\n"
        f"os.chdir({odd_dir!r})\n"
        "ctypes.CDLL(None).prctl(15, b'name-\\xfe', 0, 0, 0)  # PR_SET_NAME\n"
        f"open({str(ready)!r}, 'w').write('x')\n"
        "time.sleep(600)\n"
    )
    wait_for(ready)
    out = tmp_path / "images.cow"
    code, err = refused(p.pid, out)
    assert code == 2, err
    shown = repr(odd)
    assert f"fd 3 is a file whose name is not UTF-8 ({shown})" in err, err
    assert f"of a file whose name is not UTF-8 ({shown})" in err, err
    assert f"its working directory's name is not UTF-8 ({odd_dir!r})" in err, err
    assert f"thread {p.pid}'s name (comm) is not UTF-8 (b'name-\\xfe')" in err, err
    assert not out.exists() and still_running(p.pid)
