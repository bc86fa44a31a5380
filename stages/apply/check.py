"""Everything cow-apply checks before it creates a process.

Each check raises Refusal with a message for ``cow-apply: <reason>``.
"""

import importlib
import os
import time

from stages.linux import procfs, tty
from stages.linux import vdso as vdso_mod

from . import caps as caps_mod
from .pipes import is_shared_file

SUPPORTED_FD_KINDS = {"file", "chr", "dir", "pipe", "fifo", "tty"}
SUPPORTED_VMA_KINDS = {"anon", "file", "heap", "stack", "vdso", "vvar", "vvar_vclock", "vsyscall"}


class Refusal(Exception):
    pass


def check_plan(plan, pidns=False, pid_wait=3.0):
    check_header(plan.header)
    check_vdso(plan.header["vdso"])
    check_semantics(plan)
    for proc in plan.processes:
        check_process(proc)
    check_pipes(plan)
    check_shared(plan)
    check_state(plan)
    check_files(plan)
    check_tids_unique(plan)
    check_pid_max([t["tid"] for p in plan.processes for t in p["image"]["threads"]])
    if pidns:
        if any(t["tid"] == 1 for p in plan.processes for t in p["image"]["threads"]):
            raise Refusal("the plan has a pid 1: --pidns needs pid 1 for its own init")
    if not pidns:
        check_pids_free([t["tid"] for p in plan.processes for t in p["image"]["threads"]], pid_wait)
    check_locks(plan, pid_wait)


def check_header(header):
    machine = os.uname().machine
    if header["arch"] != machine:
        raise Refusal(f"the plan is for {header['arch']}, this machine is {machine}")
    if header["page_size"] != os.sysconf("SC_PAGE_SIZE"):
        raise Refusal(f"the plan's page size {header['page_size']} is not this machine's")


def check_vdso(want):
    have = vdso_mod.own_identity()
    sizes = lambda layout: [(name, end - start) for name, start, end in layout]  # noqa: E731
    if sizes(want["layout"]) != sizes(have["layout"]):
        raise Refusal(f"vDSO layout differs: plan {sizes(want['layout'])}, this kernel {sizes(have['layout'])}")
    for layout in (want["layout"], have["layout"]):
        for (_, _, end), (_, start, _) in zip(layout, layout[1:]):
            if end != start:
                raise Refusal("vDSO areas are not adjacent: cannot move them as one block")
    if want["sha256"] != have["sha256"]:
        raise Refusal("the vDSO of this kernel differs from the dumped one (sha256): restore on the same kernel")
    if want.get("symbols") and sorted(map(tuple, want["symbols"])) != sorted(map(tuple, have["symbols"])):
        raise Refusal("the vDSO symbols of this kernel differ from the dumped ones")


def check_semantics(plan):
    """The plan stage's semantic validator (tree, window, ranges, steps, layouts)."""
    try:
        validate = importlib.import_module("stages.plan.validate")
    except ImportError as exc:
        raise Refusal(f"the plan validator (stages.plan.validate) is not available: {exc}")
    try:
        validate.validate_plan(plan.header, plan.processes, range(1, plan.frames + 1))
    except validate.PlanInvalid as exc:
        raise Refusal(f"invalid plan: {exc}")


def check_process(proc):
    image = proc["image"]
    pid = proc["pid"]
    tids = [t["tid"] for t in image["threads"]]
    if not tids or tids[0] != pid:
        raise Refusal(f"process {pid}: its first thread must be the main thread (tid {pid}), not {tids[:1]}")
    for fd in image["fds"]:
        if fd["kind"] in ("pipe", "fifo"):
            if "pipe" not in fd or "desc" not in fd:
                raise Refusal(f"process {pid}: fd {fd['fd']} is a pipe without pipe/desc ids")
            continue
        if fd["kind"] not in SUPPORTED_FD_KINDS or not (fd.get("path") or "").startswith("/"):
            raise Refusal(f"process {pid}: fd {fd['fd']} ({fd['kind']} {fd.get('path')}) cannot be restored yet")
    for vma in proc["layout"]:
        where = f"process {pid}: VMA {vma['start']:#x}-{vma['end']:#x}"
        if vma["kind"] not in SUPPORTED_VMA_KINDS:
            raise Refusal(f"{where} ({vma['kind']} {vma.get('path')}) cannot be restored")
        if vma["shared"] and vma["kind"] != "file" and "shmem" not in vma:
            raise Refusal(f"{where}: shared anonymous memory without its object cannot be restored")


def check_shared(plan):
    """Every VMA and fd naming a shared memory object names one the plan holds."""
    shared = getattr(plan, "shared", None) or {}
    descs = {}  # memfd description -> object
    for proc in plan.processes:
        pid = proc["pid"]
        for vma in proc["layout"]:
            oid = vma.get("shmem")
            if oid is None:
                continue
            where = f"process {pid}: VMA {vma['start']:#x}-{vma['end']:#x}"
            if oid not in shared:
                raise Refusal(f"{where}: shared memory object {oid} is not in the plan")
            if not vma["shared"] or vma["pieces"] or vma["pgoff"] % 4096:
                raise Refusal(f"{where}: maps shared memory object {oid} but is private, has pieces "
                              "or an unaligned offset")
        for fd in proc["image"]["fds"]:
            if "shmem" not in fd:
                continue
            if fd["shmem"] not in shared:
                raise Refusal(f"process {pid}: fd {fd['fd']}: shared memory object {fd['shmem']} is not in the plan")
            if "desc" in fd and descs.setdefault(fd["desc"], fd["shmem"]) != fd["shmem"]:
                raise Refusal(f"process {pid}: fd {fd['fd']}: description {fd['desc']} is of two objects")
    pipe_descs = {fd["desc"] for p in plan.processes for fd in p["image"]["fds"] if fd["kind"] == "pipe"}
    if pipe_descs & set(descs):
        raise Refusal(f"description {min(pipe_descs & set(descs))} is of a pipe and of a memfd")


CAP_SYS_RESOURCE, CAP_SYS_NICE = 24, 23
F_OFD_GETLK = 36
RLIMIT_NAMES = ("CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK", "AS",
                "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME")


def _has_cap(bit):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def check_state(plan):
    """Credentials: root (euid 0) may restore processes of any user; any other caller only
    processes whose every uid and gid is its own and whose groups are its own, since the
    restorer's setresuid/setresgid/setgroups could not do more.  Limits: a hard limit above
    cow-apply's own needs CAP_SYS_RESOURCE (which root may lack, in a container)."""
    import resource

    euid = os.geteuid()
    mine_u, mine_g = set(os.getresuid()), set(os.getresgid())
    mine_groups = set(os.getgroups()) | mine_g
    can_raise = _has_cap(CAP_SYS_RESOURCE)
    mine_caps = caps_mod.own()
    with open("/proc/self/oom_score_adj") as f:
        own_oom = int(f.read())
    own_cpus = os.sched_getaffinity(0)
    for proc in plan.processes:
        state = proc["image"].get("state") or {}
        pid = proc["pid"]
        if euid != 0:
            uids, gids = set(state.get("uids", ())), set(state.get("gids", ()))
            if not uids <= mine_u or not gids <= mine_g or not set(state.get("groups", ())) <= mine_groups:
                raise Refusal(f"process {pid}: uids {state.get('uids')} gids {state.get('gids')} groups "
                              f"{state.get('groups')}: only root may restore credentials other than its own")
        why = state_refusal(state, mine_caps, own_oom, own_cpus)
        if why:
            raise Refusal(f"process {pid}: {why}")
        for thread in proc["image"]["threads"][1:]:
            sched = {key: thread[key] for key in ("sched", "affinity") if key in thread}
            why = state_refusal(sched, mine_caps, own_oom, own_cpus) if sched else None
            if why:
                raise Refusal(f"process {pid}: thread {thread['tid']}: {why}")
        if not can_raise:
            for res, (soft, hard) in enumerate(state.get("rlimits", ())):
                have = resource.getrlimit(res)[1] & 0xFFFFFFFFFFFFFFFF
                if hard > have:
                    name = RLIMIT_NAMES[res] if res < len(RLIMIT_NAMES) else str(res)
                    raise Refusal(f"process {pid}: hard limit RLIMIT_{name} {hard} is above cow-apply's {have} "
                                  "(raising it needs CAP_SYS_RESOURCE)")


SCHED_FIFO, SCHED_RR, SCHED_RESET_ON_FORK = 1, 2, 0x40000000
SCHED_POLICIES = {0, 1, 2, 3, 5}  # OTHER, FIFO, RR, BATCH, IDLE


def _restores_timer_ids():
    """Whether the kernel creates a POSIX timer with a given id (PR_TIMER_CREATE_RESTORE_IDS_GET)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(77, 2, 0, 0, 0) >= 0


def state_refusal(state, mine_caps, own_oom, own_cpus):
    """Capabilities (stages.apply.caps.refusal), scheduler policy, CPU affinity and
    oom_score_adj the restorer could not set as the caller: why not, or None."""
    if state.get("caps"):
        why = caps_mod.refusal(state["caps"], state.get("securebits", 0), mine_caps)
        if why:
            return why
    if "sched" in state:
        policy = state["sched"][0] & ~SCHED_RESET_ON_FORK
        if policy not in SCHED_POLICIES:
            return f"scheduler policy {policy} cannot be restored"
        if policy in (SCHED_FIFO, SCHED_RR) and not mine_caps.get("effective", 0) >> CAP_SYS_NICE & 1:
            return "a real-time scheduler policy needs CAP_SYS_NICE, cow-apply lacks it"
    if state.get("affinity") and not set(state["affinity"]) & own_cpus:
        return f"CPU affinity {state['affinity']}: none of these CPUs is available to cow-apply"
    if state.get("posix_timers") and not _restores_timer_ids():
        return "POSIX timers need prctl(PR_TIMER_CREATE_RESTORE_IDS) (Linux 6.17), this kernel lacks it"
    oom = state.get("oom_score_adj")
    if oom is not None and oom < own_oom and not mine_caps.get("effective", 0) >> CAP_SYS_RESOURCE & 1:
        return (f"oom_score_adj {oom} is below cow-apply's {own_oom} "
                "(lowering it needs CAP_SYS_RESOURCE)")
    return None


def check_pipes(plan):
    """Every pipe an fd refers to has exactly one record (capacity, unread bytes), and every
    description is of one pipe, opened for reading or for writing."""
    records, descs = {}, {}
    for proc in plan.processes:
        for rec in proc["image"].get("pipes", ()):
            if rec["id"] in records:
                raise Refusal(f"process {proc['pid']}: pipe {rec['id']} is recorded twice")
            if len(rec["data"]) > rec["size"]:
                raise Refusal(f"process {proc['pid']}: pipe {rec['id']} holds more bytes than its capacity")
            records[rec["id"]] = rec
    for proc in plan.processes:
        for fd in proc["image"]["fds"]:
            if is_shared_file(fd):  # a shared description of a regular file
                if descs.setdefault(fd["desc"], ("file", fd["path"], fd["flags"] & 3)) != ("file", fd["path"], fd["flags"] & 3):
                    raise Refusal(f"process {proc['pid']}: fd {fd['fd']}: description {fd['desc']} is of two files or modes")
                continue
            if fd["kind"] not in ("pipe", "fifo"):
                continue
            where = f"process {proc['pid']}: fd {fd['fd']}"
            if fd["pipe"] not in records:
                raise Refusal(f"{where}: pipe {fd['pipe']} has no record (capacity, unread bytes)")
            if ("path" in records[fd["pipe"]]) != (fd["kind"] == "fifo"):
                raise Refusal(f"{where}: pipe {fd['pipe']} is a FIFO in one record, an anonymous pipe in the other")
            modes = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR) if fd["kind"] == "fifo" else (os.O_RDONLY, os.O_WRONLY)
            if fd["flags"] & 3 not in modes:
                raise Refusal(f"{where}: a pipe end opened neither for reading nor for writing")
            if descs.setdefault(fd["desc"], (fd["pipe"], fd["flags"] & 3)) != (fd["pipe"], fd["flags"] & 3):
                raise Refusal(f"{where}: description {fd['desc']} is of two pipes or two ends")


def check_tids_unique(plan):
    """A tid (a pid for the kernel) belongs to one thread of one process in the whole tree."""
    owner = {}
    for proc in plan.processes:
        for thread in proc["image"]["threads"]:
            tid = thread["tid"]
            if tid in owner:
                raise Refusal(f"process {proc['pid']}: thread {tid} is also a thread of process {owner[tid]}")
            owner[tid] = proc["pid"]


def check_pid_max(pids):
    """clone3's set_tid takes only pids below pid_max (a new pid namespace starts with the same)."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    over = sorted(pid for pid in pids if pid >= pid_max)
    if over:
        listed = ", ".join(map(str, over[:10])) + (" ..." if len(over) > 10 else "")
        raise Refusal(f"pid(s) {listed} are not below this machine's pid_max {pid_max}: raise "
                      "/proc/sys/kernel/pid_max (sysctl kernel.pid_max) to restore them")


def check_pids_free(pids, wait):
    """Every pid must be free; upstream `cow-collect --kill` may still be releasing them."""
    deadline = time.monotonic() + wait
    while True:
        taken = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        if not taken:
            return
        if time.monotonic() > deadline:
            listed = ", ".join(map(str, taken[:10])) + (" ..." if len(taken) > 10 else "")
            raise Refusal(f"pid(s) {listed} in use: stop those processes or restore with --pidns")
        time.sleep(0.05)


def _dev_of(st):
    return procfs.dev_string(st.st_dev)


def _check_file(what, path, dev=None, ino=None, size=None, mtime=None):
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Refusal(f"{what}: {path}: {exc.strerror}")
    if ino and st.st_ino != ino:
        raise Refusal(f"{what}: {path} is a different file now (inode {st.st_ino}, dumped {ino})")
    if dev and _dev_of(st) != dev:
        raise Refusal(f"{what}: {path} is on another device now ({_dev_of(st)}, dumped {dev})")
    if size is not None and st.st_size != size:
        raise Refusal(f"{what}: {path} changed size ({st.st_size}, dumped {size})")
    if mtime is not None and st.st_mtime_ns != mtime:
        raise Refusal(f"{what}: {path} changed since the dump (modified at another time)")


def check_locks(plan, wait):
    """Every dumped file lock is free to take; an upstream `cow-collect --kill` may still be
    releasing them, so a conflict is asked again for up to wait seconds."""
    deadline = time.monotonic() + wait
    for proc in plan.processes:
        for fd in proc["image"]["fds"]:
            if not fd.get("locks"):
                continue
            while True:
                try:
                    _check_locks(f"process {proc['pid']}: fd {fd['fd']}", fd)
                    break
                except Refusal:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def _check_locks(what, fd):
    """Every dumped lock can be taken now: no other process holds a conflicting one (a
    flock tried and released on a description of ours, POSIX and OFD locks asked with
    F_OFD_GETLK, which sees both)."""
    import fcntl
    import struct

    if fd["kind"] != "file":
        raise Refusal(f"{what}: a lock on {fd['path']}, which is not a regular file")
    try:
        probe = os.open(fd["path"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Refusal(f"{what}: {fd['path']}: {exc.strerror}")
    try:
        for kind, how, start, end in fd["locks"]:
            if kind == "flock":
                try:
                    fcntl.flock(probe, (fcntl.LOCK_EX if how == "write" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise Refusal(f"{what}: {fd['path']} is flock-locked by another process now")
                fcntl.flock(probe, fcntl.LOCK_UN)
                continue
            length = 0 if end is None else end - start + 1
            ask = struct.pack("hh4xqqi4x", fcntl.F_WRLCK if how == "write" else fcntl.F_RDLCK, 0, start, length, 0)
            got = fcntl.fcntl(probe, F_OFD_GETLK, ask)
            ltype, _, _, _, holder = struct.unpack("hh4xqqi4x", got)
            if ltype != fcntl.F_UNLCK:
                who = f"process {holder}" if holder > 0 else "an open file description of another process"
                raise Refusal(f"{what}: bytes {start}-{'EOF' if end is None else end} of {fd['path']} "
                              f"are locked by {who} now")
    finally:
        os.close(probe)


def check_files(plan):
    seen = set()
    for proc in plan.processes:
        pid = proc["pid"]
        for vma in proc["layout"]:
            if vma["kind"] == "file" and "shmem" not in vma:  # a memfd is recreated, not opened
                key = (vma["path"], vma.get("dev"), vma.get("ino"))
                if key not in seen:
                    seen.add(key)
                    _check_file(f"process {pid}: mapping {vma['start']:#x}", vma["path"], vma.get("dev"),
                                vma.get("ino"), vma.get("size"), vma.get("mtime"))
        for rng in proc["ranges"]:
            if rng["backing"] == "file":
                _check_file(f"process {pid}: staging range {rng['id']}", rng.get("path") or "",
                            rng.get("dev"), rng.get("ino"))
        for fd in proc["image"]["fds"]:
            if "shmem" in fd:
                continue  # a memfd: its object is recreated
            if fd["kind"] in ("file", "dir", "fifo"):
                _check_file(f"process {pid}: fd {fd['fd']}", fd["path"], fd.get("dev"), fd.get("ino"))
            elif fd["kind"] == "tty":
                if not tty.caller_terminal():
                    raise Refusal(f"process {pid}: fd {fd['fd']} was on cow-collect's terminal ({fd['path']}): "
                                  "cow-apply has no terminal on stdin, stdout or stderr to put it on")
            elif fd["kind"] != "pipe" and not os.path.exists(fd["path"]):
                raise Refusal(f"process {pid}: fd {fd['fd']}: {fd['path']} does not exist")
        exe = proc["image"]["mm"].get("exe_file")
        if exe and not os.path.isfile(exe):  # PR_SET_MM_MAP takes a regular file only
            what = "is not a regular file" if os.path.exists(exe) else "does not exist"
            raise Refusal(f"process {pid}: executable {exe} {what}")
        cwd = proc["image"].get("cwd")
        if cwd and not os.path.isdir(cwd):  # the restorer's chdir would fail after the tree exists
            what = "is not a directory" if os.path.exists(cwd) else "does not exist"
            raise Refusal(f"process {pid}: working directory {cwd} {what}")
