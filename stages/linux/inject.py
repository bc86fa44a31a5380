"""Code of ours run by a stopped tracee's thread, with pipes back to us (x86_64).

A remote system call (remote.py) costs a ptrace round trip, about 0.1-0.2 ms.  For
many calls in a row (cow-collect's pager, the process state's ~80 calls) the thread
runs a small loop instead, in a private mapping made for it, with pipes whose read
ends we hold.  The loop then parks (TAIL_ASM, shared by every loop) in ppoll() on the
write end of a "watch" pipe, events 0: every signal is blocked (RemoteSyscalls), so
only our PTRACE_INTERRUPT ends that, and the registers and mask are put back as after
any remote call.  Should cow-collect die instead (SIGKILL), the kernel detaches the
thread and closes our end of the watch pipe: ppoll() returns (POLLERR) and the loop
puts back the signal mask and the registers itself, from the resume block we filled
in, with the kernel's restart of an interrupted system call done as the kernel would.
The thread runs on where it was stopped; only the mapping stays.

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
from .remote import RemoteSyscalls, wait_trap

SYS_MMAP, SYS_MUNMAP, SYS_CLOSE, SYS_PIPE2, SYS_PIDFD_GETFD = 9, 11, 3, 293, 438
PROT_RWX = 7  # the loops write their results and cursors next to their code
MAP_PRIVATE_ANON = 0x22
PAGE = 4096
U64 = (1 << 64) - 1
PIPE_FDS_AT = PAGE - 8  # where pipe2 stores the two fds: the end of the code page

# The end of every loop: park until interrupted, or resume on our own once the tracer is gone.
TAIL_ASM = """park:                       # until PTRACE_INTERRUPT; should the tracer die instead, its end of the
    mov eax, 271            # watch pipe closes and ppoll() returns (POLLERR): resume on our own
    lea rdi, [rip+resume]   # ppoll(&resume.pollfd, 1, NULL, NULL, 8): events 0, only POLLERR ends it
    mov esi, 1              # (not poll(): interrupted, it would overwrite the thread's restart block,
    xor edx, edx            # which an interrupted nanosleep of the process still needs)
    xor r10d, r10d
    mov r8d, 8
    syscall
    cmp r15, -32            # -EPIPE: our last write met no reader and queued a SIGPIPE: take it back
    jne 1f
    mov eax, 128            # rt_sigtimedwait(&resume.sigpipe, NULL, &resume.zero, 8)
    lea rdi, [rip+resume+16]
    xor esi, esi
    lea rdx, [rip+resume+24]
    mov r10d, 8
    syscall
1:
    mov eax, 14             # rt_sigprocmask(SIG_SETMASK, &resume.mask, NULL, 8)
    mov edi, 2
    lea rsi, [rip+resume+8]
    xor edx, edx
    mov r10d, 8
    syscall
    mov rsp, [rip+resume+40+19*8]
    sub rsp, 136            # flags through the stack, below the red zone
    push qword ptr [rip+resume+40+18*8]
    popfq
    mov r15, [rip+resume+40]
    mov r14, [rip+resume+40+1*8]
    mov r13, [rip+resume+40+2*8]
    mov r12, [rip+resume+40+3*8]
    mov rbp, [rip+resume+40+4*8]
    mov rbx, [rip+resume+40+5*8]
    mov r11, [rip+resume+40+6*8]
    mov r10, [rip+resume+40+7*8]
    mov r9, [rip+resume+40+8*8]
    mov r8, [rip+resume+40+9*8]
    mov rax, [rip+resume+40+10*8]
    mov rcx, [rip+resume+40+11*8]
    mov rdx, [rip+resume+40+12*8]
    mov rsi, [rip+resume+40+13*8]
    mov rdi, [rip+resume+40+14*8]
    mov rsp, [rip+resume+40+19*8]
    jmp qword ptr [rip+resume+40+16*8]
    .balign 8
resume:                     # filled in by the tracer: pollfd, mask, SIGPIPE's set, a zero timespec, the registers
    .zero 256
"""
PARK = bytes.fromhex("b80f010000488d3d")  # TAIL_ASM's first instructions: where a loop parks
RESUME = struct.Struct("<iHHQQ16s27Q")  # pollfd {fd, events, revents}, mask, SIGPIPE's set, zero timespec, registers
SIGPIPE_SET = 1 << (signal.SIGPIPE - 1)
RESTART = {-512: None, -513: None, -514: None, -516: 219}  # -ERESTART*: the call again (or restart_syscall)


def resume_registers(regs):
    """The registers a thread stopped with ``regs`` goes on with when it is resumed without a
    signal: an interrupted system call restarted, as the kernel does."""
    regs = dict(regs)
    rax = regs["rax"] - (1 << 64) if regs["rax"] >> 63 else regs["rax"]
    if regs["orig_rax"] >> 63 == 0 and rax in RESTART:
        regs["rax"] = regs["orig_rax"] if RESTART[rax] is None else RESTART[rax]
        regs["rip"] -= 2  # the syscall instruction again
    return regs


class InjectError(OSError):
    pass


class Unavailable(Exception):
    """The process cannot run our code (no room for a mapping, no fd left, ...): nothing of
    it is left in the process; do it the slower way."""


def _fail(pid, what, res):
    raise Unavailable(f"process {pid}: {what}: {os.strerror(-res)}")


class InjectedCode:
    """``code`` (ending in TAIL_ASM, from ``park`` on) mapped in thread pid with ``data_size``
    bytes after its page, and ``pipes`` pipes and the watch pipe (the last) whose read ends
    we hold (``fds``; their numbers in the process: ``remote_read_fds``, which the code
    closes first, and ``write_fds``).

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
                for _ in range(self.pipes + 1):
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
        resume = resume_registers(self.rs.regs)
        with ProcessMemory(self.pid, write=True) as mem:
            mem.write(self.base + len(self.code) - RESUME.size, RESUME.pack(
                self.write_fds[-1], 0, 0, self.rs.saved_mask, SIGPIPE_SET, bytes(16),
                *(resume[name] & U64 for name in ptrace.USER_REGS_FIELDS)))
        values = dict(self.rs.regs)
        values.update(regs, rip=self.base, orig_rax=U64)  # orig_rax -1: no syscall restart logic
        ptrace.set_regs(self.pid, values)
        ptrace.cont(self.pid)
        self.running = True
        self.remote_read_fds = []  # the code's first job

    def wait_signal(self, poll_seconds):
        """Wait for the byte the code writes into the watch pipe, looking at the thread every
        poll_seconds."""
        fd = self.fds[-1]
        while True:
            if select.select([fd], [], [], poll_seconds)[0]:
                try:
                    if os.read(fd, 1):
                        return
                except BlockingIOError:
                    continue
                raise InjectError(errno.EIO, f"process {self.pid}: our code stopped early")
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
            return  # a SIGCONT's notice, or a trap asked for before: going on
        if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            self.rs.deferred.append(sig)  # sent again when the process is put back
            return
        self.running = False
        raise InjectError(errno.EFAULT, f"process {self.pid}: signal {sig} while running our code")

    def stop(self):
        """Stop the code wherever it is; returns its registers."""
        error = None

        def past(status):  # a signal's stop before the trap: held back, or the error to raise
            nonlocal error
            try:
                self._stopped(status)
            except InjectError as exc:
                error = error or exc
            return 0

        if self.running:
            ptrace.interrupt(self.pid)
            wait_trap(self.pid, "stopping our code", past)
            self.running = False
        if error is not None:
            raise error
        return ptrace.get_regs(self.pid)

    def parked(self, regs):
        """True when the code had reached its park loop (its pipe ends closed)."""
        return regs["rip"] - self.base >= self.park

    def close(self, closed=False):
        """Our fds closed; the pipe ends (those but the watch pipe's unless ``closed``: the
        code did) and the mapping gone from the process; registers and mask back
        (RemoteSyscalls.close when the session is ours)."""
        try:
            if self.running:
                # stop() was not called or cut short (a SIGTERM of ours): the thread must stop
                # before our calls, and before the code sees its watch pipe close (it would
                # then resume the thread on its own)
                try:
                    self.stop()
                except InjectError:
                    pass  # stopped all the same; the caller has its own error to report
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
        rs, self.rs = self.rs, None
        if rs is None:
            return
        try:
            for fd in self.remote_read_fds + (self.write_fds[-1:] if closed else self.write_fds):
                rs.call(SYS_CLOSE, fd)  # EBADF where the code closed it already: fine
            if self.base:
                rs.call(SYS_MUNMAP, self.base, self.size)
        finally:
            if self.own_rs:
                rs.close()
