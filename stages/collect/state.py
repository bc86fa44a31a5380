"""Reading one frozen process: its /proc view (before refusals are decided), then its
registers, remote-syscall state and frame maps (for the records)."""

import os

from stages.linux import procfs, ptrace, remote
from stages.stream import pack_u32

O_CLOEXEC = 0o2000000


class ProcView:
    """What /proc says about one frozen process: enough to refuse it or to dump it."""

    def __init__(self, pid, tids):
        self.pid = pid
        self.tids = tids
        self.stat = procfs.read_stat(pid)
        self.status = procfs.read_status(pid)
        self.vmas = procfs.read_smaps(pid)
        self.fds = [procfs.describe_fd(pid, n) for n in procfs.fd_numbers(pid)]


def fd_record(fd):
    rec = {"fd": fd["fd"], "kind": fd["kind"], "path": fd.get("path"), "flags": fd["flags"],
           "pos": fd.get("pos", 0), "cloexec": bool(fd["flags"] & O_CLOEXEC)}
    for key in ("mode", "dev", "ino", "size"):
        if key in fd:
            rec[key] = fd[key]
    return rec


def thread_records(view):
    """Registers, mask, rseq and robust list of every thread (the process is single-threaded
    once refusals passed; the loop keeps the record honest if that changes)."""
    out = []
    for tid in view.tids:
        rec = {
            "tid": tid,
            "regs": ptrace.get_regs_raw(tid),
            "xstate": ptrace.get_xstate(tid),
            "sigmask": ptrace.get_sigmask(tid),
            "robust_list": list(ptrace.get_robust_list(tid)),
        }
        addr, size, sig = ptrace.get_rseq_configuration(tid)
        if addr:
            rec["rseq"] = {"addr": addr, "len": size, "sig": sig}
        out.append(rec)
    return out


def remote_state(view):
    """brk, the 64 sigactions and the tid address, by system calls run inside the process."""
    pid = view.pid
    addr = remote.find_syscall_insn(pid, view.vmas)
    rsp = ptrace.get_regs(pid)["rsp"]
    with remote.RemoteSyscalls(pid, addr) as rs:
        brk = remote.remote_brk(rs)
        sigactions = remote.remote_sigactions(rs, pid, rsp)
        tid_address = remote.remote_tid_address(rs, pid, rsp)
    if brk < 0:
        raise OSError(-brk, f"process {pid}: remote brk(0) failed: {os.strerror(-brk)}")
    return brk, sigactions, tid_address


def process_record(view, threads, brk, sigactions):
    pid, st = view.pid, view.stat
    exe = procfs.readlink(f"/proc/{pid}/exe")
    mm = {name: st[name] for name in procfs.STAT_MM_FIELDS}
    mm["brk"] = brk
    mm["exe_file"] = exe
    rec = {
        "pid": pid, "ppid": st["ppid"], "pgid": st["pgrp"], "sid": st["session"],
        "comm": st["comm"], "exe": exe,
        "threads": threads,
        "mm": mm,
        "auxv": procfs.read_auxv(pid),
        "sigactions": sigactions,
        "fds": [fd_record(fd) for fd in view.fds],
        "cwd": procfs.readlink(f"/proc/{pid}/cwd") or "/",
        "root": procfs.readlink(f"/proc/{pid}/root") or "/",
    }
    umask = view.status.get("Umask")
    if umask is not None:
        rec["umask"] = int(umask, 8)
    return rec


def vma_record(vma, frames):
    rec = {
        "start": vma["start"], "end": vma["end"], "prot": vma["prot"], "shared": vma["shared"],
        "pgoff": vma["pgoff"] if vma["kind"] == "file" else 0,
        "kind": vma["kind"], "path": vma["path"], "vmflags": vma["vmflags"],
        "frames": pack_u32(frames) if frames is not None else None,
    }
    if vma["kind"] == "file":
        rec["dev"], rec["ino"] = vma["dev"], vma["ino"]
    return rec
