"""The restorer program of one process: from its plan record to blob operations.

Order (each step depends on the previous ones):
  1. block every signal; tid address and robust list to 0 (they point into the
     TLS of cow-apply's copy, which goes away);
  2. the 64 dispositions as dumped;
  3. pipes, FIFOs, shared file descriptions and memfds: the inherited descriptions dup3'd
     to the dumped fd numbers; close every
     other fd (cow-apply's: the plan stream first), open the dumped files;
  4. unmap everything except the window, the blob region and the vDSO block;
  5. move the vDSO block ([vvar], [vvar_vclock], [vdso]) to the dumped address;
  6. every target VMA: pieces moved out of the window, or mapped fresh; then
     prot and madvise flags;
  7. the rest of the window goes; mm fields and exe (PR_SET_MM_MAP); file locks; comm, cwd, umask;
  8. tid address, robust list and rseq registration as dumped (they point into
     restored memory, so only now);
  9. rlimits, scheduler policy, nice, CPU affinity, personality, subreaper; every other
     thread, cloned with its tid, sets its own registrations and credentials and stops
     (the main thread waits); inheritable and bounding capabilities, keep-caps; groups,
     gids, uids; the dumped capability sets, ambient set and securebits; then pdeathsig,
     dumpable, no_new_privs;
 10. sigaltstack, pending signals (queued to itself; each thread queues its own), POSIX
     timers, interval timers.
The inherited rseq registration (glibc's, in cow-apply's TLS) is unregistered
by the agent just before it jumps here.
The registers, xstate and signal mask are set by cow-apply afterwards.
"""

import os
import struct

from stages.linux import tty

from . import caps as caps_mod
from . import restorer as R
from .addresses import TASK_SIZE
from .pipes import is_pipe_fd

PAGE = 4096
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x01, 0x02, 0x10, 0x20, 0x100
SYS_RT_SIGPROCMASK = 14
SYS_PRCTL, PR_SET_NAME = 157, 15
SYS_RSEQ = 334
SYS_DUP3 = 292
SYS_SIGALTSTACK, SYS_SETITIMER, SYS_RT_SIGQUEUEINFO, SYS_RT_TGSIGQUEUEINFO = 131, 38, 129, 297
SS_ONSTACK, SS_DISABLE = 1, 2
SYS_PRLIMIT64, SYS_SETPRIORITY, SYS_PERSONALITY, PRIO_PROCESS = 302, 141, 135, 0
SYS_SETGROUPS, SYS_SETRESGID, SYS_SETFSGID, SYS_SETRESUID, SYS_SETFSUID = 116, 119, 123, 117, 122
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
O_CLOEXEC = 0o2000000
SYS_FCNTL, F_SETFD, FD_CLOEXEC = 72, 2, 1
SYS_FLOCK, LOCK_SH, LOCK_EX, LOCK_NB = 73, 1, 2, 4
F_SETLK, F_OFD_SETLK, F_RDLCK, F_WRLCK = 6, 37, 0, 1
SYS_TIMER_CREATE, SYS_TIMER_SETTIME, PR_TIMER_CREATE_RESTORE_IDS = 222, 223, 77
SYS_SCHED_SETSCHEDULER, SYS_SCHED_SETAFFINITY = 144, 203
SIGKILL, SIGSTOP = 9, 19
MADVISE_FLAGS = {"dc": 10, "wf": 18, "hg": 14, "nh": 15, "dd": 16}  # smaps VmFlags -> MADV_*
NO_OPEN = os.O_CREAT | os.O_TRUNC | os.O_EXCL
MM_FIELDS = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
             "start_stack", "arg_start", "arg_end", "env_start", "env_end")
VDSO_KINDS = ("vvar", "vvar_vclock", "vdso")


def fd_gaps(keep, last=0xFFFFFFFF):
    """Inclusive [first, last] ranges of fd numbers not in keep, for close_range."""
    out, at = [], 0
    for fd in sorted(set(keep)):
        if fd > at:
            out.append((at, fd - 1))
        at = fd + 1
    if at <= last:
        out.append((at, last))
    return out


def complement(keep, low=0, high=TASK_SIZE):
    """Intervals of [low, high) not covered by keep."""
    out, at = [], low
    for a, b in sorted(keep):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < high:
        out.append((at, high))
    return out


def build(proc, ranges, window, blob_region, own_vdso, scratch, pipe_fds=None, is_root=False, shmem_fds=None,
          shmem_desc_fds=None):
    """Program for one plan process.  ranges: {id: range record} of the whole tree;
    window: (base, size); blob_region: (base, size); own_vdso: cow-apply's vDSO layout;
    scratch: an address range (start, size) free in the target layout for a two-step vDSO move;
    pipe_fds: {desc: fd} of the pipe descriptions cow-apply holds (stages.apply.pipes), all above
    every dumped fd number, inherited by every process; shmem_fds: {object id: fd} of the
    shared memory objects cow-apply holds (stages.apply.shmem), inherited the same way;
    shmem_desc_fds: {desc: fd} of the memfd open file descriptions, likewise."""
    prog = R.Program()
    image = proc["image"]
    base = window[0]

    prog.add(R.OP_SYSCALL, SYS_RT_SIGPROCMASK, 2, prog.struct(struct.pack("<Q", (1 << 64) - 1)), 0, 8)
    prog.add(R.OP_TID_ADDRESS, 0)
    prog.add(R.OP_ROBUST_LIST, 0, 24)

    for signo, (handler, flags, restorer, mask) in enumerate(image["sigactions"], start=1):
        if signo in (SIGKILL, SIGSTOP):
            continue
        prog.add(R.OP_SIGACTION, signo, handler, flags, restorer, mask)

    # pipes first: dup3 the inherited descriptions to the dumped numbers (sources lie above
    # every target), then close everything else (cow-apply's fds, the other descriptions)
    # file locks are taken after every fd and mapping is in place: closing any fd of a file
    # (close_range here, the restorer's mmap of it) drops the process's POSIX locks on it
    locks = []
    pipes = [fd for fd in image["fds"] if is_pipe_fd(fd)]
    for fd in pipes:
        prog.add(R.OP_SYSCALL, SYS_DUP3, (pipe_fds or {}).get(fd["desc"], -1), fd["fd"],
                 O_CLOEXEC if fd.get("cloexec") else 0)
        for kind, how, start, end in fd.get("locks", ()):
            if kind == "posix":  # flock and OFD locks are the description's: cow-apply took them
                locks.append((fd["fd"], kind, how, start, end))
    # memfds with a description id: the same way, from cow-apply's descriptions
    shmem_desc_fds = shmem_desc_fds or {}
    duped = [fd for fd in image["fds"] if "shmem" in fd and "desc" in fd]
    for fd in duped:
        prog.add(R.OP_SYSCALL, SYS_DUP3, shmem_desc_fds.get(fd["desc"], -1), fd["fd"],
                 O_CLOEXEC if fd.get("cloexec") else 0)
    # the shared memory objects stay open until the target VMAs are mapped (step 6)
    shmem_fds = shmem_fds or {}
    for first, last in fd_gaps([fd["fd"] for fd in pipes + duped] + list(shmem_fds.values())):
        prog.add(R.OP_CLOSE_RANGE, first, last)
    for fd in sorted(image["fds"], key=lambda f: f["fd"]):
        if is_pipe_fd(fd) or "shmem" in fd and "desc" in fd:
            continue
        path, flags = fd["path"], fd["flags"] & ~NO_OPEN
        if "shmem" in fd:  # a memfd without a description id: opened anew on its object
            path, flags = _object_path(shmem_fds, fd["shmem"]), flags & ~os.O_NOFOLLOW
        elif fd["kind"] == "tty":  # cow-collect's terminal goes onto cow-apply's (check.py: it has one)
            path, flags = tty.caller_terminal()[1], flags | os.O_NOCTTY
        prog.add(R.OP_OPEN_FD, fd["fd"], prog.string(path), flags,
                 fd.get("pos", 0) if fd["kind"] in ("file", "dir") else 0, 0)
        if fd["flags"] & O_CLOEXEC:  # the restorer's dup2 to the dumped number dropped it
            prog.add(R.OP_SYSCALL, SYS_FCNTL, fd["fd"], F_SETFD, FD_CLOEXEC)
        locks.extend((fd["fd"], *lock) for lock in fd.get("locks", ()))

    vdso_now = [(start, end) for _, start, end in own_vdso]
    keep = [(base, base + window[1]), (blob_region[0], blob_region[0] + blob_region[1])] + vdso_now
    for a, b in complement(keep):
        prog.add(R.OP_UNMAP, a, b - a)

    _move_vdso(prog, proc["layout"], own_vdso, scratch)

    for vma in proc["layout"]:
        _target_vma(prog, vma, ranges, base, shmem_fds)
    for fd in sorted(shmem_fds.values()):
        prog.add(R.OP_CLOSE_RANGE, fd, fd)

    prog.add(R.OP_UNMAP, base, window[1])

    mm = image["mm"]
    auxv = image["auxv"]
    aux_ref = prog.struct(auxv)
    mm_ref = prog.struct(struct.pack("<11Q", *(mm[name] for name in MM_FIELDS)) + b"\0" * 8 + struct.pack("<II", len(auxv), 0xFFFFFFFF))
    prog.patch(mm_ref, 11 * 8, aux_ref)  # struct prctl_mm_map.auxv
    exe = mm.get("exe_file") or image.get("exe")
    if exe and _same_file(exe, "/proc/self/exe"):
        # the kernel refuses to replace exe_file while the old one is mapped, and a
        # process restored from a fork of cow-apply (a python3) maps it: it is already right
        exe = None
    prog.add(R.OP_MM_MAP, mm_ref, 11 * 8 + 8 + 8, prog.string(exe) if exe else 0)
    for lock in locks:
        _lock(prog, *lock)
    prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_NAME, prog.string(image["comm"][:15]))
    if image.get("cwd"):
        prog.add(R.OP_CHDIR, prog.string(image["cwd"]))
    if "umask" in image:
        prog.add(R.OP_UMASK, image["umask"])

    # per-thread kernel pointers into restored memory, now that it is in place
    thread = image["threads"][0]
    _kernel_pointers(prog, thread)
    state = image.get("state") or {}
    _process_limits(prog, state)
    _threads(prog, proc["pid"], image["threads"][1:], state)
    _credentials(prog, state)
    _process_flags(prog, state, is_root)
    _signals_and_timers(prog, proc["pid"], thread, state)
    return prog


def _kernel_pointers(prog, thread):
    """tid address, robust list and rseq registration of the thread that runs these ops."""
    if thread.get("tid_address"):
        prog.add(R.OP_TID_ADDRESS, thread["tid_address"])
    head, length = thread.get("robust_list") or (0, 0)
    if head:
        prog.add(R.OP_ROBUST_LIST, head, length)
    rseq = thread.get("rseq")
    if rseq and rseq["addr"]:
        prog.add(R.OP_SYSCALL, SYS_RSEQ, rseq["addr"], rseq["len"], 0, rseq["sig"])


def _thread_ops(prog, thread):
    """What one thread sets for itself: its kernel pointers into restored memory and its
    alternate stack are per thread, and only the thread itself can set them."""
    _kernel_pointers(prog, thread)
    _sigaltstack(prog, thread)
    if "comm" in thread:
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_NAME, prog.string(thread["comm"][:15]))
    _scheduling(prog, thread)


def _scheduling(prog, fields):
    """Scheduler policy, nice and CPU affinity of the calling thread (all three are per
    thread; pid 0 is the caller), from a thread record or the process state."""
    if "sched" in fields:  # before nice: a change of policy may set it
        policy, priority = fields["sched"]
        prog.add(R.OP_SYSCALL, SYS_SCHED_SETSCHEDULER, 0, policy, prog.struct(struct.pack("<i", priority)))
    if "nice" in fields:
        prog.add(R.OP_SYSCALL, SYS_SETPRIORITY, PRIO_PROCESS, 0, fields["nice"])
    if fields.get("affinity"):
        mask = 0
        for cpu in fields["affinity"]:
            mask |= 1 << cpu
        size = max(8, (max(fields["affinity"]) // 64 + 1) * 8)
        prog.add(R.OP_SYSCALL, SYS_SCHED_SETAFFINITY, 0, size, prog.struct(mask.to_bytes(size, "little")))


def _threads(prog, pid, threads, state):
    """Every other thread, with its dumped tid (clone3 set_tid), once memory, limits, nice and
    personality are the dumped ones (a thread is born with those of the main thread), and
    before the credentials change (set_tid needs CAP_CHECKPOINT_RESTORE).  Each thread sets
    its own registrations and credentials (per thread in the kernel), then stops; the main
    thread waits for them all before it changes its own credentials and dumpable (another
    thread's uid change would reset dumpable afterwards)."""
    areas = []
    for thread in threads:
        areas.append(prog.thread(thread["tid"]))
        _thread_ops(prog, thread)
        _credentials(prog, state)
        if state.get("no_new_privs"):
            prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _thread_signals(prog, pid, thread)
        prog.end_thread()
    for area in areas:
        prog.add(R.OP_WAIT_THREAD, area)


def _thread_signals(prog, pid, thread):
    """A thread's own pending signals, queued by the thread to itself: the kernel takes a
    siginfo with any si_code (a tgkill's SI_TKILL too) only from the target thread itself.
    Every signal is blocked in the thread until cow-apply sets its dumped mask."""
    for info in thread.get("pending", ()):
        signo = struct.unpack_from("<i", info)[0]
        if signo not in (SIGKILL, SIGSTOP):
            prog.add(R.OP_SYSCALL, SYS_RT_TGSIGQUEUEINFO, pid, thread["tid"], signo, prog.struct(info))


def _lock(prog, fd, kind, how, start, end):
    """Take a dumped file lock again, never waiting: a conflict (the file locked by someone
    else since check.py looked) fails the restore."""
    if kind == "flock":
        prog.add(R.OP_SYSCALL, SYS_FLOCK, fd, (LOCK_EX if how == "write" else LOCK_SH) | LOCK_NB)
        return
    length = 0 if end is None else end - start + 1  # 0: to the end of the file, however it grows
    flock = struct.pack("<hh4xqqi4x", F_WRLCK if how == "write" else F_RDLCK, 0, start, length, 0)
    prog.add(R.OP_SYSCALL, SYS_FCNTL, fd, F_OFD_SETLK if kind == "ofdlck" else F_SETLK, prog.struct(flock))


def _signals_and_timers(prog, pid, thread, state):
    """The alternate signal stack, the pending signals (queued to itself with their dumped
    siginfo: the kernel takes any si_code only from the process itself; every signal is
    blocked here, the dumped mask is set by cow-apply at resume), then the POSIX timers
    (with their ids, PR_TIMER_CREATE_RESTORE_IDS) and the interval timers, last, so that
    they lose as little time as possible before the release.
    pid is the process's pid in its own namespace: the dumped one."""
    _sigaltstack(prog, thread)
    for info in thread.get("pending", ()):
        signo = struct.unpack_from("<i", info)[0]
        if signo not in (SIGKILL, SIGSTOP):
            prog.add(R.OP_SYSCALL, SYS_RT_TGSIGQUEUEINFO, pid, pid, signo, prog.struct(info))
    for info in state.get("pending", ()):
        signo = struct.unpack_from("<i", info)[0]
        if signo not in (SIGKILL, SIGSTOP):
            prog.add(R.OP_SYSCALL, SYS_RT_SIGQUEUEINFO, pid, signo, prog.struct(info))
    timers = state.get("posix_timers", ())
    if timers:  # with the dumped ids: the kernel takes the id from *timerid in this mode
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0)
        for t in reversed(timers):  # /proc/PID/timers lists the newest first: same order again
            event = struct.pack("<QiiI44x", t["sival"], t["signo"], t["notify"], pid)  # sigev_notify_thread_id
            prog.add(R.OP_SYSCALL, SYS_TIMER_CREATE, t["clock"], prog.struct(event), prog.struct(struct.pack("<i", t["id"])))
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0)
        for t in timers:
            if t["value"][2] or t["value"][3]:  # armed: what was left of it, relative
                prog.add(R.OP_SYSCALL, SYS_TIMER_SETTIME, t["id"], 0, prog.struct(struct.pack("<4q", *t["value"])), 0)
    for which, timer in enumerate(state.get("itimers", ())):
        if timer[2] or timer[3]:  # armed
            prog.add(R.OP_SYSCALL, SYS_SETITIMER, which, prog.struct(struct.pack("<4q", *timer)), 0)


def _sigaltstack(prog, thread):
    if thread.get("sigaltstack"):
        sp, flags, size = thread["sigaltstack"]
        flags &= ~SS_ONSTACK  # a state, not a setting
        if not flags & SS_DISABLE:
            prog.add(R.OP_SYSCALL, SYS_SIGALTSTACK, prog.struct(struct.pack("<QIiQ", sp, flags, 0, size)), 0)


def _process_limits(prog, state):
    """Limits, scheduler policy, nice, CPU affinity, personality and the subreaper flag,
    before the credentials: after setresuid to another user the process may have no
    capabilities left.  Threads cloned afterwards set their own (_thread_ops)."""
    for resource, (soft, hard) in enumerate(state.get("rlimits", ())):
        # raising a hard limit above cow-apply's needs CAP_SYS_RESOURCE: check.py refuses that first
        prog.add(R.OP_SYSCALL, SYS_PRLIMIT64, 0, resource, prog.struct(struct.pack("<QQ", soft, hard)), 0)
    _scheduling(prog, state)
    if "personality" in state:
        prog.add(R.OP_SYSCALL, SYS_PERSONALITY, state["personality"])
    if "subreaper" in state:
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_CHILD_SUBREAPER, int(state["subreaper"]))


def _credentials(prog, state):
    """Groups, gids, uids and capabilities of the calling thread (credentials are per thread
    in the kernel): capabilities around the uid change (stages.apply.caps: the bounding set
    and keep-caps before it, the dumped sets after it)."""
    caps = state.get("caps")
    mine = caps_mod.own() if caps else None
    if caps:
        caps_mod.before_uid_change(prog, caps, mine)
    if "groups" in state:
        groups = state["groups"]
        prog.add(R.OP_SYSCALL, SYS_SETGROUPS, len(groups), prog.struct(struct.pack(f"<{len(groups)}I", *groups) or b"\0"))
    if "gids" in state:
        rgid, egid, sgid, fsgid = state["gids"]
        prog.add(R.OP_SYSCALL, SYS_SETRESGID, rgid, egid, sgid)
        prog.add(R.OP_SYSCALL, SYS_SETFSGID, fsgid)
    if "uids" in state:
        ruid, euid, suid, fsuid = state["uids"]
        prog.add(R.OP_SYSCALL, SYS_SETRESUID, ruid, euid, suid)
        prog.add(R.OP_SYSCALL, SYS_SETFSUID, fsuid)
    if caps:
        caps_mod.after_uid_change(prog, caps, state.get("securebits", 0), mine)


def _process_flags(prog, state, is_root):
    """pdeathsig and dumpable after the credentials (a change of credentials resets them)."""
    # Every agent runs with pdeathsig SIGKILL (so a killed cow-apply takes the whole partial
    # tree with it); here it becomes the dumped value.  The root's parent (cow-apply, or the
    # namespace's init) is not the dumped one: its pdeathsig would fire when cow-apply exits,
    # so only processes below the root get theirs back.
    prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_PDEATHSIG, 0 if is_root else state.get("pdeathsig", 0))
    if state.get("dumpable") in (0, 1):  # 2 (suid_dumpable) cannot be set by prctl
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_DUMPABLE, state["dumpable"])
    if state.get("no_new_privs"):
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _same_file(a, b):
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _move_vdso(prog, layout, own_vdso, scratch):
    want = {v["kind"]: (v["start"], v["end"]) for v in layout if v["kind"] in VDSO_KINDS}
    have = {name.strip("[]"): (start, end) for name, start, end in own_vdso}
    moves = [(have[k], want[k]) for k in VDSO_KINDS if k in want and k in have and have[k] != want[k]]
    if not moves:
        return
    lo_have, hi_have = min(h[0] for h, _ in moves), max(h[1] for h, _ in moves)
    lo_want, hi_want = min(w[0] for _, w in moves), max(w[1] for _, w in moves)
    if lo_want < hi_have and lo_have < hi_want:
        # overlapping block: park it in the scratch hole first
        parked = []
        at = scratch[0]
        for (hs, he), w in moves:
            prog.add(R.OP_MREMAP, hs, he - hs, at)
            parked.append(((at, at + he - hs), w))
            at += he - hs
        moves = parked
    for (hs, he), (ws, _) in moves:
        prog.add(R.OP_MREMAP, hs, he - hs, ws)


def _object_path(shmem_fds, oid):
    # -1 (no such fd) only in the provisional programs that size the blob
    return f"/proc/self/fd/{shmem_fds.get(oid, -1)}"


def _target_vma(prog, vma, ranges, base, shmem_fds=None):
    start, end, kind = vma["start"], vma["end"], vma["kind"]
    if kind in VDSO_KINDS or kind == "vsyscall":
        return
    if "shmem" in vma:
        # the object cow-apply created, opened read-write so a later mprotect can add write
        prog.add(R.OP_MMAP, start, end - start, vma["prot"], MAP_SHARED | MAP_FIXED,
                 prog.string(_object_path(shmem_fds or {}, vma["shmem"])), vma["pgoff"], os.O_RDWR)
    elif vma["pieces"]:
        for range_id, range_page, npages, vma_page in vma["pieces"]:
            src = base + ranges[range_id]["offset"] + range_page * PAGE
            prog.add(R.OP_MREMAP, src, npages * PAGE, start + vma_page * PAGE)
        prog.add(R.OP_MPROTECT, start, end - start, vma["prot"])
    elif kind == "file":
        flags = (MAP_SHARED if vma["shared"] else MAP_PRIVATE) | MAP_FIXED
        writable_shared = vma["shared"] and vma["prot"] & PROT_WRITE
        prog.add(R.OP_MMAP, start, end - start, vma["prot"], flags, prog.string(vma["path"]), vma["pgoff"],
                 os.O_RDWR if writable_shared else os.O_RDONLY)
    else:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED
        if "gd" in vma["vmflags"]:
            flags |= MAP_GROWSDOWN
        prog.add(R.OP_MMAP, start, end - start, vma["prot"], flags, 0, 0, 0)
    for flag in vma["vmflags"]:
        if flag in MADVISE_FLAGS:
            prog.add(R.OP_MADVISE, start, end - start, MADVISE_FLAGS[flag])


def build_init(root_ns_pid, blob_region):
    """Program for the pid namespace's init: drop everything cow-apply's copy holds
    (memory, fds, handlers) and reap until the root exits."""
    prog = R.Program()
    prog.add(R.OP_SYSCALL, SYS_RT_SIGPROCMASK, 2, prog.struct(struct.pack("<Q", (1 << 64) - 1)), 0, 8)
    prog.add(R.OP_TID_ADDRESS, 0)
    prog.add(R.OP_ROBUST_LIST, 0, 24)
    for signo in range(1, 65):
        if signo not in (SIGKILL, SIGSTOP):
            prog.add(R.OP_SIGACTION, signo, 0, 0, 0, 0)  # SIG_DFL: pid 1 ignores what it does not handle
    prog.add(R.OP_CLOSE_RANGE, 0, 0xFFFFFFFF)
    for a, b in complement([(blob_region[0], blob_region[0] + blob_region[1])]):
        prog.add(R.OP_UNMAP, a, b - a)
    prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_NAME, prog.string("cow-init"))
    prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_PDEATHSIG, 0)  # it outlives cow-apply (see agent.c)
    prog.add(R.OP_SYSCALL, SYS_RT_SIGPROCMASK, 2, prog.struct(b"\0" * 8), 0, 8)
    prog.add(R.OP_REAP, root_ns_pid)
    return prog
