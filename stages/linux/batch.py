"""A list of system calls run inside a stopped tracee: in one stop, or one remote call each.

Reading a process's state takes ~80 calls (64 rt_sigaction, prctl, getitimer...), each
a ptrace round trip when made one by one (remote.py): ~10 ms per process.  run()
makes them all in one stop with a loop of ours (BATCH_CODE, through inject.py): each
call's result is stored next to it, each output buffer is in our mapping, and one byte
in the watch pipe says when all are made.  Where the
process cannot have that mapping or pipe, run() falls back to one remote call each,
with the buffers in scratch memory below the red zone (put back afterwards): the same
results either way.
"""

import struct

from .inject import PARK, TAIL_ASM, InjectedCode, Unavailable
from .memory import ProcessMemory

BATCH_ASM = """
    .intel_syntax noprefix
    .text
batch:                      # rdi = entries {nr, 6 arguments, result}, rsi = how many, rdx = fd to close first, rcx = fd to write to last
    mov rbx, rdi            # rbx: the current entry
    shl rsi, 6
    lea r14, [rdi+rsi]      # r14: the end of the entries
    mov r12, rcx
    mov eax, 3              # close(rdx): the pipe's read end, which the tracer holds already
    mov rdi, rdx
    syscall
next:
    cmp rbx, r14
    jae done
    mov rax, [rbx]
    mov rdi, [rbx+8]
    mov rsi, [rbx+16]
    mov rdx, [rbx+24]
    mov r10, [rbx+32]
    mov r8, [rbx+40]
    mov r9, [rbx+48]
    syscall
    mov [rbx+56], rax       # the result, -errno on failure
    add rbx, 64
    jmp next
done:
    mov eax, 1              # write(rcx, resume, 1): one byte tells the tracer all calls are made
    mov rdi, r12
    lea rsi, [rip+resume]
    mov edx, 1
    syscall
    mov r15, rax            # -EPIPE if the tracer is gone
""" + TAIL_ASM
BATCH_CODE = bytes.fromhex(
    "4889fb48c1e6064c8d34374989ccb8030000004889d70f054c39f37327488b03488b7b08488b7310488b5318"
    "4c8b53204c8b43284c8b4b300f05488943384883c340ebd4b8010000004c89e7488d35f5000000ba01000000"
    "0f054989c7b80f010000488d3ddf000000be0100000031d24531d241b8080000000f054983ffe0751db88000"
    "0000488d3dcb00000031f6488d15ca00000041ba080000000f05b80e000000bf02000000488d35a100000031"
    "d241ba080000000f05488b25480100004881ec88000000ff35330100009d4c8b3d9b0000004c8b359c000000"
    "4c8b2d9d0000004c8b259e000000488b2d9f000000488b1da00000004c8b1da10000004c8b15a20000004c8b"
    "0da30000004c8b05a4000000488b05a5000000488b0da6000000488b15a7000000488b35a8000000488b3da9"
    "000000488b25ca000000ff25ac0000000f1f4000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000")
PARK_OFFSET = BATCH_CODE.index(PARK)
ENTRY = struct.Struct("<7Qq")  # nr, 6 arguments, result
OUT = object()  # an argument that is the call's output buffer
SCRATCH_BELOW_RED_ZONE = 128 + 256  # one-by-one: the buffer's distance below the stack pointer
WAIT_SECONDS = 0.1  # between looks at the thread while waiting for the end of the calls


class Calls:
    """System calls to run in order.  add() one, with OUT for its output buffer's address;
    after run(): result(i) (negative errno on failure) and output(i) (its buffer's bytes)."""

    def __init__(self):
        self.calls = []  # (nr, args, out size)
        self.results, self.outputs = [], []

    def add(self, nr, *args, out=0):
        if len(args) > 6 or (OUT in args) != bool(out):
            raise ValueError("a call has at most 6 arguments, OUT among them exactly when it has out bytes")
        self.calls.append((nr, args, out))
        return len(self.calls) - 1

    def result(self, i):
        return self.results[i]

    def output(self, i):
        return self.outputs[i]

    def run(self, rs, rsp, notes=None):
        """Make the calls in the thread of ``rs`` (a RemoteSyscalls; rsp: the thread's stack
        pointer): in one stop when it can, else one by one (a note says why)."""
        code = InjectedCode(rs.pid, rs.syscall_addr, BATCH_CODE, PARK_OFFSET, self._size(), 0)
        try:
            self._run_injected(code, rs)
        except Unavailable as exc:
            if notes is not None:
                notes.append(f"{exc}: its state is read one system call at a time")
            self.run_each(rs, rsp)

    def _size(self):
        return ENTRY.size * len(self.calls) + sum(out for _, _, out in self.calls)

    def _run_injected(self, code, rs):
        code.open(rs)
        try:
            outs, at = [], code.data + ENTRY.size * len(self.calls)
            entries = []
            for nr, args, out in self.calls:
                args = [at if a is OUT else a for a in args] + [0] * (6 - len(args))
                entries.append(ENTRY.pack(nr, *(a & (1 << 64) - 1 for a in args), 0))
                outs.append(at)
                at += out
            code.write(0, b"".join(entries))
            code.start(rdi=code.data, rsi=len(self.calls), rdx=code.remote_read_fds[0], rcx=code.write_fds[0])
            code.wait_signal(WAIT_SECONDS)  # written after the last call: all are made
            code.stop()  # on its way to park, or parked
            blob = code.read(0, self._size())
        finally:
            code.close()
        self.results = [ENTRY.unpack_from(blob, i * ENTRY.size)[7] for i in range(len(self.calls))]
        self.outputs = [blob[a - code.data:a - code.data + out] if out else None
                        for a, (_, _, out) in zip(outs, self.calls)]

    def run_each(self, rs, rsp):
        """One remote call each, with every output buffer in scratch memory below the red zone
        of the stack at rsp (put back afterwards): for a few calls, cheaper than the loop."""
        scratch = (rsp - SCRATCH_BELOW_RED_ZONE) & ~15
        size = max((out for _, _, out in self.calls), default=0)
        self.results, self.outputs = [], []
        with ProcessMemory(rs.pid, write=True) as mem:
            saved = mem.read(scratch, size) if size else b""
            try:
                for nr, args, out in self.calls:
                    if out:
                        mem.write(scratch, bytes(out))
                    self.results.append(rs.call(nr, *(scratch if a is OUT else a for a in args)))
                    self.outputs.append(mem.read(scratch, out) if out else None)
            finally:
                if size:
                    mem.write(scratch, saved)

