"""ptrace primitives (x86_64), shared by collect and apply.

Thin wrappers over stages._native.cow_ptrace that raise OSError with the errno
and the pid, plus the register set helpers (PTRACE_GETREGSET/SETREGSET).
"""

import errno
import os
import struct

from stages._native import ffi, lib

PTRACE_TRACEME = 0
PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_STOP = 128

NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

# struct user_regs_struct, x86_64: 27 unsigned longs in this order.
USER_REGS_FIELDS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)
USER_REGS_SIZE = 8 * len(USER_REGS_FIELDS)
_REGS = struct.Struct("<27Q")

XSTATE_MAX = 1 << 14  # well above any x86 xstate size today


def _check(result, what, pid):
    if result < 0:
        raise OSError(-result, f"{what} of pid {pid}: {os.strerror(-result)}")
    return result


def ptrace(request, pid, addr=0, data=0, what=None):
    return _check(lib.cow_ptrace(request, pid, addr, data), what or f"ptrace({request:#x})", pid)


def seize(pid, options=0):
    ptrace(PTRACE_SEIZE, pid, 0, options, "PTRACE_SEIZE")


def interrupt(pid):
    ptrace(PTRACE_INTERRUPT, pid, 0, 0, "PTRACE_INTERRUPT")


def detach(pid, sig=0):
    ptrace(PTRACE_DETACH, pid, 0, sig, "PTRACE_DETACH")


def cont(pid, sig=0):
    ptrace(PTRACE_CONT, pid, 0, sig, "PTRACE_CONT")


def singlestep(pid, sig=0):
    ptrace(PTRACE_SINGLESTEP, pid, 0, sig, "PTRACE_SINGLESTEP")


def setoptions(pid, options):
    ptrace(PTRACE_SETOPTIONS, pid, 0, options, "PTRACE_SETOPTIONS")


def geteventmsg(pid):
    out = ffi.new("unsigned long *")
    ptrace(PTRACE_GETEVENTMSG, pid, 0, int(ffi.cast("unsigned long", out)), "PTRACE_GETEVENTMSG")
    return out[0]


def peek(pid, addr):
    out = ffi.new("unsigned long *")
    _check(lib.cow_ptrace_peek(PTRACE_PEEKDATA, pid, addr, out), "PTRACE_PEEKDATA", pid)
    return out[0]


def poke(pid, addr, word):
    ptrace(PTRACE_POKEDATA, pid, addr, word, "PTRACE_POKEDATA")


def getregset(pid, note, size):
    """Raw bytes of one register set (PTRACE_GETREGSET fills as much as the kernel has)."""
    buf = ffi.new("char[]", size)
    iov = ffi.new("struct cow_iovec *", (buf, size))
    ptrace(PTRACE_GETREGSET, pid, note, int(ffi.cast("unsigned long", iov)), f"PTRACE_GETREGSET({note:#x})")
    return bytes(ffi.buffer(buf, iov.len))


def setregset(pid, note, blob):
    buf = ffi.new("char[]", blob)
    iov = ffi.new("struct cow_iovec *", (buf, len(blob)))
    ptrace(PTRACE_SETREGSET, pid, note, int(ffi.cast("unsigned long", iov)), f"PTRACE_SETREGSET({note:#x})")


def get_regs_raw(pid):
    return getregset(pid, NT_PRSTATUS, USER_REGS_SIZE)


def get_regs(pid):
    return regs_from_bytes(get_regs_raw(pid))


def set_regs(pid, regs):
    setregset(pid, NT_PRSTATUS, regs_to_bytes(regs))


def regs_from_bytes(blob):
    return dict(zip(USER_REGS_FIELDS, _REGS.unpack(blob[:USER_REGS_SIZE])))


def regs_to_bytes(regs):
    return _REGS.pack(*(regs[name] & 0xFFFFFFFFFFFFFFFF for name in USER_REGS_FIELDS))


def get_xstate(pid):
    return getregset(pid, NT_X86_XSTATE, XSTATE_MAX)


def set_xstate(pid, blob):
    setregset(pid, NT_X86_XSTATE, blob)


def getsiginfo(pid):
    """(si_signo, si_code) of the stop the tracee is in: a signal-delivery stop has the
    signal's own code, a PTRACE_EVENT_STOP has (PTRACE_EVENT_STOP << 8) | signo."""
    buf = ffi.new("char[]", 128)  # sizeof(siginfo_t)
    ptrace(PTRACE_GETSIGINFO, pid, 0, int(ffi.cast("unsigned long", buf)), "PTRACE_GETSIGINFO")
    signo, _errno, code = struct.unpack_from("<iii", ffi.buffer(buf, 12))
    return signo, code


def get_sigmask(pid):
    out = ffi.new("unsigned long *")
    ptrace(PTRACE_GETSIGMASK, pid, 8, int(ffi.cast("unsigned long", out)), "PTRACE_GETSIGMASK")
    return out[0]


def set_sigmask(pid, mask):
    val = ffi.new("unsigned long *", mask)
    ptrace(PTRACE_SETSIGMASK, pid, 8, int(ffi.cast("unsigned long", val)), "PTRACE_SETSIGMASK")


def waitpid(pid, options=0):
    """os.waitpid that retries EINTR; __WALL so threads are waited for too."""
    while True:
        try:
            return os.waitpid(pid, options | os.__WALL if hasattr(os, "__WALL") else options | 0x40000000)
        except InterruptedError:
            continue


def is_group_stop(status):
    """True for the PTRACE_EVENT_STOP that SEIZE + INTERRUPT (or a group stop) produces."""
    return os.WIFSTOPPED(status) and (status >> 16) == PTRACE_EVENT_STOP


def errno_is(exc, *codes):
    return isinstance(exc, OSError) and exc.errno in codes


ESRCH = errno.ESRCH


# struct ptrace_rseq_configuration: rseq_abi_pointer, rseq_abi_size, signature, flags, pad
_RSEQ_CONF = struct.Struct("<QIIII")


def get_rseq_configuration(pid):
    """(addr, len, sig) of the thread's registered rseq area; addr 0 when none."""
    buf = ffi.new("char[]", _RSEQ_CONF.size)
    ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, _RSEQ_CONF.size, int(ffi.cast("unsigned long", buf)),
           "PTRACE_GET_RSEQ_CONFIGURATION")
    addr, size, sig, _flags, _pad = _RSEQ_CONF.unpack(bytes(ffi.buffer(buf, _RSEQ_CONF.size)))
    return addr, size, sig


SYS_GET_ROBUST_LIST = 274


def get_robust_list(pid):
    """(head, len) as set by set_robust_list in thread pid (needs ptrace access to it)."""
    head = ffi.new("unsigned long *")
    length = ffi.new("unsigned long *")
    _check(lib.cow_syscall6(SYS_GET_ROBUST_LIST, pid, int(ffi.cast("unsigned long", head)),
                            int(ffi.cast("unsigned long", length)), 0, 0, 0), "get_robust_list", pid)
    return head[0], length[0]
