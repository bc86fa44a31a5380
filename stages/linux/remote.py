"""System calls executed inside a ptrace-stopped tracee (x86_64).

The tracee must be in a ptrace stop of ours (PTRACE_SEIZE'd with
PTRACE_O_TRACESYSGOOD and stopped by PTRACE_INTERRUPT).  A call: point rip at
a ``syscall`` instruction (found in the vDSO), load rax and the arguments, set
orig_rax = -1 so the kernel does not apply the interrupted syscall's restart
logic to our registers, and run it with PTRACE_SYSCALL twice (enter, exit): no
signal is generated, so no disposition changes (a single-step SIGTRAP would
reset an ignored SIGTRAP to SIG_DFL).  All signals are blocked meanwhile so
none is delivered in the middle.

``close()`` puts the registers and signal mask back, then traps the tracee
again with PTRACE_INTERRUPT: it is back in the same kind of stop as before,
inside get_signal(), so when it is resumed the kernel restarts the interrupted
system call exactly as it would have.
"""

import os
import signal
import struct

from . import ptrace
from .memory import ProcessMemory

SYS_BRK = 12
SYS_RT_SIGACTION = 13
SYS_PRCTL = 157
PR_GET_TID_ADDRESS = 40
SYSCALL_INSN = b"\x0f\x05"
SIGTRAP_SYSCALL = signal.SIGTRAP | 0x80  # PTRACE_O_TRACESYSGOOD
ALL_SIGNALS = (1 << 64) - 1
U64 = (1 << 64) - 1
SIGACTION = struct.Struct("<4Q")  # kernel struct sigaction: handler, flags, restorer, mask


class RemoteError(OSError):
    pass


def find_syscall_insn(pid, vmas):
    """Address of a ``syscall`` instruction: in the tracee's vDSO, or else the one it is
    stopped after (rip - 2 when it is inside a system call)."""
    with ProcessMemory(pid) as mem:
        for vma in vmas:
            if vma["kind"] == "vdso":
                at = mem.read(vma["start"], vma["end"] - vma["start"]).find(SYSCALL_INSN)
                if at >= 0:
                    return vma["start"] + at
        regs = ptrace.get_regs(pid)
        if regs["orig_rax"] >> 63 == 0:
            try:
                if mem.read(regs["rip"] - 2, 2) == SYSCALL_INSN:
                    return regs["rip"] - 2
            except OSError:
                pass
    raise RemoteError(f"process {pid}: no syscall instruction found (no vDSO, not in a system call)")


def _wait_stop(pid, what):
    while True:
        _, status = ptrace.waitpid(pid)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise RemoteError(f"process {pid} died during {what}")
        if os.WIFSTOPPED(status):
            return status


def wait_trap(pid, what, past):
    """Wait until pid, asked to stop by PTRACE_INTERRUPT, is in a PTRACE_EVENT_STOP; resume it
    past any other stop on the way with the signal ``past(status)`` returns.

    Any PTRACE_EVENT_STOP is the one asked for, whatever its signal: the kernel reports
    SIGTRAP, or the stop signal when the process is group-stopped (kill -STOP, or left by
    cow-collect --leave-stopped), for PTRACE_INTERRUPT's trap and a group stop's alike.  And
    every ptrace stop clears a pending PTRACE_INTERRUPT: after another stop, ask again."""
    while True:
        status = _wait_stop(pid, what)
        if ptrace.is_group_stop(status):
            return status
        sig = past(status)
        ptrace.interrupt(pid)
        ptrace.cont(pid, sig)


class RemoteSyscalls:
    """Use as a context manager around calls into one stopped tracee."""

    def __init__(self, pid, syscall_addr):
        self.pid = pid
        self.syscall_addr = syscall_addr
        self.saved_regs = ptrace.get_regs_raw(pid)
        self.saved_mask = ptrace.get_sigmask(pid)
        self.regs = ptrace.regs_from_bytes(self.saved_regs)
        ptrace.set_sigmask(pid, ALL_SIGNALS)
        self.deferred = []
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, nr, *args):
        """Run syscall nr(args) in the tracee; return its raw result (negative errno on failure)."""
        regs = dict(self.regs)
        names = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
        for name, value in zip(names, args):
            regs[name] = value & U64
        regs.update(rax=nr, orig_rax=U64, rip=self.syscall_addr)
        ptrace.set_regs(self.pid, regs)
        for phase in ("entry", "exit"):
            while True:
                ptrace.ptrace(ptrace.PTRACE_SYSCALL, self.pid, 0, 0, "PTRACE_SYSCALL")
                status = _wait_stop(self.pid, f"remote syscall {nr}")
                sig = os.WSTOPSIG(status)
                if sig == SIGTRAP_SYSCALL:
                    break
                if ptrace.is_group_stop(status):
                    continue  # a group stop (SIGSTOP'd process) reported again: go on
                if phase == "entry" and ptrace.get_regs(self.pid)["rip"] == self.syscall_addr:
                    # an unblockable signal (SIGSTOP) arrived before our call ran:
                    # hold it back and send it again when we are done
                    self.deferred.append(sig)
                    continue
                raise RemoteError(f"process {self.pid}: unexpected stop {sig} at syscall {phase} of remote syscall {nr}")
        result = ptrace.get_regs(self.pid)["rax"]
        return result - (1 << 64) if result >> 63 else result

    def close(self):
        """Registers and mask back, then the tracee is put in a PTRACE_EVENT_STOP again."""
        if self.closed:
            return
        self.closed = True
        ptrace.setregset(self.pid, ptrace.NT_PRSTATUS, self.saved_regs)
        ptrace.set_sigmask(self.pid, self.saved_mask)
        for sig in self.deferred:
            os.kill(self.pid, sig)
        ptrace.interrupt(self.pid)
        ptrace.cont(self.pid)
        # a signal arriving meanwhile goes through: it is handled after the trap
        wait_trap(self.pid, "re-stopping after remote syscalls", os.WSTOPSIG)


PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_GET_CHILD_SUBREAPER, PR_GET_SECUREBITS = 2, 3, 37, 27


SYS_GETITIMER, SYS_SIGALTSTACK, SYS_TIMER_GETTIME = 36, 131, 224
ITIMERVAL = struct.Struct("<4q")  # it_interval (sec, usec), it_value (sec, usec)
STACK_T = struct.Struct("<QiiQ")  # ss_sp, ss_flags, padding, ss_size


PTRACE_PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128


def pending_siginfos(tid, shared):
    """The queued siginfos of a stopped tracee: its own queue, or the process's shared one
    (PTRACE_PEEKSIGINFO), in queue order; each 128 raw bytes."""
    from stages._native import ffi

    out = []
    args = ffi.new("char[]", 16)
    buf = ffi.new("char[]", SIGINFO_SIZE * 32)
    while True:
        ffi.memmove(args, struct.pack("<QIi", len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, 32), 16)
        n = ptrace.ptrace(ptrace.PTRACE_PEEKSIGINFO, tid, int(ffi.cast("unsigned long", args)),
                          int(ffi.cast("unsigned long", buf)), "PTRACE_PEEKSIGINFO")
        if n <= 0:
            return out
        raw = bytes(ffi.buffer(buf, n * SIGINFO_SIZE))
        out.extend(raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))
