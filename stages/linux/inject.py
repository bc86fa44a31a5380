"""Code of ours run by a stopped tracee's thread, with pipes back to us (x86_64).

A remote system call (remote.py) costs a ptrace round trip, about 0.1-0.2 ms.  For
many calls in a row (cow-collect's pager, the process state's ~80 calls) the thread
runs a small loop instead, in a private mapping made for it, and tells us it is done
by closing its end of a pipe: we read end of file.  The loop then parks in pause();
every signal is blocked (RemoteSyscalls), so only our PTRACE_INTERRUPT ends that, and
the registers and mask are put back as after any remote call.

Running in user space, the thread returns from its system calls like any running
thread: the kernel may rewrite its rseq area's cpu fields (as at every resume),
nothing else changes in the process.
"""

import errno
import os
import select
import signal
import struct

from stages._native import lib

from . import ptrace
from .memory import ProcessMemory
from .remote import RemoteSyscalls, _wait_stop

SYS_MMAP, SYS_MUNMAP, SYS_CLOSE, SYS_PIPE2, SYS_PIDFD_GETFD = 9, 11, 3, 293, 438
PROT_RWX = 7  # the loops write their results and cursors next to their code
MAP_PRIVATE_ANON = 0x22
PAGE = 4096
U64 = (1 << 64) - 1
PIPE_FDS_AT = PAGE - 8  # where pipe2 stores the two fds: the end of the code page


class InjectError(OSError):
    pass


class Unavailable(Exception):
    """The process cannot run our code (no room for a mapping, no fd left, ...): nothing of
    it is left in the process; do it the slower way."""


def _fail(pid, what, res):
    raise Unavailable(f"process {pid}: {what}: {os.strerror(-res)}")


class InjectedCode:
    """``code`` (ending in the park loop at ``park``) mapped in thread pid with ``data_size``
    bytes after its page, and ``pipes`` pipes whose read ends we hold (``fds``; their numbers
    in the process: ``remote_read_fds``, which the code closes first, and ``write_fds``).

    open(), start(), poll(), stop() and close() must run in the tracer thread."""

    def __init__(self, pid, syscall_addr, code, park, data_size, pipes):
        self.pid, self.syscall_addr, self.code, self.park = pid, syscall_addr, code, park
        self.size = PAGE + -(-data_size // PAGE) * PAGE
        self.pipes = pipes
        self.rs = None
        self.own_rs = False  # the RemoteSyscalls is ours to close
        self.base = 0  # the mapping's address in the process; data at base + PAGE
        self.fds, self.remote_read_fds, self.write_fds = [], [], []
        self.running = False

    def open(self, rs=None):
        """Map the code, make the pipes, within ``rs`` (a RemoteSyscalls of the thread) or a
        session of our own.  Raises Unavailable (the process left as it was) when the
        process cannot have them."""
        self.rs, self.own_rs = (rs, False) if rs is not None else (RemoteSyscalls(self.pid, self.syscall_addr), True)
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self):
        rs = self.rs
        res = rs.call(SYS_MMAP, 0, self.size, PROT_RWX, MAP_PRIVATE_ANON, U64, 0)
        if res < 0:
            _fail(self.pid, "mmap", res)
        self.base = res
        pidfd = os.pidfd_open(self.pid)
        try:
            with ProcessMemory(self.pid, write=True) as mem:
                mem.write(self.base, self.code)
                for _ in range(self.pipes):
                    res = rs.call(SYS_PIPE2, self.base + PIPE_FDS_AT, os.O_CLOEXEC)
                    if res < 0:
                        _fail(self.pid, "pipe2", res)
                    read_fd, write_fd = struct.unpack("<ii", mem.read(self.base + PIPE_FDS_AT, 8))
                    self.remote_read_fds.append(read_fd)
                    self.write_fds.append(write_fd)
                    fd = lib.cow_syscall6(SYS_PIDFD_GETFD, pidfd, read_fd, 0, 0, 0, 0)
                    if fd < 0:
                        _fail(self.pid, "pidfd_getfd of a pipe", fd)
                    os.set_inheritable(fd, False)
                    os.set_blocking(fd, False)  # readers wait in select(), where they can give up
                    self.fds.append(fd)
        finally:
            os.close(pidfd)

    def write(self, offset, data):
        """Bytes into the data area (offset from its start)."""
        with ProcessMemory(self.pid, write=True) as mem:
            mem.write(self.base + PAGE + offset, data)

    def read(self, offset, size):
        with ProcessMemory(self.pid) as mem:
            return mem.read(self.base + PAGE + offset, size)

    @property
    def data(self):
        """The data area's address in the process."""
        return self.base + PAGE

    def start(self, **regs):
        """Run the code from its start with these registers set (the rest as stopped)."""
        values = dict(self.rs.regs)
        values.update(regs, rip=self.base, orig_rax=U64)  # orig_rax -1: no syscall restart logic
        ptrace.set_regs(self.pid, values)
        ptrace.cont(self.pid)
        self.running = True
        self.remote_read_fds = []  # the code's first job

    def wait_closed(self, index, poll_seconds):
        """Wait until the code has closed its end of pipe ``index`` (nothing is written there),
        looking at the thread every poll_seconds."""
        fd = self.fds[index]
        while True:
            if select.select([fd], [], [], poll_seconds)[0]:
                try:
                    if not os.read(fd, 1):
                        return
                except BlockingIOError:
                    continue
                raise InjectError(errno.EIO, f"process {self.pid}: unexpected bytes from our code")
            self.poll()

    def poll(self):
        """While it runs: raise if the thread stopped for a signal we cannot hold back (a
        fault in our code), or died."""
        if not self.running:
            return
        got, status = ptrace.waitpid(self.pid, os.WNOHANG)
        if got:
            self._stopped(status)
            ptrace.cont(self.pid)

    def _stopped(self, status):
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.running = False
            raise InjectError(errno.ESRCH, f"process {self.pid} died while running our code")
        sig = os.WSTOPSIG(status)
        if ptrace.is_group_stop(status):
            return  # a group stop (SIGSTOP from someone else): going on, its signal is deferred
        if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            self.rs.deferred.append(sig)  # sent again when the process is put back
            return
        self.running = False
        raise InjectError(errno.EFAULT, f"process {self.pid}: signal {sig} while running our code")

    def stop(self):
        """Stop the code wherever it is; returns its registers."""
        error = None
        if self.running:
            ptrace.interrupt(self.pid)
            while True:
                status = _wait_stop(self.pid, "stopping our code")
                if ptrace.is_group_stop(status) and os.WSTOPSIG(status) == signal.SIGTRAP:
                    break  # our PTRACE_INTERRUPT
                try:
                    self._stopped(status)
                except InjectError as exc:
                    error = error or exc
                ptrace.cont(self.pid)
            self.running = False
        if error is not None:
            raise error
        return ptrace.get_regs(self.pid)

    def parked(self, regs):
        """True when the code had reached its park loop (its pipe ends closed)."""
        return regs["rip"] - self.base >= self.park

    def close(self, closed=False):
        """Our fds closed; the pipe ends (unless ``closed``: the code did) and the mapping gone
        from the process; registers and mask back (RemoteSyscalls.close)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        rs, self.rs = self.rs, None
        if rs is None:
            return
        try:
            for fd in self.remote_read_fds + ([] if closed else self.write_fds):
                rs.call(SYS_CLOSE, fd)  # EBADF where the code closed it already: fine
            if self.base:
                rs.call(SYS_MUNMAP, self.base, self.size)
        finally:
            if self.own_rs:
                rs.close()
