"""Parsers of /proc files.  Each parse_* takes the file's text (testable on recorded
contents); the read_* wrappers read the live file of one pid."""

import os
import stat as statmod

PAGE = 4096

# /proc/PID/stat fields (1-based as in proc(5)) that describe the mm
STAT_MM_FIELDS = {
    "start_code": 26, "end_code": 27, "start_stack": 28,
    "start_data": 45, "end_data": 46, "start_brk": 47,
    "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51,
}

SPECIAL_KINDS = {"[heap]": "heap", "[stack]": "stack", "[vdso]": "vdso", "[vvar]": "vvar",
                 "[vvar_vclock]": "vvar_vclock", "[vsyscall]": "vsyscall"}

DELETED = " (deleted)"
SHARED_ANON_PATH = "/dev/zero (deleted)"  # how maps names a MAP_SHARED|MAP_ANONYMOUS mapping


def parse_stat(text):
    """/proc/PID/stat -> dict with pid, comm, state, ppid, pgrp, session and the mm fields.

    comm may hold spaces and parentheses: it ends at the last ')'.
    """
    head, rest = text.rsplit(")", 1)
    pid_text, comm = head.split("(", 1)
    fields = rest.split()
    # fields[0] is field 3 (state)
    def field(n):
        return int(fields[n - 3])
    out = {"pid": int(pid_text), "comm": comm, "state": fields[0], "ppid": field(4),
           "pgrp": field(5), "session": field(6), "num_threads": field(20), "flags": field(9),
           "nice": field(19)}
    for name, n in STAT_MM_FIELDS.items():
        out[name] = field(n) if len(fields) > n - 3 else 0
    return out


def parse_status(text):
    """/proc/PID/status -> {key: value text}."""
    out = {}
    # only "\n" ends a line: splitlines() would also split a Name holding a \x1c or \x85
    for line in text.split("\n"):
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def maps_path(field):
    """The path of a maps line, from the first character after the column padding.  It is
    the file's name as is (spaces, a trailing one too), but for the newline that ends the
    line and a newline in the name, which the kernel writes as \\012 (seq_file_path with
    "\\n" to escape; a backslash itself is not escaped, so a name that holds the four
    characters \\012 reads as a newline: resolve_file_vmas asks map_files for those)."""
    if field.endswith("\n"):
        field = field[:-1]
    return field.replace("\\012", "\n")


def parse_maps_line(line):
    """One line of maps/smaps -> a VMA dict (start, end, prot, shared, pgoff, dev, ino, path,
    kind, deleted).  deleted is what the name says (the kernel appends " (deleted)" to the
    name of an unlinked file, but a live file's name may end so too): resolve_file_vmas
    asks the kernel."""
    parts = line.split(None, 5)
    start, end = (int(x, 16) for x in parts[0].split("-"))
    perms = parts[1]
    prot = (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)
    path = maps_path(parts[5]) if len(parts) > 5 else ""
    ino = int(parts[4])
    if path in SPECIAL_KINDS:
        kind = SPECIAL_KINDS[path]
    elif path in ("", SHARED_ANON_PATH) or path.startswith("[anon:") or path.startswith("[anon_shmem:"):
        kind = "anon"
    elif path.startswith("[") and path.endswith("]"):
        kind = "special"
    else:
        kind = "file"
    return {
        "start": start, "end": end, "prot": prot, "shared": perms[3] == "s",
        "pgoff": int(parts[2], 16), "dev": parts[3], "ino": ino,
        "path": path or None, "kind": kind, "deleted": kind == "file" and path.endswith(DELETED),
    }


def _is_maps_header(line):
    head = line.split(" ", 1)[0]
    if "-" not in head:
        return False
    a, _, b = head.partition("-")
    try:
        int(a, 16), int(b, 16)
    except ValueError:
        return False
    return True


def parse_maps(text):
    # only "\n" ends a line (a name may hold a \r); the one empty line is after the last
    return [parse_maps_line(line) for line in text.split("\n") if line]


def parse_smaps(lines):
    """/proc/PID/smaps (its text, or its lines) -> VMAs as parse_maps, each with ``vmflags``
    (list of mnemonics).  The numeric fields (Rss, Anonymous, ...) are not kept: nobody reads
    them, and for a process with 20,000 VMAs they cost 60 MiB of dicts."""
    if isinstance(lines, str):
        lines = lines.split("\n")  # not splitlines(): a name may hold a \r
    vmas = []
    for line in lines:
        if line.startswith("VmFlags:"):
            vmas[-1]["vmflags"] = line.split(":", 1)[1].split()
        elif line and not line[0].isupper() and _is_maps_header(line):
            vma = parse_maps_line(line)
            vma["vmflags"] = []
            vmas.append(vma)
    return vmas


def parse_fdinfo(text):
    """/proc/PID/fdinfo/N -> {'pos': int, 'flags': int (octal in the file), 'mnt_id': int, ...}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "flags":
            out["flags"] = int(value, 8)
        elif key in ("pos", "mnt_id", "ino"):
            out[key] = int(value)
        else:
            out.setdefault(key, value)
    return out


def parse_rollup(text):
    """/proc/PID/smaps_rollup -> {field: kB}."""
    out = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        value = value.split()
        if value and value[0].isdigit():
            out[key] = int(value[0])
    return out


def parse_net_inodes(text):
    """/proc/net/{tcp,udp,unix,...} -> set of socket inode numbers listed."""
    lines = text.splitlines()
    if not lines:
        return set()
    header = lines[0].split()
    # tcp/udp/raw: 'inode' is a column of the header; unix: 'Inode'; netlink: 'Inode'
    col = None
    for i, name in enumerate(header):
        if name.lower() == "inode":
            col = i
    out = set()
    for line in lines[1:]:
        parts = line.split()
        if col is None:
            continue
        # tcp/udp: "tx_queue rx_queue" and "tr tm->when" name one column each
        idx = col - 2 if header[0] == "sl" else col
        if len(parts) > idx and parts[idx].isdigit():
            out.add(int(parts[idx]))
    return out


PF_EXITING = 0x4  # stat field 9: the task is on its way out (set before it is a zombie)


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def parse_timers(text):
    """/proc/PID/timers -> [{'id', 'signo', 'sival', 'how' ('signal', 'none', 'thread'),
    'target' ('pid' or 'tid'), 'target_id', 'clock'}], one per POSIX timer (timer_create)."""
    out, cur = [], None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "ID":
            cur = {"id": int(value)}
            out.append(cur)
        elif cur is None:
            continue
        elif key == "signal":
            signo, _, sival = value.partition("/")
            cur["signo"], cur["sival"] = int(signo), int(sival or "0", 16)
        elif key == "notify":
            how, _, target = value.partition("/")
            kind, _, num = target.partition(".")
            cur["how"], cur["target"], cur["target_id"] = how, kind, int(num or "0")
        elif key == "ClockID":
            cur["clock"] = int(value)
    return out


def read_stat(pid):
    return parse_stat(read_text(f"/proc/{pid}/stat"))


def read_status(pid):
    return parse_status(read_text(f"/proc/{pid}/status"))


def read_smaps(pid):
    # line by line: the whole text of a process with many VMAs is tens of MiB
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        return parse_smaps(f)


def read_maps(pid):
    return parse_maps(read_text(f"/proc/{pid}/maps"))


def is_deleted(path, dev, ino, nlink=None):
    """Whether file (dev, ino), which maps or an fd link names path, is no longer there.  A link
    count of 0 (when known) says so for sure.  Else the " (deleted)" the kernel appends to the
    name of an unlinked file is only a hint: a live file's own name may end so, and an unlinked
    name of a file with other links has a count above 0; the path shown leads to the file
    itself only in the first case."""
    if nlink == 0:
        return True
    if not path.endswith(DELETED):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return True
    return (dev_string(st.st_dev), st.st_ino) != (dev, ino)


def resolve_file_vmas(pid, vmas):
    """Settle what parse_maps_line could not from the text alone, for the file VMAs of pid:
    the exact name when it holds a newline (maps cannot tell an escaped one from a name with
    \\012 in it; map_files, where we may read it, has the name as is), and deleted."""
    for vma in vmas:
        if vma["kind"] != "file":
            continue
        link = f"/proc/{pid}/map_files/{vma['start']:x}-{vma['end']:x}"
        if "\n" in vma["path"]:
            vma["path"] = readlink(link) or vma["path"]  # needs CAP_SYS_ADMIN/CAP_CHECKPOINT_RESTORE
        if vma["path"].endswith(DELETED):
            try:
                nlink = os.stat(link).st_nlink
            except OSError:  # not allowed: the path alone decides
                nlink = None
            vma["deleted"] = is_deleted(vma["path"], vma["dev"], vma["ino"], nlink)
        else:
            vma["deleted"] = False


def read_rollup(pid):
    return parse_rollup(read_text(f"/proc/{pid}/smaps_rollup"))


def read_auxv(pid):
    with open(f"/proc/{pid}/auxv", "rb") as f:
        return f.read()


def dev_string(st_dev):
    """A device number as /proc/PID/maps writes it ("fd:01")."""
    return f"{os.major(st_dev):02x}:{os.minor(st_dev):02x}"


def tids(pid):
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def children(pid):
    """Direct children of pid (over all its threads); [] when pid is gone.  A process being
    reaped answers ESRCH rather than ENOENT: gone too."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except (FileNotFoundError, ProcessLookupError):
                pass
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def walk_tree(root):
    """Pids of the tree rooted at root, parents before children (breadth first)."""
    order, seen, queue = [], set(), [root]
    while queue:
        pid = queue.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        queue.extend(children(pid))
    return order


def readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


def fd_numbers(pid):
    return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))


def describe_fd(pid, fd):
    """What fd N of pid is: {'fd', 'kind', 'path', 'flags', 'pos', 'mode', ...}.

    kind: 'file' (regular), 'chr' (character device), 'dir', 'blk', 'fifo', 'socket', 'anon'
    (anon_inode: eventpoll, eventfd, signalfd, timerfd, inotify, io_uring, ...), 'other'.
    """
    base = f"/proc/{pid}"
    target = readlink(f"{base}/fd/{fd}") or ""
    text = read_text(f"{base}/fdinfo/{fd}")
    info = parse_fdinfo(text)
    out = {"fd": fd, "path": target, "flags": info.get("flags", 0), "pos": info.get("pos", 0)}
    # file locks this fd's description or this process holds on the file (flock, POSIX, OFD)
    out["locks"] = [line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("lock:")]
    if target.startswith("socket:["):
        out["kind"] = "socket"
        out["ino"] = int(target[8:-1])
        return out
    if target.startswith("anon_inode:"):
        out["kind"] = "anon"
        return out
    try:
        st = os.stat(f"{base}/fd/{fd}")
    except FileNotFoundError:
        raise  # the fd or the whole process is gone (killed?): not an fd of an unknown kind
    except OSError:
        out["kind"] = "other"
        return out
    out["mode"] = st.st_mode
    out["ino"] = st.st_ino
    out["dev"] = dev_string(st.st_dev)
    # the link target is the name as is (no escapes); the inode behind it has the link count
    out["deleted"] = target.startswith("/") and is_deleted(target, out["dev"], st.st_ino, st.st_nlink)
    if statmod.S_ISREG(st.st_mode):
        out["kind"] = "file"
        out["size"] = st.st_size
    elif statmod.S_ISCHR(st.st_mode):
        out["kind"] = "chr"
        out["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    elif statmod.S_ISDIR(st.st_mode):
        out["kind"] = "dir"
    elif statmod.S_ISFIFO(st.st_mode):
        out["kind"] = "fifo"
    elif statmod.S_ISBLK(st.st_mode):
        out["kind"] = "blk"
    else:
        out["kind"] = "other"
    return out


# /proc/PID/net files -> the name a refusal gives a socket found there
SOCKET_TABLES = (
    ("tcp", "TCP socket"), ("tcp6", "TCPv6 socket"), ("udp", "UDP socket"), ("udp6", "UDPv6 socket"),
    ("unix", "UNIX socket"), ("raw", "raw socket"), ("raw6", "raw IPv6 socket"),
    ("netlink", "netlink socket"), ("packet", "packet socket"), ("udplite", "UDP-Lite socket"),
)


def socket_kind(pid, ino):
    """'TCP socket', 'UNIX socket', ... for socket inode ino of pid (its network namespace)."""
    for table, name in SOCKET_TABLES:
        try:
            if ino in parse_net_inodes(read_text(f"/proc/{pid}/net/{table}")):
                return name
        except OSError:
            continue
    return "socket"


ANON_INODE_NAMES = {
    "[eventpoll]": "epoll instance", "[eventfd]": "eventfd", "[signalfd]": "signalfd",
    "[timerfd]": "timerfd", "inotify": "inotify instance", "[fanotify]": "fanotify instance",
    "[io_uring]": "io_uring instance", "[pidfd]": "pidfd", "[userfaultfd]": "userfaultfd",
    "[perf_event]": "perf event", "bpf-map": "BPF map", "bpf-prog": "BPF program",
}


def anon_inode_kind(target):
    name = target[len("anon_inode:"):]
    return ANON_INODE_NAMES.get(name, f"anon inode {name}")


RLIM_INFINITY = (1 << 64) - 1


def parse_limits(text):
    """/proc/PID/limits -> [[soft, hard], ...] in RLIMIT_* order (the file's row order);
    'unlimited' is RLIM_INFINITY.  Reading it needs no CAP_SYS_RESOURCE, unlike prlimit."""
    out = []
    for line in text.splitlines()[1:]:
        if len(line) < 47:
            continue
        soft, hard = line[26:47].strip(), line[47:68].strip()
        out.append([RLIM_INFINITY if v == "unlimited" else int(v) for v in (soft, hard)])
    return out


def read_limits(pid):
    return parse_limits(read_text(f"/proc/{pid}/limits"))
