"""What cow-collect cannot dump yet, found before the stream starts.

Each check returns reasons as text; the CLI prints
``cow-collect: process 4711: fd 5 is a TCP socket: not supported`` per reason
and exits with EXIT_REFUSED.
"""

import os

from stages.linux import procfs

from .shmem import fd_object_kind, is_memfd_path, vma_object_kind

O_DIRECT = 0o40000


class Refused(Exception):
    """One or more processes hold something cowtree cannot restore; ``reasons`` = [(pid, text)]."""

    def __init__(self, reasons):
        self.reasons = reasons
        super().__init__("; ".join(f"process {pid}: {text}: not supported" for pid, text in reasons))

    def lines(self):
        return [f"process {pid}: {text}: not supported" for pid, text in self.reasons]


def _a(noun):
    # "an epoll instance", "an io_uring instance", but "a UNIX socket", "a UDP socket"
    return ("an " if noun[:1] in "aeiouAEIO" else "a ") + noun


# character device majors of terminals (Documentation/admin-guide/devices.txt)
TTY_MAJORS = {2: "BSD pseudo-terminal master", 3: "BSD pseudo-terminal", 4: "terminal",
              136: "pseudo-terminal", 204: "serial terminal"}
TTY_NAMES_5 = {0: "controlling terminal (/dev/tty)", 1: "console", 2: "pseudo-terminal master"}
LOCK_KINDS = {"FLOCK": "flock", "POSIX": "POSIX (fcntl)", "OFDLCK": "open file description (OFD)",
              "LEASE": "lease", "DELEG": "delegation"}


def tty_name(rdev):
    """What kind of terminal a character device (major, minor) is, or None."""
    if not rdev:
        return None
    major, minor = rdev
    if major == 5:
        return TTY_NAMES_5.get(minor, "terminal")
    if 136 <= major <= 143:
        return "pseudo-terminal"
    return TTY_MAJORS.get(major)


RESTORABLE_LOCKS = {"FLOCK", "POSIX", "OFDLCK"}


def parse_lock(fields):
    """An fdinfo "lock:" line's fields (["1:", "POSIX", "ADVISORY", "WRITE", pid, dev:ino,
    start, end]) -> [kind, type, start, end or None (EOF)], or None when it is not a plain
    advisory lock of a kind apply takes again."""
    if len(fields) != 8 or fields[1] not in RESTORABLE_LOCKS or fields[2] != "ADVISORY" \
            or fields[3] not in ("READ", "WRITE"):
        return None
    try:
        start, end = int(fields[6]), None if fields[7] == "EOF" else int(fields[7])
    except ValueError:
        return None
    return [fields[1].lower(), fields[3].lower(), start, end]


def mark_caller_terminal(fds, terminal):
    """Mark the fds on cow-collect's terminal (stages.linux.tty): they are dumped as kind
    "tty" and restored onto cow-apply's terminal; other terminals are refused."""
    if not terminal:
        return
    rdev = (os.major(terminal[0]), os.minor(terminal[0]))
    for fd in fds:
        if fd["kind"] == "chr" and fd.get("rdev") == rdev and tty_name(rdev):
            fd["caller_tty"] = True


def lock_reasons(fd):
    """Locks held through fd that cannot be taken again: leases, delegations, anything
    unusual, and any lock on an fd that is not a regular file with a path (a memfd or a
    deleted file is recreated as a shared memory object, which nobody could lock yet)."""
    out = []
    for lock in fd.get("locks", ()):
        if fd["kind"] == "file" and not fd.get("deleted") and parse_lock(lock):
            continue
        kind = LOCK_KINDS.get(lock[1] if len(lock) > 1 else "", lock[1] if len(lock) > 1 else "unknown")
        what = lock[3].lower() if len(lock) > 3 else "?"
        out.append(f"fd {fd['fd']} holds {_a(kind)} {what} lock on {fd.get('path') or '?'}")
    return out


SCHED_DEADLINE = 6
# clocks a restored timer_create accepts without more privilege: REALTIME, MONOTONIC, the
# process's and the thread's CPU time, BOOTTIME, TAI
TIMER_CLOCKS = {0: "REALTIME", 1: "MONOTONIC", 2: "PROCESS_CPUTIME_ID", 3: "THREAD_CPUTIME_ID",
                7: "BOOTTIME", 11: "TAI"}
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4


def timer_notify(timer):
    """The sigev_notify of a parsed /proc/PID/timers entry, or None when it cannot be made again."""
    if timer.get("how") == "signal":
        return SIGEV_THREAD_ID if timer.get("target") == "tid" else SIGEV_SIGNAL
    if timer.get("how") == "none" and timer.get("target") == "pid":
        return SIGEV_NONE
    return None


def timer_reason(pid, timer):
    if timer.get("clock") not in TIMER_CLOCKS:
        return f"has clock {timer.get('clock')} (another process's CPU clock, or an alarm clock)"
    if timer_notify(timer) is None:
        return f"notifies by {timer.get('how')}/{timer.get('target')}"
    if timer.get("target") == "tid" and timer.get("target_id") != pid:
        return f"signals thread {timer.get('target_id')}, not the process's own"
    return None


def state_reasons(pid, stat_policy=None):
    """Process state that cannot be restored yet: POSIX timers of other clocks or
    notifications, SCHED_DEADLINE, a root directory other than /."""
    reasons = []
    try:
        timers = procfs.parse_timers(procfs.read_text(f"/proc/{pid}/timers"))
    except OSError:  # it died meanwhile, which is found elsewhere
        timers = []
    for timer in timers:
        why = timer_reason(pid, timer)
        if why:
            reasons.append(f"POSIX timer {timer['id']} {why}")
    try:
        tids = procfs.tids(pid)
    except OSError:  # it died meanwhile, which is found elsewhere
        tids = []
    for tid in tids:
        try:
            fields = procfs.read_text(f"/proc/{pid}/task/{tid}/stat").rsplit(")", 1)[1].split()
        except OSError:  # the thread exited meanwhile
            continue
        if int(fields[38]) == SCHED_DEADLINE:  # field 41 of stat: policy
            reasons.append("runs under SCHED_DEADLINE" + (f" (thread {tid})" if tid != pid else ""))
    root = procfs.readlink(f"/proc/{pid}/root")
    if root is not None and root != "/":  # None: it died meanwhile, which is found elsewhere
        reasons.append(f"has a changed root directory ({root})")
    return reasons


def fd_reason(pid, fd):
    """Why fd (a procfs.describe_fd dict) cannot be dumped, or None when it can."""
    kind, path = fd["kind"], fd.get("path") or ""
    if kind == "file":
        # a memfd or a deleted tmpfs file is restored as a shared memory object (shmem.py)
        if fd.get("deleted") and not fd_object_kind(pid, fd):
            return f"fd {fd['fd']} is a deleted file ({path})"
        return None
    if kind == "chr":
        tty = tty_name(fd.get("rdev"))
        if tty and not fd.get("caller_tty"):
            return f"fd {fd['fd']} is {_a(tty)} ({path}), not cow-collect's terminal"
        return None
    if kind == "socket":
        return f"fd {fd['fd']} is {_a(procfs.socket_kind(pid, fd['ino']))}"
    if kind == "fifo" and path.startswith("pipe:"):
        # pipes inside the tree are dumped; pipe_reasons refuses those shared with the outside
        if fd["flags"] & O_DIRECT:
            return f"fd {fd['fd']} is a packet-mode pipe (O_DIRECT)"
        return None
    if kind == "fifo":  # a FIFO of the tree is dumped like a pipe, and reopened by path
        if fd.get("deleted") or not path.startswith("/"):
            return f"fd {fd['fd']} is a FIFO whose path is gone ({path})"
        return None
    if kind == "anon":
        return f"fd {fd['fd']} is {_a(procfs.anon_inode_kind(path))}"
    if kind == "dir":  # reopened by path with its flags and position
        if fd.get("deleted") or not path.startswith("/"):
            return f"fd {fd['fd']} is a deleted directory ({path})"
        return None
    if kind == "blk":
        return f"fd {fd['fd']} is a block device ({path})"
    return f"fd {fd['fd']} is {path or 'of an unknown kind'}"


def vma_reason(vma):
    path = vma.get("path") or ""
    where = f"{vma['start']:#x}-{vma['end']:#x}"
    if path.startswith("/SYSV"):
        return f"SysV shared memory attachment at {where}"
    if vma_object_kind(vma):
        return None  # MAP_SHARED anonymous, memfd or deleted file: an object (shmem.py)
    if is_memfd_path(path):
        return f"private mapping of a memfd at {where} ({path})"
    if vma["kind"] == "file" and vma.get("deleted"):
        return f"mapping of a deleted file at {where} ({path})"
    return None


def not_utf8(path):
    """True for a path read with surrogateescape from bytes that are not UTF-8: the stream
    holds paths as msgpack strings, which are UTF-8."""
    try:
        path.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def name_reasons(pid, tids):
    """The names the stream keeps besides paths of fds and mappings: cwd, exe, thread names."""
    reasons = []
    for what, link in (("working directory", "cwd"), ("executable", "exe")):
        path = procfs.readlink(f"/proc/{pid}/{link}")
        if path and not_utf8(path):
            reasons.append(f"its {what}'s name is not UTF-8 ({os.fsencode(path)!r})")
    for tid in tids:
        try:
            name = procfs.read_text(f"/proc/{pid}/task/{tid}/comm").rstrip("\n")
        except OSError:
            continue  # a thread that exits is noticed where it matters
        if not_utf8(name):
            reasons.append(f"thread {tid}'s name (comm) is not UTF-8 ({os.fsencode(name)!r})")
    return reasons


def process_reasons(pid, status, vmas, fds, tids):
    reasons = name_reasons(pid, tids)
    if status.get("Seccomp", "0") != "0":
        reasons.append("has a seccomp filter")
    for fd in fds:
        text = fd_reason(pid, fd)
        if not text and fd.get("path") and not_utf8(fd["path"]):
            text = f"fd {fd['fd']} is a file whose name is not UTF-8 ({os.fsencode(fd['path'])!r})"
        if text:
            reasons.append(text)
        reasons.extend(lock_reasons(fd))
    reasons.extend(state_reasons(pid))
    for vma in vmas:
        text = vma_reason(vma)
        if not text and vma.get("path") and not_utf8(vma["path"]):
            text = (f"mapping at {vma['start']:#x}-{vma['end']:#x} of a file whose name is not UTF-8 "
                    f"({os.fsencode(vma['path'])!r})")
        if text:
            reasons.append(text)
    return reasons


def pipe_reasons(holders, outside):
    """holders: {pipe key: [(pid, fd), ...]} in the tree; outside: {key: outside pid}
    (key: a pipe's inode, or (dev, inode) of a FIFO)."""
    return [(pid, f"fd {fd} is a {'FIFO' if isinstance(key, tuple) else 'pipe'} shared with a process "
                  f"outside the tree (process {outside[key]})")
            for key, where in holders.items() if key in outside for pid, fd in where]
