"""Shared memory objects of the tree: MAP_SHARED anonymous mappings, memfds, deleted tmpfs files.

One object per inode (the dev:ino columns of maps, or the fd's stat): a region a parent
mapped MAP_SHARED|MAP_ANONYMOUS before forking four children is one object seen by five
processes, and its contents go into the image once.  Ids are dense, 1..S, in the order
processes (stream order), then their VMAs and fds, first show the object.

The contents are read from the object itself (the shmem file behind /proc/PID/map_files/
or /proc/PID/fd/N): SEEK_DATA/SEEK_HOLE give the pages it holds (resident or swapped),
which is what a restore must recreate; holes read as zeros and are left out.

A tmpfs file deleted while mapped MAP_SHARED or held open (python's multiprocessing heap
and POSIX semaphores in /dev/shm) is an object like a memfd: no path leads to it any more.
MAP_SHARED mappings of ordinary files (also under /dev/shm) are not objects here: the
file holds their data and apply maps the same file again.
"""

import fcntl
import os

from stages.linux import procfs
from stages.linux.memstat import TMPFS_MAGIC, fs_type
from stages.stream import pack_u32

PAGE = 4096
MEMFD_PREFIX = "/memfd:"
F_GET_SEALS = 1034
F_SEAL_SEAL = 1  # a memfd made without MFD_ALLOW_SEALING has this one seal: nothing is sealed
PAGES_PER_RECORD = 1024  # 4 MiB of data per shmem record
ANON, MEMFD, TMPFILE = "anon", "memfd", "tmpfile"


def is_memfd_path(path):
    return (path or "").startswith(MEMFD_PREFIX)


def memfd_name(path):
    """'/memfd:cache (deleted)' -> 'cache' (the name given to memfd_create)."""
    name = path[len(MEMFD_PREFIX):]
    return name[: -len(procfs.DELETED)] if name.endswith(procfs.DELETED) else name


def deleted_name(path):
    """'/dev/shm/pym-1-x (deleted)' -> '/dev/shm/pym-1-x'."""
    return path[: -len(procfs.DELETED)] if path.endswith(procfs.DELETED) else path


def vma_object_kind(vma):
    """ANON, MEMFD or TMPFILE for a MAP_SHARED mapping of an object restored by content, else
    None.  (TMPFILE: a deleted file; SharedObjects refuses one that is not on tmpfs.)"""
    if not vma["shared"]:
        return None
    path = vma.get("path") or ""
    if vma["kind"] == "anon":
        return ANON  # '/dev/zero (deleted)', '[anon_shmem:name]'
    if vma["kind"] == "file" and is_memfd_path(path):
        return MEMFD
    if vma["kind"] == "file" and vma.get("deleted") and not path.startswith("/SYSV"):
        return TMPFILE  # not a live file whose name ends in " (deleted)": its data stays in it
    return None


def fd_object_kind(pid, fd):
    """MEMFD or TMPFILE (a deleted file on tmpfs) for an fd restored as an object, else None."""
    if fd["kind"] != "file":
        return None
    if is_memfd_path(fd.get("path")):
        return MEMFD
    if fd.get("deleted"):
        try:
            opened = os.open(f"/proc/{pid}/fd/{fd['fd']}", os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return TMPFILE if fs_type(opened) == TMPFS_MAGIC else None
        finally:
            os.close(opened)
    return None


def _key(dev, ino):
    return (dev, int(ino))


class SharedObjects:
    """The tree's shared objects: ids, where to read each one, and refusals."""

    def __init__(self, views):
        self.ids = {}  # (dev, ino) -> id
        self.objects = []  # id - 1 -> {"id", "kind", "name", "source", "where"}
        self.reasons = []  # (pid, text)
        self.memfd_fds = []  # (pid, fd, object key) of every memfd (or deleted tmpfs file) fd, tree order
        self.fd_ids = {}  # (pid, fd) -> object key
        self.fd_desc = {}  # (pid, fd) -> open file description id (assign_descs)
        for view in views:
            pid = view.pid
            for vma in view.vmas:
                kind = vma_object_kind(vma)
                if kind is None:
                    continue
                if "ht" in vma.get("vmflags", ()):
                    self.reasons.append((pid, f"hugetlb shared mapping at {vma['start']:#x}-{vma['end']:#x}"))
                    continue
                source = f"/proc/{pid}/map_files/{vma['start']:x}-{vma['end']:x}"
                self._add(_key(vma["dev"], vma["ino"]), kind, vma.get("path") or "", source,
                          (pid, f"shared memory at {vma['start']:#x}-{vma['end']:#x}"))
            for fd in view.fds:
                kind = fd_object_kind(pid, fd)
                if kind:
                    key = _key(fd["dev"], fd["ino"])
                    self.memfd_fds.append((pid, fd["fd"], key))
                    self.fd_ids[(pid, fd["fd"])] = key
                    self._add(key, kind, fd["path"], f"/proc/{pid}/fd/{fd['fd']}", (pid, f"fd {fd['fd']}"))
        self._inspect()

    def __len__(self):
        return len(self.objects)

    def _add(self, key, kind, path, source, where):
        if key in self.ids:
            return
        self.ids[key] = len(self.objects) + 1
        names = {MEMFD: memfd_name, TMPFILE: deleted_name}
        self.objects.append({"id": len(self.objects) + 1, "kind": kind,
                             "name": names[kind](path) if kind in names else None,
                             "source": source, "where": where})

    def _inspect(self):
        """Size of every object; seals, which apply does not recreate, are refused."""
        for obj in self.objects:
            pid, what = obj["where"]
            try:
                fd = os.open(obj["source"], os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                self.reasons.append((pid, f"{what}: cannot open its shared memory object ({exc.strerror})"))
                continue
            try:
                obj["size"] = os.fstat(fd).st_size
                if fs_type(fd) != TMPFS_MAGIC:  # e.g. a MFD_HUGETLB memfd, a deleted file on disk
                    if obj["kind"] == TMPFILE:
                        self.reasons.append((pid, f"{what}: MAP_SHARED mapping of a deleted file not on tmpfs "
                                                  f"({obj['name']})"))
                    else:
                        self.reasons.append((pid, f"{what}: shared memory not on shmem (hugetlbfs?)"))
                elif obj["kind"] == MEMFD:
                    obj["seals"] = seals = fcntl.fcntl(fd, F_GET_SEALS)
                    if seals not in (0, F_SEAL_SEAL):  # 0: MFD_ALLOW_SEALING, nothing sealed yet
                        self.reasons.append((pid, f"{what}: a sealed memfd (seals {seals:#x})"))
            finally:
                os.close(fd)

    def held_outside(self, tree_pids):
        """Refuse objects that a process outside the tree maps or holds as an fd: the restored
        tree gets a new object, which that process would not share (every process's maps and
        memfd fds are read; cheap next to reading the tree's memory)."""
        if not self.ids:
            return
        me = os.getpid()
        found = {}  # id -> outside pid
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in tree_pids or int(name) == me:
                continue
            pid = int(name)
            try:
                # bytes: any process's names, not only UTF-8 ones; lines end at b"\n" only
                with open(f"/proc/{pid}/maps", "rb") as f:
                    for line in f:
                        parts = line.split(None, 5)
                        if len(parts) > 5 and parts[1][3:4] == b"s":
                            oid = self.ids.get((parts[3].decode(), int(parts[4])))
                            if oid:
                                found.setdefault(oid, pid)
                for n in os.listdir(f"/proc/{pid}/fd"):
                    link = procfs.readlink(f"/proc/{pid}/fd/{n}") or ""
                    if is_memfd_path(link) or link.endswith(procfs.DELETED):
                        try:
                            st = os.stat(f"/proc/{pid}/fd/{n}")
                        except OSError:  # closed meanwhile
                            continue
                        oid = self.ids.get(_key(procfs.dev_string(st.st_dev), st.st_ino))
                        if oid:
                            found.setdefault(oid, pid)
            except OSError:  # gone, a zombie, or a kernel thread
                continue
        for oid, pid in sorted(found.items()):
            where_pid, what = self.objects[oid - 1]["where"]
            self.reasons.append((where_pid, f"{what}: shared memory also held by process {pid} outside the tree"))

    def assign_descs(self, first):
        """Open file description ids first, first + 1, ... for the memfd fds (kcmp: fds that
        share one, after fork or dup, share its offset and flags, and will again)."""
        from .state import _kcmp_file

        reps = []  # (key, pid, fd, desc)
        for pid, fd, key in self.memfd_fds:
            desc = next((d for k, p, f, d in reps if k == key and _kcmp_file(p, f, pid, fd) == 0), None)
            if desc is None:
                desc = first + len(reps)
                reps.append((key, pid, fd, desc))
            self.fd_desc[(pid, fd)] = desc

    def vma_id(self, vma):
        if vma_object_kind(vma) is None:
            return None
        return self.ids.get(_key(vma["dev"], vma["ino"]))

    def fd_id(self, pid, fd):
        key = self.fd_ids.get((pid, fd["fd"]))
        return self.ids.get(key) if key else None

    def write(self, writer):
        """One or more ``shmem`` records per object (pages it holds, PAGES_PER_RECORD at a time).
        Returns (objects, pages written)."""
        total = 0
        for obj in self.objects:
            fd = os.open(obj["source"], os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = obj["size"]
                npages = (size + PAGE - 1) // PAGE
                chunks = list(_page_chunks(_data_pages(fd, size), PAGES_PER_RECORD)) or [[]]
                for chunk in chunks:
                    data = bytearray()
                    for first, n in _runs(chunk):
                        blob = os.pread(fd, n * PAGE, first * PAGE)
                        data += blob.ljust(n * PAGE, b"\0")  # the last page past EOF reads short
                    body = {"id": obj["id"], "kind": obj["kind"], "size": size, "npages": npages,
                            "pages": pack_u32(chunk)}
                    if obj["name"] is not None:
                        body["name"] = obj["name"]
                    if "seals" in obj:
                        body["seals"] = obj["seals"]
                    writer.write("shmem", body, bytes(data))
                    total += len(chunk)
            finally:
                os.close(fd)
        return len(self.objects), total


def _data_pages(fd, size):
    """Page indexes of the object that hold data (SEEK_DATA/SEEK_HOLE), ascending."""
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after at
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield from range(start // PAGE, (end + PAGE - 1) // PAGE)
        at = end


def _page_chunks(pages, n):
    chunk = []
    for p in pages:
        chunk.append(p)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _runs(pages):
    """[(first, count)] of consecutive page indexes."""
    out = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out

