"""Reading one frozen process: its /proc view (before refusals are decided), then its
registers, remote-syscall state and frame maps (for the records)."""

import errno
import os
import signal
import struct

from stages.linux import batch, procfs, ptrace, remote
from stages.linux.memory import ProcessMemory
from stages.stream import pack_u32

from .refusals import parse_lock, timer_notify

O_CLOEXEC = 0o2000000


class ProcView:
    """What /proc says about one frozen process: enough to refuse it or to dump it."""

    def __init__(self, pid, tids):
        self.pid = pid
        self.tids = tids
        self.stat = procfs.read_stat(pid)
        self.status = procfs.read_status(pid)
        self.vmas = procfs.read_smaps(pid)
        procfs.resolve_file_vmas(pid, self.vmas)  # exact names, and which files are deleted
        self.fds = [procfs.describe_fd(pid, n) for n in procfs.fd_numbers(pid)]
        self._syscall_addr = None

    @property
    def syscall_addr(self):
        """Where the process has a ``syscall`` instruction, for every remote call into any of
        its threads (found once: the tree is frozen)."""
        if self._syscall_addr is None:
            self._syscall_addr = remote.find_syscall_insn(self.pid, self.vmas)
        return self._syscall_addr


def fd_record(fd, pipe_fields=None):
    # a FIFO stays "fifo", with its path; cow-collect's terminal becomes "tty" (onto cow-apply's)
    kind = "pipe" if is_pipe(fd) else "tty" if fd.get("caller_tty") else fd["kind"]
    rec = {"fd": fd["fd"], "kind": kind, "path": fd.get("path"), "flags": fd["flags"],
           "pos": fd.get("pos", 0), "cloexec": bool(fd["flags"] & O_CLOEXEC)}
    for key in ("mode", "dev", "ino", "size"):
        if key in fd:
            rec[key] = fd[key]
    if pipe_fields:
        rec.update(pipe_fields)
    locks = [parse_lock(lock) for lock in fd.get("locks", ())]
    if locks:  # refusals passed: every one parses
        rec["locks"] = locks
    return rec


def thread_records(view):
    """Registers, mask, rseq and robust list of every thread, main thread first (the tid
    address and alternate stack need the thread itself: remote_thread_state)."""
    out = []
    for tid in sorted(view.tids, key=lambda t: (t != view.pid, t)):
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
        stat = procfs.read_stat(f"{view.pid}/task/{tid}")
        rec["comm"], rec["nice"] = stat["comm"], stat["nice"]
        if tid != view.pid:  # the main thread's are the process's (process_state)
            rec["sched"] = [os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority]
            rec["affinity"] = sorted(os.sched_getaffinity(tid))
        out.append(rec)
    return out


def remote_state(view, notes=None):
    """brk, the 64 sigactions and the tid address (returned), and prctl values, interval
    timers, alternate stack and POSIX timers (on view): by system calls run inside the
    process, all in one stop (stages/linux/batch.py)."""
    pid = view.pid
    rsp = ptrace.get_regs(pid)["rsp"]
    timers = procfs.parse_timers(procfs.read_text(f"/proc/{pid}/timers"))
    calls = batch.Calls()
    brk = calls.add(remote.SYS_BRK, 0)
    acts = [calls.add(remote.SYS_RT_SIGACTION, sig, 0, batch.OUT, 8, out=remote.SIGACTION.size)
            for sig in range(1, 65)]
    tid_address, altstack = _add_thread_calls(calls)
    prctl_ints = {name: calls.add(remote.SYS_PRCTL, option, batch.OUT, 0, 0, 0, out=8)
                  for name, option in (("subreaper", remote.PR_GET_CHILD_SUBREAPER),
                                       ("pdeathsig", remote.PR_GET_PDEATHSIG))}
    prctl_values = {name: calls.add(remote.SYS_PRCTL, option, 0, 0, 0, 0)
                    for name, option in (("dumpable", remote.PR_GET_DUMPABLE),
                                         ("securebits", remote.PR_GET_SECUREBITS))}
    itimers = [calls.add(remote.SYS_GETITIMER, which, batch.OUT, out=remote.ITIMERVAL.size) for which in range(3)]
    timer_times = [calls.add(remote.SYS_TIMER_GETTIME, t["id"], batch.OUT, out=remote.ITIMERVAL.size) for t in timers]
    with remote.RemoteSyscalls(pid, view.syscall_addr) as rs:
        calls.run(rs, rsp, notes)

    def ok(i, what):
        return _checked(calls, i, pid, what)

    sigactions = []
    for sig, i in enumerate(acts, 1):
        res = calls.result(i)
        if res < 0 and (sig in (signal.SIGKILL, signal.SIGSTOP) or res == -errno.EINVAL):  # 32/33: glibc's
            sigactions.append([0, 0, 0, 0])
            continue
        ok(i, f"rt_sigaction({sig})")
        sigactions.append(list(remote.SIGACTION.unpack(calls.output(i))))
    view.prctl = {}  # read by process_record
    for name, i in prctl_ints.items():
        ok(i, f"prctl({name})")
        view.prctl[name] = struct.unpack_from("<i", calls.output(i))[0]
    view.prctl["subreaper"] = bool(view.prctl["subreaper"])
    for name, i in prctl_values.items():
        view.prctl[name] = ok(i, f"prctl({name})")
    view.itimers = []
    for which, i in enumerate(itimers):
        ok(i, f"getitimer({which})")
        view.itimers.append(list(remote.ITIMERVAL.unpack(calls.output(i))))
    view.sigaltstack = _sigaltstack(calls, altstack, pid)
    view.posix_timers = []
    for t, i in zip(timers, timer_times):
        ok(i, f"timer_gettime({t['id']})")
        view.posix_timers.append({"id": t["id"], "clock": t["clock"], "signo": t["signo"], "sival": t["sival"],
                                  "notify": timer_notify(t), "value": list(remote.ITIMERVAL.unpack(calls.output(i)))})
    res = calls.result(brk)
    if res < 0:
        raise OSError(-res, f"process {pid}: remote brk(0) failed: {os.strerror(-res)}")
    return res, sigactions, _tid_address(calls, tid_address, pid)


def _add_thread_calls(calls):
    """The calls of what is per thread (tid address, alternate stack): their indexes."""
    return (calls.add(remote.SYS_PRCTL, remote.PR_GET_TID_ADDRESS, batch.OUT, 0, 0, 0, out=8),
            calls.add(remote.SYS_SIGALTSTACK, 0, batch.OUT, out=remote.STACK_T.size))


def _checked(calls, i, tid, what):
    res = calls.result(i)
    if res < 0:
        raise remote.RemoteError(f"process {tid}: {what} failed: {os.strerror(-res)}")
    return res


def _tid_address(calls, i, tid):
    _checked(calls, i, tid, "prctl(PR_GET_TID_ADDRESS)")
    return struct.unpack("<Q", calls.output(i))[0]


def _sigaltstack(calls, i, tid):
    """[sp, flags, size] of the thread's alternate signal stack."""
    _checked(calls, i, tid, "sigaltstack")
    sp, flags, _pad, size = remote.STACK_T.unpack(calls.output(i))
    return [sp, flags & 0xFFFFFFFF, size]


def remote_thread_state(view, tid):
    """(tid address, sigaltstack) of one thread other than the main one: both are per thread
    and only the thread itself can read them, so the calls run in that thread (one remote
    call each: for two calls, cheaper than setting the batch's loop up)."""
    rsp = ptrace.get_regs(tid)["rsp"]
    calls = batch.Calls()
    tid_address, altstack = _add_thread_calls(calls)
    with remote.RemoteSyscalls(tid, view.syscall_addr) as rs:
        calls.run_each(rs, rsp)
    return _tid_address(calls, tid_address, tid), _sigaltstack(calls, altstack, tid)


RSEQ_CS = struct.Struct("<IIQQQ")  # struct rseq_cs: version, flags, start_ip, post_commit_offset, abort_ip


def abort_rseq_sections(view):
    """Every thread stopped inside an rseq critical section is moved to the section's abort
    handler now, before anything else runs in the tree (the kernel does the same on the
    thread's next return to user space, after a preemption or a stop like ours).

    Needed before our remote system calls: the kernel would see the thread return to user
    space outside the section (at our syscall instruction), clear the section pointer, and
    the thread, put back in the section afterwards, could never be aborted again.  The
    dumped registers are then the aborted ones, and the restored thread starts there."""
    for tid in view.tids:
        addr, _size, _sig = ptrace.get_rseq_configuration(tid)
        if not addr:
            continue
        regs = ptrace.get_regs(tid)
        with ProcessMemory(view.pid, write=True) as mem:
            cs = struct.unpack("<Q", mem.read(addr + 8, 8))[0]
            if not cs:
                continue
            _version, _flags, start, length, abort = RSEQ_CS.unpack(mem.read(cs, RSEQ_CS.size))
            if start <= regs["rip"] < start + length:
                regs["rip"] = abort
                ptrace.set_regs(tid, regs)
                mem.write(addr + 8, bytes(8))  # rseq_cs = NULL, as the kernel leaves it


def process_record(view, threads, brk, sigactions, pipes=None):
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
        "fds": [fd_record(fd, pipes.fd_fields.get((pid, fd["fd"])) if pipes else None) for fd in view.fds],
        "cwd": procfs.readlink(f"/proc/{pid}/cwd") or "/",
        "root": procfs.readlink(f"/proc/{pid}/root") or "/",
    }
    if pipes and pid in pipes.records:
        rec["pipes"] = pipes.records[pid]
    rec["state"] = process_state(view)
    if hasattr(view, "sigaltstack"):
        threads[0]["sigaltstack"] = view.sigaltstack
    for thread in threads:
        thread["pending"] = remote.pending_siginfos(thread["tid"], shared=False)
    umask = view.status.get("Umask")
    if umask is not None:
        rec["umask"] = int(umask, 8)
    return rec


RLIMIT_NLIMITS = 16
CAP_SETS = (("effective", "CapEff"), ("permitted", "CapPrm"), ("inheritable", "CapInh"),
            ("bounding", "CapBnd"), ("ambient", "CapAmb"))


def process_state(view):
    """Credentials and capabilities, rlimits, nice, scheduler policy and CPU affinity,
    oom_score_adj, personality and prctl flags of one frozen process."""
    pid, status = view.pid, view.status
    ids = lambda key: [int(x) for x in status[key].split()]  # noqa: E731 (real, effective, saved, fs)
    state = {
        "uids": ids("Uid"), "gids": ids("Gid"), "groups": ids("Groups") if status.get("Groups") else [],
        "rlimits": procfs.read_limits(pid)[:RLIMIT_NLIMITS],
        "nice": view.stat["nice"],
        "no_new_privs": status.get("NoNewPrivs", "0") != "0",
        "personality": int(procfs.read_text(f"/proc/{pid}/personality").strip(), 16),
    }
    state["caps"] = {name: int(status[key], 16) for name, key in CAP_SETS}
    state.update(getattr(view, "prctl", {}))  # securebits among them
    state["oom_score_adj"] = int(procfs.read_text(f"/proc/{pid}/oom_score_adj"))
    state["sched"] = [os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority]
    state["affinity"] = sorted(os.sched_getaffinity(pid))
    if hasattr(view, "itimers"):
        state["itimers"] = view.itimers
    if getattr(view, "posix_timers", None):
        state["posix_timers"] = view.posix_timers
    state["pending"] = remote.pending_siginfos(pid, shared=True)
    return state


def vma_record(vma, frames, pid=None):
    rec = {
        "start": vma["start"], "end": vma["end"], "prot": vma["prot"], "shared": vma["shared"],
        "pgoff": vma["pgoff"] if vma["kind"] == "file" else 0,
        "kind": vma["kind"], "path": vma["path"], "vmflags": vma["vmflags"],
        "frames": pack_u32(frames) if frames is not None else None,
    }
    if vma["kind"] == "file":
        rec["dev"], rec["ino"] = vma["dev"], vma["ino"]
        if pid is not None:
            # the mapped file itself (map_files follows it even when the path moved), so apply
            # can refuse a file truncated or rewritten in place since the dump
            try:
                st = os.stat(f"/proc/{pid}/map_files/{vma['start']:x}-{vma['end']:x}")
            except OSError:
                pass
            else:
                rec["size"], rec["mtime"] = st.st_size, st.st_mtime_ns
    return rec


# -- pipes between processes of the tree ------------------------------------------------------

PIPE_PREFIX = "pipe:["
O_ACCMODE, O_NONBLOCK = 3, 0o4000
SYS_TEE, SYS_KCMP, KCMP_FILE = 276, 312, 0
SPLICE_F_NONBLOCK = 2
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
FIONREAD = 0x541B


def is_pipe(fd):
    """An anonymous pipe (pipe:[N]); a FIFO has a path and is not one."""
    return fd["kind"] == "fifo" and (fd.get("path") or "").startswith(PIPE_PREFIX)


def is_fifo(fd):
    """A named pipe: an fd of kind fifo that has a path."""
    return fd["kind"] == "fifo" and not is_pipe(fd)


def pipe_key(fd):
    """What identifies the pipe behind fd: its inode for an anonymous pipe, (dev, inode)
    of the FIFO file for a named one."""
    return fd["ino"] if is_pipe(fd) else (fd["dev"], fd["ino"])


def pipe_holders(views):
    """{pipe key: [(pid, fd), ...]} over the tree (pipes and FIFOs), in tree order."""
    out = {}
    for view in views:
        for fd in view.fds:
            if fd["kind"] == "fifo":
                out.setdefault(pipe_key(fd), []).append((view.pid, fd["fd"]))
    return out


def pipe_links(views):
    """{fd link text: pipe key} of every pipe and FIFO fd of the tree ("pipe:[N]", or the
    FIFO's path)."""
    return {fd["path"]: pipe_key(fd) for view in views for fd in view.fds if fd["kind"] == "fifo"}


def pipes_held_outside(tree_pids, links):
    """{pipe key: a pid outside the tree that holds it}, for the links given (pipe_links).

    A pipe is the tree's only if no other process has an fd on it: every fd link
    of every other process is read (cheap next to reading the tree's memory).  A FIFO
    is matched by its path."""
    want = links
    found = {}
    if not want:
        return found
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in tree_pids:
            continue
        pid = int(name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or a zombie
            continue
        for n in fds:
            ino = want.get(procfs.readlink(f"/proc/{pid}/fd/{n}") or "")
            if ino is not None and ino not in found and pid != me:
                found[ino] = pid
    return found


def _kcmp_file(pid1, fd1, pid2, fd2):
    from stages._native import lib

    r = lib.cow_syscall6(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2, 0)
    if r < 0:
        raise OSError(-r, f"kcmp of process {pid1} fd {fd1} and process {pid2} fd {fd2}: {os.strerror(-r)}")
    return r


def pipe_contents(pid, fd):
    """(capacity, unread bytes) of the pipe at fd of pid, read without consuming them:
    tee() duplicates the pipe's buffers into a pipe of ours of the same capacity."""
    import fcntl
    import struct

    from stages._native import lib

    src = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(src, F_GETPIPE_SZ)
        unread = struct.unpack("i", fcntl.ioctl(src, FIONREAD, b"\0\0\0\0"))[0]
        if not unread:
            return size, b""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
            n = lib.cow_syscall6(SYS_TEE, src, w, unread, SPLICE_F_NONBLOCK, 0, 0)
            if n < 0:
                raise OSError(-n, f"process {pid}: tee of the pipe at fd {fd}: {os.strerror(-n)}")
            if n != unread:  # tee always starts at the head: a second call would not continue
                raise OSError(f"process {pid}: tee copied {n} of {unread} unread bytes of the pipe at fd {fd}")
            data = b""
            while len(data) < n:
                data += os.read(r, n - len(data))
            return size, data
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(src)


class PipeTable:
    """Pipes and FIFOs of the frozen tree: a dense id per pipe, a dense id per open file
    description (kcmp: fds that share one, after fork or dup, share O_NONBLOCK), and the
    unread bytes, recorded once, in the first process (stream order) that holds the pipe;
    then desc ids for regular files whose description is shared."""

    def __init__(self, views):
        self.fd_fields = {}  # (pid, fd) -> {"pipe": id, "desc": id}
        self.records = {}  # pid -> [{"id", "size", "data"}]
        desc_ids = 0
        fifo_paths = {pipe_key(fd): fd["path"] for view in views for fd in view.fds if is_fifo(fd)}
        for pipe_id, (key, holders) in enumerate(pipe_holders(views).items(), start=1):
            reps = []  # (pid, fd, desc id): one per open file description of this pipe
            for pid, fd in holders:
                desc = next((d for p, f, d in reps if _kcmp_file(p, f, pid, fd) == 0), None)
                if desc is None:
                    desc_ids += 1
                    desc = desc_ids
                    reps.append((pid, fd, desc))
                self.fd_fields[(pid, fd)] = {"pipe": pipe_id, "desc": desc}
            size, data = pipe_contents(*holders[0])
            rec = {"id": pipe_id, "size": size, "data": data}
            if key in fifo_paths:
                rec["path"] = fifo_paths[key]
            self.records.setdefault(holders[0][0], []).append(rec)
        self._shared_files(views, desc_ids)

    def _shared_files(self, views, desc_ids):
        """Regular files whose open file description two or more fds share (after fork or
        dup) get a desc id too (after the pipes'): apply makes them one description again,
        with its offset shared and its flock/OFD locks."""
        files = {}
        for view in views:
            for fd in view.fds:
                # memfds and deleted tmpfs files are shared memory objects (shmem.py): their
                # descriptions get ids there
                if fd["kind"] == "file" and not fd.get("deleted"):
                    files.setdefault((fd["dev"], fd["ino"]), []).append((view.pid, fd["fd"]))
        for holders in files.values():
            groups = []  # [(pid, fd), ...] per description
            for pid, fd in holders if len(holders) > 1 else ():
                group = next((g for g in groups if _kcmp_file(*g[0], pid, fd) == 0), None)
                if group is None:
                    groups.append([(pid, fd)])
                else:
                    group.append((pid, fd))
            for group in groups:
                if len(group) > 1:
                    desc_ids += 1
                    for member in group:
                        self.fd_fields[member] = {"desc": desc_ids}
