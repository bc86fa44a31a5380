"""Shared memory objects of the tree, created by cow-apply before the root exists.

Each object of the plan (MAP_SHARED anonymous memory or a memfd) is created once here
and filled with its dumped pages; only the pages that were there are written, so the
object holds as many pages as before.  Like the pipes (pipes.py), cow-apply keeps one fd
per object above every dumped fd number, and every restored process inherits it; its
restorer maps the object through /proc/self/fd/N at each dumped address and offset and
opens it again for a memfd it held as an fd, then closes the inherited fd.

An anonymous object is made the way the kernel makes one for MAP_SHARED|MAP_ANONYMOUS
(a mapping of our own, whose shmem file we open through /proc/self/map_files/), so the
restored mappings show as '/dev/zero (deleted)' again; a memfd is a memfd of the same name.
A deleted tmpfs file becomes an unnamed file (O_TMPFILE) in the directory it was in, or a
memfd of its base name where that directory is gone.
Opening map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE: without them an anonymous
object becomes a memfd named 'cowtree-shared-anonymous' (the same sharing; another name in maps).
"""

import fcntl
import mmap
import os

from stages.linux.memory import address_of

from .pipes import close_all  # noqa: F401 (restore.py closes shmem fds through it too)

PAGE = 4096


class SharedMemoryError(OSError):
    pass


def _anonymous_object(size):
    """An fd on a new shmem object as MAP_SHARED|MAP_ANONYMOUS makes it (size > 0)."""
    length = (size + PAGE - 1) // PAGE * PAGE
    try:  # fd -1: MAP_SHARED | MAP_ANONYMOUS, read-write
        region = mmap.mmap(-1, length, flags=mmap.MAP_SHARED)
    except OSError as exc:
        raise SharedMemoryError(exc.errno, f"mmap of {length} shared anonymous bytes: {os.strerror(exc.errno)}")
    try:
        addr = address_of(region)
        return os.open(f"/proc/self/map_files/{addr:x}-{addr + length:x}", os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return os.memfd_create("cowtree-shared-anonymous", os.MFD_CLOEXEC)
    finally:
        region.close()


def _tmpfile(path):
    """An unnamed tmpfs file where path was (maps: '/dev/shm/#123 (deleted)'), else a memfd."""
    try:
        return os.open(os.path.dirname(path) or "/", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return os.memfd_create(os.path.basename(path) or "cowtree-tmpfile", os.MFD_CLOEXEC)


def _fill(fd, obj, spool):
    view = memoryview(spool) if spool is not None else None
    for page, offset in obj["pages"]:
        data = view[offset:offset + PAGE]
        done = os.pwrite(fd, data, page * PAGE)
        if done != PAGE:
            raise SharedMemoryError(0, f"short write into a shared memory object ({done} of {PAGE} bytes)")
    if view is not None:
        view.release()


def create(plan):
    """Create and fill every object; ({object id: fd}, {description id: fd}) in cow-apply, all
    fds above every dumped fd: one per object (mapped by the processes), one per open file
    description of a memfd fd (dup3'd to the dumped numbers, so fds that shared a description,
    after fork or dup, share its offset again).  The caller closes them (close_all) once every
    process has taken its own."""
    if not plan.shared:
        return {}, {}
    base = 1 + max((fd["fd"] for p in plan.processes for fd in p["image"]["fds"]), default=-1)
    out = {}
    try:
        for oid, obj in sorted(plan.shared.items()):
            if obj["kind"] == "anon":
                fd = _anonymous_object(obj["size"])
            elif obj["kind"] == "tmpfile":
                fd = _tmpfile(obj["name"] or "")
            else:
                sealing = os.MFD_ALLOW_SEALING if obj.get("seals") == 0 else 0
                fd = os.memfd_create(obj["name"] or "", os.MFD_CLOEXEC | sealing)
            try:
                if os.fstat(fd).st_size != obj["size"]:
                    os.ftruncate(fd, obj["size"])
                _fill(fd, obj, plan.map)
                out[oid] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
            finally:
                os.close(fd)
        return out, _descriptions(plan, out, base)
    except BaseException:
        close_all(out)
        raise


O_CLOEXEC = 0o2000000
# not for reopening an object: O_NOFOLLOW (mkstemp's) would refuse the /proc/self/fd link
NO_OPEN = os.O_CREAT | os.O_TRUNC | os.O_EXCL | O_CLOEXEC | os.O_NOFOLLOW


def _descriptions(plan, objects, base):
    """One open file description per dumped ``desc`` of a memfd fd: opened anew on its object
    with the dumped flags, at the dumped offset."""
    out = {}
    try:
        for proc in plan.processes:
            for fd in proc["image"]["fds"]:
                desc = fd.get("desc")
                if "shmem" not in fd or desc is None or desc in out:
                    continue
                opened = os.open(f"/proc/self/fd/{objects[fd['shmem']]}", (fd["flags"] & ~NO_OPEN) | O_CLOEXEC)
                try:
                    os.lseek(opened, fd.get("pos", 0), os.SEEK_SET)
                    out[desc] = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, base)
                finally:
                    os.close(opened)
    except BaseException:
        close_all(out)
        raise
    return out

