"""What cow-collect cannot dump yet, found before the stream starts.

Each check returns reasons as text; the CLI prints
``cow-collect: process 4711: fd 5 is a TCP socket: not supported`` per reason
and exits with EXIT_REFUSED.
"""

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


def fd_reason(pid, fd):
    """Why fd (a procfs.describe_fd dict) cannot be dumped, or None when it can."""
    kind, path = fd["kind"], fd.get("path") or ""
    if kind == "file":
        # a memfd or a deleted tmpfs file is restored as a shared memory object (shmem.py)
        if fd.get("deleted") and not fd_object_kind(pid, fd):
            return f"fd {fd['fd']} is a deleted file ({path})"
        return None
    if kind == "chr":
        return None
    if kind == "socket":
        return f"fd {fd['fd']} is {_a(procfs.socket_kind(pid, fd['ino']))}"
    if kind == "fifo" and path.startswith("pipe:"):
        # pipes inside the tree are dumped; pipe_reasons refuses those shared with the outside
        if fd["flags"] & O_DIRECT:
            return f"fd {fd['fd']} is a packet-mode pipe (O_DIRECT)"
        return None
    if kind == "fifo":
        return f"fd {fd['fd']} is a FIFO ({path})"
    if kind == "anon":
        return f"fd {fd['fd']} is {_a(procfs.anon_inode_kind(path))}"
    if kind == "dir":
        return f"fd {fd['fd']} is a directory ({path})"
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
    if vma["kind"] == "file" and path.endswith(procfs.DELETED):
        return f"mapping of a deleted file at {where} ({path})"
    return None


def process_reasons(pid, status, vmas, fds):
    reasons = []
    if status.get("Seccomp", "0") != "0":
        reasons.append("has a seccomp filter")
    for fd in fds:
        text = fd_reason(pid, fd)
        if text:
            reasons.append(text)
    for vma in vmas:
        text = vma_reason(vma)
        if text:
            reasons.append(text)
    return reasons


def pipe_reasons(holders, outside):
    """holders: {pipe inode: [(pid, fd), ...]} in the tree; outside: {inode: outside pid}."""
    return [(pid, f"fd {fd} is a pipe shared with a process outside the tree (process {outside[ino]})")
            for ino, where in holders.items() if ino in outside for pid, fd in where]
