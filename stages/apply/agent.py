"""Driving the native agents (native/helpers/agent.c) that restored processes run.

Every restored process starts as a clone of cow-apply that runs the agent
loop: it executes the commands cow-apply writes to its pipe and answers with
one word.  cow-apply creates one pair of pipes per process up front, so every
agent forked later already holds its own ends.
"""

import os
import struct

from stages._native import ffi, lib
from stages.linux import procfs

AGENT_SYSCALL, AGENT_FORK, AGENT_ENTER, AGENT_REAP = 1, 2, 3, 4
CMD = struct.Struct("<8q")
REPLY = struct.Struct("<q")
CLONE_NEWPID = 0x20000000

SYS_MMAP, SYS_MUNMAP, SYS_OPEN, SYS_CLOSE = 9, 11, 2, 3
SYS_SETPGID, SYS_SETSID, SYS_GETPGID = 109, 112, 121


class AgentError(OSError):
    pass


class Channel:
    """The two pipes of one future process: commands in, results out."""

    def __init__(self):
        self.cmd_r, self.cmd_w = os.pipe()
        self.reply_r, self.reply_w = os.pipe()

    def fds(self):
        return (self.cmd_r, self.cmd_w, self.reply_r, self.reply_w)

    def close(self):
        for fd in self.fds():
            try:
                os.close(fd)
            except OSError:
                pass


class Agent:
    """One live agent process, seen from cow-apply."""

    def __init__(self, pid, channel, ns_pid=None):
        self.pid = pid  # as cow-apply sees it
        self.ns_pid = ns_pid or pid  # as its own pid namespace sees it
        self.channel = channel

    def _call(self, op, nr=0, *args):
        args = [a & 0xFFFFFFFFFFFFFFFF for a in args] + [0] * (6 - len(args))
        args = [a - (1 << 64) if a >> 63 else a for a in args]
        os.write(self.channel.cmd_w, CMD.pack(op, nr, *args))
        data = b""
        while len(data) < REPLY.size:
            chunk = os.read(self.channel.reply_r, REPLY.size - len(data))
            if not chunk:
                raise AgentError(f"process {self.pid}: agent died")
            data += chunk
        return REPLY.unpack(data)[0]

    def syscall(self, nr, *args, what=None):
        r = self._call(AGENT_SYSCALL, nr, *args)
        if r < 0:
            raise AgentError(-r, f"process {self.pid}: {what or f'syscall {nr}'}: {os.strerror(-r)}")
        return r

    def fork(self, ns_pid, channel):
        """Fork a child with pid ns_pid (in this agent's pid namespace); returns its pid there."""
        r = self._call(AGENT_FORK, 0, ns_pid, channel.cmd_r, channel.reply_w)
        if r < 0:
            raise AgentError(-r, f"process {self.pid}: fork of pid {ns_pid}: {os.strerror(-r)}")
        return r

    def enter(self, entry, argument, stack_top):
        self._call(AGENT_ENTER, 0, entry, argument, stack_top)

    def reap(self, root_ns_pid):
        self._call(AGENT_REAP, 0, root_ns_pid)

    def mmap(self, addr, length, prot, flags, fd=-1, offset=0):
        r = self.syscall(SYS_MMAP, addr, length, prot, flags, fd, offset, what=f"mmap {addr:#x}+{length:#x}")
        if r != addr and flags & 0x10:  # MAP_FIXED asked for this address
            raise AgentError(f"process {self.pid}: mmap at {addr:#x} landed at {r:#x}")
        return r

    def scratch_write(self, blob):
        """Copy blob into the agent's scratch buffer; returns its address there."""
        if len(blob) > lib.cow_agent_buf_size():
            raise AgentError(f"process {self.pid}: {len(blob)} bytes do not fit the agent scratch")
        addr = scratch_addr()
        vm_write(self.pid, addr, blob)
        return addr

    def open(self, path, flags):
        addr = self.scratch_write(os.fsencode(path) + b"\0")
        return self.syscall(SYS_OPEN, addr, flags | os.O_CLOEXEC, 0, what=f"open {path}")

    def close(self, fd):
        self.syscall(SYS_CLOSE, fd)


def scratch_addr():
    return int(ffi.cast("unsigned long", lib.cow_agent_buf_addr()))


def vm_write(pid, addr, blob):
    buf = ffi.from_buffer(blob)
    n = lib.cow_process_vm_writev(pid, buf, len(blob), addr)
    if n < 0:
        raise AgentError(-n, f"process {pid}: process_vm_writev at {addr:#x}: {os.strerror(-n)}")
    if n != len(blob):
        raise AgentError(f"process {pid}: short process_vm_writev at {addr:#x}")


def vm_read(pid, addr, length):
    buf = ffi.new("char[]", length)
    n = lib.cow_process_vm_readv(pid, buf, length, addr)
    if n < 0:
        raise AgentError(-n, f"process {pid}: process_vm_readv at {addr:#x}: {os.strerror(-n)}")
    return bytes(ffi.buffer(buf, n))


def spawn(channel, set_tid=None, new_pidns=False):
    """clone3 an agent from cow-apply itself; returns its pid (in cow-apply's namespace)."""
    tids = ffi.new("int[]", [set_tid] if set_tid else [0])
    flags = CLONE_NEWPID if new_pidns else 0
    r = lib.cow_agent_spawn(flags, tids, 1 if set_tid else 0, channel.cmd_r, channel.reply_w)
    if r < 0:
        what = f"pid {set_tid}" if set_tid else "a new pid namespace" if new_pidns else "a process"
        raise AgentError(-r, f"clone3 of {what}: {os.strerror(-r)}")
    return r


def ns_pid_of(pid):
    """The pid of `pid` in its innermost pid namespace (NSpid of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return pid


def outer_pid_of(parent_pid, ns_pid):
    """The outer pid of the child of parent_pid whose innermost pid is ns_pid."""
    for child in procfs.children(parent_pid):
        if ns_pid_of(child) == ns_pid:
            return child
    raise AgentError(f"process {parent_pid}: no child with pid {ns_pid} in its namespace")
