"""A frozen process writes its own pages into a pipe that we read: one copy, no round trips.

/proc/PID/mem copies every page twice (through a kernel bounce page) and takes the
page tables for each page; process_vm_readv pins pages and so unshares copy-on-write
pages (see memory.py).  vmsplice(2) run *by the process itself* hands the pipe
references to its pages (get_user_pages without FOLL_PIN: nothing is unshared), and
reading the pipe is then the only copy.

A tracer can only run one system call per ptrace round trip (about 0.2 ms here), and
a pipe holds at most 1 MiB without CAP_SYS_RESOURCE, so one vmsplice per remote call
would cost a round trip per MiB.  Instead the process runs a small loop (PAGER_CODE,
in a private mapping of its own for the time of the reading) that vmsplices a whole
list of ranges, blocking while the pipe is full, and we read the pipe meanwhile.
At the end it closes its pipe end (we see end of file if it stops early) and parks
in pause(): every signal is blocked (RemoteSyscalls), so only our PTRACE_INTERRUPT
ends that, and the registers and mask are put back as after any remote call.

Running in user space, the process returns from its system calls like any running
process: the kernel may rewrite its rseq area's cpu fields (as it does at every
resume), nothing else.
"""

import errno
import fcntl
import os
import select
import signal
import struct
import threading

from stages._native import lib

from . import ptrace
from .memory import ProcessMemory
from .remote import RemoteError, RemoteSyscalls, _wait_stop

# The loop, assembled (tests/test_linux_pager.py assembles PAGER_ASM again and compares).
PAGER_ASM = """
    .intel_syntax noprefix
    .text
pager:                      # rdi = entries {fd, base, len}, rsi = how many; rdx = int fds[], rcx = how many
    mov rbx, rdi            # rbx: the first entry
    lea rsi, [rsi+rsi*2]
    lea r14, [rdi+rsi*8]    # r14: the end of the entries
    mov r12, rdx
    lea r13, [rdx+rcx*4]
close_ours:                 # our read ends: we hold them already
    cmp r12, r13
    jae start
    mov eax, 3
    mov edi, [r12]
    syscall
    add r12, 4
    jmp close_ours
start:
    mov r13, rbx            # r13: the current entry
    xor r15d, r15d          # r15: 0, or the -errno of the vmsplice that failed
next:
    cmp r13, r14
    jae done
again:
    mov eax, 278            # vmsplice(entry fd, &entry iovec, 1, 0): blocks while that pipe is full
    mov edi, [r13]
    lea rsi, [r13+8]
    mov edx, 1
    xor r10d, r10d
    syscall
    test rax, rax
    jle fail
    add [r13+8], rax        # a partial splice: the rest of this iovec next
    sub [r13+16], rax
    jnz again
    add r13, 24
    jmp next
fail:
    mov r15, rax
done:                       # close the write ends (an fd met again: EBADF, harmless)
    mov r12, rbx
close_next:
    cmp r12, r14
    jae park
    mov eax, 3
    mov edi, [r12]
    syscall
    add r12, 24
    jmp close_next
park:
    mov eax, 34             # pause() until PTRACE_INTERRUPT: every signal is blocked
    syscall
    jmp park
"""
PAGER_CODE = bytes.fromhex(
    "4889fb488d34764c8d34f74989d44c8d2c8a4d39ec7311b803000000418b3c240f054983c404ebea4989dd45"
    "31ff4d39f5732fb816010000418b7d00498d7508ba010000004531d20f054885c07e10490145084929451075"
    "da4983c518ebcf4989c74989dc4d39f47311b803000000418b3c240f054983c418ebeab8220000000f05ebf7")

SYS_MMAP, SYS_MUNMAP, SYS_CLOSE, SYS_PIPE2, SYS_PIDFD_GETFD = 9, 11, 3, 293, 438
PARK_OFFSET = PAGER_CODE.rindex(bytes.fromhex("b822000000"))  # where the loop has closed its pipe ends
PROT_RWX = 7  # the entries are advanced in place, next to the code
MAP_PRIVATE_ANON = 0x22
F_SETPIPE_SZ = 1031
CHUNK = 1 << 20  # the most a pipe may hold without CAP_SYS_RESOURCE (fs.pipe-max-size)
PIPES = 4  # chunk i of the stream goes through pipe i % PIPES: several MiB can wait for the reader
PAGE = 4096
ENTRY = struct.Struct("<qQQ")  # the loop's entries: fd, then a struct iovec
POLL_SECONDS = 0.1  # how often a reader waiting for data looks whether it should give up
U64 = (1 << 64) - 1


class PagerError(OSError):
    pass


class Unavailable(Exception):
    """The process cannot run the pager (no room for a mapping, no fd left, ...): nothing of
    it is left in the process; read it through /proc/PID/mem instead."""


def _fail(pid, what, res):
    raise Unavailable(f"process {pid}: {what}: {os.strerror(-res)}")


class Pager:
    """Process pid vmsplicing ``ranges`` ([(addr, length)], in order) into pipes we read.

    The ranges make one stream of bytes; chunk i (CHUNK bytes) of it goes through pipe
    i % PIPES.  start(), poll() and finish() must run in the tracer thread; read_at() in
    any threads: they take turns by stream offset."""

    def __init__(self, pid, syscall_addr, ranges):
        self.pid, self.syscall_addr, self.ranges = pid, syscall_addr, ranges
        self.rs = None
        self.scratch = self.scratch_size = 0
        self.entries = self._entries()
        self.write_fds = []  # their numbers in the process
        self.remote_read_fds = []  # closed by the loop when it starts, by _clean_up if it never does
        self.fds = []  # our read ends
        self.running = False
        self.cancelled = False  # a reader waiting must give up
        self.position = 0  # bytes of the stream read so far
        self.turn = threading.Condition()

    def _entries(self):
        """(pipe index, addr, length) pieces of the ranges, cut where the stream's chunks end."""
        out, offset = [], 0
        for addr, length in self.ranges:
            while length:
                n = min(length, CHUNK - offset % CHUNK)
                out.append((offset // CHUNK % PIPES, addr, n))
                addr, length, offset = addr + n, length - n, offset + n
        return out

    def start(self):
        """Set the process going.  Raises Unavailable (and leaves the process as it was)
        when it cannot."""
        self.rs = RemoteSyscalls(self.pid, self.syscall_addr)
        try:
            read_fds = self._prepare()
        except BaseException:
            self._clean_up()
            raise
        regs = dict(self.rs.regs)
        regs.update(rip=self.scratch, rdi=self.scratch + PAGE, rsi=len(self.entries),
                    rdx=self.scratch + PAGE - 4 * PIPES, rcx=len(read_fds),
                    orig_rax=U64)  # orig_rax -1: no syscall restart logic on our registers
        with ProcessMemory(self.pid, write=True) as mem:
            mem.write(self.scratch + PAGE - 4 * PIPES, struct.pack(f"<{PIPES}i", *read_fds))
        ptrace.set_regs(self.pid, regs)
        ptrace.cont(self.pid)
        self.running = True
        self.remote_read_fds = []  # the loop's first job

    def _prepare(self):
        """The mapping with code and entries, and the pipes; returns the process's read ends
        (the loop closes them first: we hold our own)."""
        rs = self.rs
        self.scratch_size = PAGE + -(-ENTRY.size * len(self.entries) // PAGE) * PAGE
        res = rs.call(SYS_MMAP, 0, self.scratch_size, PROT_RWX, MAP_PRIVATE_ANON, U64, 0)
        if res < 0:
            self.scratch_size = 0
            _fail(self.pid, "mmap for the pager", res)
        self.scratch = res
        pidfd = os.pidfd_open(self.pid)
        try:
            with ProcessMemory(self.pid, write=True) as mem:
                mem.write(self.scratch, PAGER_CODE)
                for _ in range(PIPES):
                    res = rs.call(SYS_PIPE2, self.scratch + PAGE - 8, os.O_CLOEXEC)
                    if res < 0:
                        _fail(self.pid, "pipe2 for the pager", res)
                    read_fd, write_fd = struct.unpack("<ii", mem.read(self.scratch + PAGE - 8, 8))
                    self.remote_read_fds.append(read_fd)
                    self.write_fds.append(write_fd)
                    fd = lib.cow_syscall6(SYS_PIDFD_GETFD, pidfd, read_fd, 0, 0, 0, 0)
                    if fd < 0:
                        _fail(self.pid, "pidfd_getfd of the pager's pipe", fd)
                    self.fds.append(fd)
                    os.set_inheritable(fd, False)
                    os.set_blocking(fd, False)  # a reader waits in select(), where it can see cancel()
                    try:
                        fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
                    except OSError:
                        pass  # over the user's pipe quota: the default size works, with more wake-ups
                mem.write(self.scratch + PAGE, b"".join(
                    ENTRY.pack(self.write_fds[i], addr, n) for i, addr, n in self.entries))
        finally:
            os.close(pidfd)
        return self.remote_read_fds

    def read_at(self, offset, view):
        """Fill view with the stream's bytes from offset on, once every earlier byte is read."""
        with self.turn:
            while self.position != offset:
                if self.cancelled:
                    raise PagerError(errno.ECANCELED, f"process {self.pid}: pager cancelled")
                self.turn.wait(POLL_SECONDS)
            try:
                done = 0
                while done < len(view):
                    n = min(len(view) - done, CHUNK - (offset + done) % CHUNK)
                    self._read(self.fds[(offset + done) // CHUNK % PIPES], view[done:done + n])
                    done += n
            finally:
                self.position = offset + len(view)  # a failed read ends the pager anyway
                self.turn.notify_all()

    def _read(self, fd, view):
        done, length = 0, len(view)
        while done < length:
            try:
                n = os.readv(fd, [view[done:]])
            except BlockingIOError:
                if self.cancelled:
                    raise PagerError(errno.ECANCELED, f"process {self.pid}: pager cancelled")
                select.select([fd], [], [], POLL_SECONDS)
                continue
            if n == 0:
                raise PagerError(errno.EIO, f"process {self.pid}: its pager stopped early")
            done += n

    def poll(self):
        """Tracer thread, while the process runs: raise if it stopped for a signal we cannot
        hold back (a fault in the loop), or died."""
        if not self.running:
            return
        got, status = ptrace.waitpid(self.pid, os.WNOHANG)
        if not got:
            return
        self._stopped(status)
        ptrace.cont(self.pid)

    def _stopped(self, status):
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.running = False
            raise PagerError(errno.ESRCH, f"process {self.pid} died while writing its pages")
        sig = os.WSTOPSIG(status)
        if ptrace.is_group_stop(status):
            return  # a group stop (SIGSTOP from someone else): going on, its signal is deferred
        if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            self.rs.deferred.append(sig)  # sent again when the process is put back
            return
        self.running = False
        raise PagerError(errno.EFAULT, f"process {self.pid}: signal {sig} while writing its pages")

    def finish(self):
        """Stop the loop and take everything out of the process; raises PagerError if the
        loop did not splice every range."""
        error, closed = None, False
        try:
            if self.running:
                ptrace.interrupt(self.pid)
                while True:
                    status = _wait_stop(self.pid, "stopping the pager")
                    if ptrace.is_group_stop(status) and os.WSTOPSIG(status) == signal.SIGTRAP:
                        break  # our PTRACE_INTERRUPT
                    try:
                        self._stopped(status)
                    except PagerError as exc:
                        error = error or exc
                    ptrace.cont(self.pid)
                self.running = False
                regs = ptrace.get_regs(self.pid)
                closed = regs["rip"] - self.scratch >= PARK_OFFSET  # the loop closed its pipe ends
                if error is None and regs["r13"] != self.scratch + PAGE + ENTRY.size * len(self.entries):
                    res = regs["r15"] - (1 << 64) if regs["r15"] >> 63 else regs["r15"]
                    why = os.strerror(-res) if res < 0 else "stopped early"
                    error = PagerError(-res if res < 0 else errno.EIO,
                                       f"process {self.pid}: vmsplice of its pages failed: {why}")
        except OSError as exc:
            error = error or exc
        try:
            self._clean_up(closed)
        except OSError as exc:
            error = error or exc
        if error is not None:
            raise error

    def cancel(self):
        """Any thread: readers waiting in read_at give up."""
        self.cancelled = True
        with self.turn:
            self.turn.notify_all()

    def _clean_up(self, closed=False):
        """Our fds closed; its pipe ends and mapping gone from the process; registers and
        mask back (RemoteSyscalls.close)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        rs, self.rs = self.rs, None
        if rs is None:
            return
        try:
            for fd in self.remote_read_fds:
                rs.call(SYS_CLOSE, fd)
            if not closed:
                for fd in self.write_fds:
                    rs.call(SYS_CLOSE, fd)  # EBADF when the loop closed it: fine
            if self.scratch_size:
                rs.call(SYS_MUNMAP, self.scratch, self.scratch_size)
        finally:
            rs.close()
