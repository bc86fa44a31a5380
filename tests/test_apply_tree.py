"""Tree creation on its own: native agents created with clone3 + set_tid, in a new pid namespace
and in the current one, driven over their pipes.  Every process is killed at teardown."""

import os
import signal

import pytest

from stages.apply import agent as A

SYS_GETPID, SYS_GETPPID, SYS_SETSID, SYS_GETSID = 39, 110, 112, 124
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20


@pytest.fixture
def spawned():
    """Record outer pids here; all are SIGKILLed and reaped at teardown."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def free_pid(start=20000):
    pid = start
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


def test_pidns_init_root_and_child_get_their_pids(spawned):
    init_ch, root_ch, kid_ch = A.Channel(), A.Channel(), A.Channel()
    try:
        init = A.spawn(init_ch, new_pidns=True)
        spawned.append(init)
        assert A.ns_pid_of(init) == 1
        ia = A.Agent(init, init_ch, 1)
        assert ia.fork(4242, root_ch) == 4242
        root = A.outer_pid_of(init, 4242)
        ra = A.Agent(root, root_ch, 4242)
        assert ra.syscall(SYS_GETPID) == 4242 and ra.syscall(SYS_GETPPID) == 1
        assert ra.fork(77, kid_ch) == 77
        kid = A.Agent(A.outer_pid_of(root, 77), kid_ch, 77)
        assert kid.syscall(SYS_GETPID) == 77 and kid.syscall(SYS_GETPPID) == 4242
        assert kid.syscall(SYS_SETSID) == 77 and kid.syscall(SYS_GETSID, 0) == 77
        # memory written from outside is what the agent sees, and a fork copies it
        addr = ra.mmap(0x500000000000, 8192, 3, MAP_PRIVATE | MAP_ANONYMOUS | 0x10)
        A.vm_write(root, addr, b"hello")
        assert A.vm_read(root, addr, 5) == b"hello"
        spare = A.Channel()
        try:
            with pytest.raises(A.AgentError):  # pid taken in that namespace
                ra.fork(77, spare)
        finally:
            spare.close()
        # pid 1 reaps; when the root exits, init exits with the root's status
        ia.reap(4242)
        os.kill(root, signal.SIGKILL)
        _, status = os.waitpid(init, 0)
        spawned.remove(init)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGKILL
        assert not os.path.exists(f"/proc/{kid.pid}")  # the namespace died with its init
    finally:
        for ch in (init_ch, root_ch, kid_ch):
            ch.close()


def test_set_tid_in_current_namespace(spawned):
    ch = A.Channel()
    try:
        want = free_pid()
        pid = A.spawn(ch, set_tid=want)
        spawned.append(pid)
        assert pid == want
        assert A.Agent(pid, ch).syscall(SYS_GETPID) == want
        spare = A.Channel()
        try:
            with pytest.raises(A.AgentError, match="clone3"):
                A.spawn(spare, set_tid=want)  # taken
        finally:
            spare.close()
    finally:
        ch.close()
