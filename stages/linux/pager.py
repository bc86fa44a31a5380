"""A frozen process writes its own pages into pipes that we read: one copy, few round trips.

/proc/PID/mem copies every page twice (through a kernel bounce page) and takes the
page tables for each page; process_vm_readv pins pages and so unshares copy-on-write
pages (see memory.py).  vmsplice(2) run *by the process itself* hands the pipe
references to its pages (get_user_pages without FOLL_PIN: nothing is unshared), and
reading the pipe is then the only copy.

One vmsplice per remote call would cost a ptrace round trip per MiB (a pipe holds at
most 1 MiB without CAP_SYS_RESOURCE).  Instead the process runs a loop of ours
(PAGER_CODE, through inject.py) that vmsplices a whole list of ranges into PIPES
pipes in turn, blocking while one is full, while our readers drain them: several MiB
can wait for a reader busy elsewhere.  The loop closes its pipe ends when done (or
when a vmsplice fails: the readers then see end of file instead of waiting), and parks.
"""

import errno
import fcntl
import os
import select
import struct
import threading

from .inject import PARK, TAIL_ASM, InjectedCode, InjectError, Unavailable  # noqa: F401 (Unavailable: for callers)

# The loop, assembled (tests/test_linux_pager.py assembles PAGER_ASM again and compares).
PAGER_ASM = """
    .intel_syntax noprefix
    .text
pager:                      # rdi = entries {fd, base, len}, rsi = how many; rdx = int fds[] to close first, rcx = how many
    mov rbx, rdi            # rbx: the first entry
    lea rsi, [rsi+rsi*2]
    lea r14, [rdi+rsi*8]    # r14: the end of the entries
    mov r12, rdx
    lea r13, [rdx+rcx*4]
close_ours:                 # the pipes' read ends: the tracer holds its own
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
done:                       # close the pipes' write ends (an fd met again: EBADF, harmless)
    mov r12, rbx
close_next:
    cmp r12, r14
    jae park
    mov eax, 3
    mov edi, [r12]
    syscall
    add r12, 24
    jmp close_next
""" + TAIL_ASM
PAGER_CODE = bytes.fromhex(
    "4889fb488d34764c8d34f74989d44c8d2c8a4d39ec7311b803000000418b3c240f054983c404ebea4989dd45"
    "31ff4d39f5732fb816010000418b7d00498d7508ba010000004531d20f054885c07e10490145084929451075"
    "da4983c518ebcf4989c74989dc4d39f47311b803000000418b3c240f054983c418ebeab80f010000488d3de1"
    "000000be0100000031d24531d241b8080000000f054983ffe0751db880000000488d3dcd00000031f6488d15"
    "cc00000041ba080000000f05b80e000000bf02000000488d35a300000031d241ba080000000f05488b254a01"
    "00004881ec88000000ff35350100009d4c8b3d9d0000004c8b359e0000004c8b2d9f0000004c8b25a0000000"
    "488b2da1000000488b1da20000004c8b1da30000004c8b15a40000004c8b0da50000004c8b05a6000000488b"
    "05a7000000488b0da8000000488b15a9000000488b35aa000000488b3dab000000488b25cc000000ff25ae00"
    "0000660f1f440000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000")

PARK_OFFSET = PAGER_CODE.index(PARK)
CHUNK = 1 << 20  # the most a pipe may hold without CAP_SYS_RESOURCE (fs.pipe-max-size)
PIPES = 4  # chunk i of the stream goes through pipe i % PIPES: several MiB can wait for the reader
ENTRY = struct.Struct("<qQQ")  # the loop's entries: fd, then a struct iovec
READ_FDS = 4 * (PIPES + 1)  # the process's read ends (and the watch pipe's) at the start of the data area
F_SETPIPE_SZ = 1031
POLL_SECONDS = 0.1  # how often a reader waiting for data looks whether it should give up

PagerError = InjectError


class Pager:
    """Process pid vmsplicing ``ranges`` ([(addr, length)], in order) into pipes we read.

    The ranges make one stream of bytes; chunk i (CHUNK bytes) of it goes through pipe
    i % PIPES.  start(), poll() and finish() must run in the tracer thread; read_at() in
    any threads: they take turns by stream offset."""

    def __init__(self, pid, syscall_addr, ranges):
        self.pid, self.ranges = pid, ranges
        self.entries = self._entries()
        self.code = InjectedCode(pid, syscall_addr, PAGER_CODE, PARK_OFFSET,
                                 READ_FDS + ENTRY.size * len(self.entries), PIPES)
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
        code = self.code
        code.open()
        try:
            for fd in code.fds[:PIPES]:
                try:
                    fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
                except OSError:
                    pass  # over the user's pipe quota: the default size works, with more wake-ups
            code.write(0, struct.pack(f"<{PIPES + 1}i", *code.remote_read_fds) + b"".join(
                ENTRY.pack(code.write_fds[i], addr, n) for i, addr, n in self.entries))
        except BaseException:
            code.close()
            raise
        code.start(rdi=code.data + READ_FDS, rsi=len(self.entries), rdx=code.data, rcx=PIPES + 1)

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
                    self._read(self.code.fds[(offset + done) // CHUNK % PIPES], view[done:done + n])
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
        self.code.poll()

    def finish(self):
        """Stop the loop and take everything out of the process; raises PagerError if the
        loop did not splice every range."""
        error, closed = None, False
        try:
            regs = self.code.stop()
            closed = self.code.parked(regs)
            if regs["r13"] != self.code.data + READ_FDS + ENTRY.size * len(self.entries):
                res = regs["r15"] - (1 << 64) if regs["r15"] >> 63 else regs["r15"]
                why = os.strerror(-res) if res < 0 else "stopped early"
                error = PagerError(-res if res < 0 else errno.EIO,
                                   f"process {self.pid}: vmsplice of its pages failed: {why}")
        except OSError as exc:
            error = exc
        finally:  # also when a SIGTERM of ours cut stop() short: that exception goes on
            try:
                self.code.close(closed)
            except OSError as exc:
                error = error or exc
        if error is not None:
            raise error

    def cancel(self):
        """Any thread: readers waiting in read_at give up."""
        self.cancelled = True
        with self.turn:
            self.turn.notify_all()
