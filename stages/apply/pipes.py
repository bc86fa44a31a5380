"""Pipes and FIFOs of the tree, created (or opened) by cow-apply before the root exists.

Every restored process is a clone of cow-apply (and of its parent agent), so an
fd cow-apply holds when it creates the root is inherited by every process of
the tree: each process's restorer dup3s the open file descriptions it needs to
the dumped fd numbers and closes the rest.  One description per dumped ``desc``
(fds that shared a description, after fork or dup, share it again, with its
O_NONBLOCK); the unread bytes are written back before any process runs.
cow-apply keeps the descriptions at fd numbers above every dumped fd of the
tree, so the dup3s of one process never overwrite a source still needed.
"""

import fcntl
import os
import time

O_ACCMODE, O_NONBLOCK = 3, 0o4000
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032


class PipeError(OSError):
    pass


def is_shared_file(fd):
    """A regular file whose open file description two fds shared (a memfd's description is
    a shared memory object's: stages.apply.shmem)."""
    return fd["kind"] == "file" and "desc" in fd and "shmem" not in fd


def is_pipe_fd(fd):
    """An fd restored from a description cow-apply opens: an anonymous pipe, a FIFO, or a
    regular file whose description two fds shared."""
    return fd["kind"] == "pipe" or fd["kind"] == "fifo" and "desc" in fd or is_shared_file(fd)


def plan_pipes(processes):
    """({pipe id: {size, data}}, {desc: (pipe id, flags)}, {desc: a file fd record}) from
    the process images."""
    pipes, descs, files = {}, {}, {}
    for proc in processes:
        image = proc["image"]
        for rec in image.get("pipes", ()):
            pipes[rec["id"]] = rec
        for fd in image["fds"]:
            if is_shared_file(fd):
                files.setdefault(fd["desc"], fd)
            elif is_pipe_fd(fd):
                descs.setdefault(fd["desc"], (fd["pipe"], fd["flags"]))
    return pipes, descs, files


def create(processes):
    """Create every pipe, refill it, open its descriptions; {desc: fd in cow-apply}.
    The caller closes the fds (close_all) once every process has taken its own."""
    pipes, descs, files = plan_pipes(processes)
    if not descs and not files:
        return {}
    base = 1 + max(fd["fd"] for p in processes for fd in p["image"]["fds"])
    out = {}
    try:
        for desc, fd in sorted(files.items()):
            out[desc] = _file(fd, base)
        for pipe_id in sorted({pipe for pipe, _ in descs.values()}):
            rec = pipes[pipe_id]
            if "path" in rec:
                _fifo(pipe_id, rec, descs, base, out)
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            ends = {os.O_RDONLY: r, os.O_WRONLY: w}
            try:
                if rec["size"] != fcntl.fcntl(w, F_GETPIPE_SZ):
                    fcntl.fcntl(w, F_SETPIPE_SZ, rec["size"])
                _refill(w, rec["data"], pipe_id)
                used = set()
                for desc, (of_pipe, flags) in sorted(descs.items()):
                    if of_pipe != pipe_id:
                        continue
                    mode = flags & O_ACCMODE
                    if mode not in ends:
                        raise PipeError(f"pipe {pipe_id}: description {desc} has open mode {mode}")
                    if ends[mode] in used:  # a second description of the same end: open it anew
                        fd = os.open(f"/proc/self/fd/{ends[mode]}", mode | os.O_CLOEXEC)
                    else:
                        fd = ends[mode]
                        used.add(fd)
                    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
                    if fd not in (r, w):
                        os.close(fd)
                    fcntl.fcntl(high, fcntl.F_SETFL, flags & O_NONBLOCK)
                    out[desc] = high
            finally:
                os.close(r)
                os.close(w)
    except BaseException:
        close_all(out)
        raise
    return out


def _fifo(pipe_id, rec, descs, base, out):
    """A FIFO: the same named pipe, opened by its path.  cow-apply holds it open for reading
    and writing (so no open blocks and the refilled bytes stay) until every process has its
    descriptions; each description is a new open with the dumped access mode.  A FIFO that
    still holds bytes is held open by someone else: refilling it would add to theirs."""
    path = rec["path"]
    try:
        keep = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PipeError(f"FIFO {path} (pipe {pipe_id}): {exc.strerror}")
    try:
        held = fcntl.fcntl(keep, F_GETPIPE_SZ)
        deadline = time.monotonic() + 3  # an upstream `cow-collect --kill`'s processes may still be exiting
        while _unread(keep):
            if time.monotonic() > deadline:
                raise PipeError(f"FIFO {path} (pipe {pipe_id}) holds unread bytes now: another process has it open")
            time.sleep(0.05)
        if rec["size"] != held:
            fcntl.fcntl(keep, F_SETPIPE_SZ, rec["size"])
        _refill(keep, rec["data"], pipe_id)
        for desc, (of_pipe, flags) in sorted(descs.items()):
            if of_pipe == pipe_id:
                fd = os.open(path, (flags & O_ACCMODE) | os.O_NONBLOCK | os.O_CLOEXEC)
                high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
                os.close(fd)
                fcntl.fcntl(high, fcntl.F_SETFL, flags & O_NONBLOCK)
                out[desc] = high
        out[-pipe_id] = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, base)  # closed with the rest
    finally:
        os.close(keep)


NO_OPEN = os.O_CREAT | os.O_TRUNC | os.O_EXCL
SYS_FLOCK_KINDS = ("flock", "ofdlck")
F_OFD_SETLK = 37


def _file(rec, base):
    """One description of a regular file that fds of the tree shared: opened with the dumped
    flags at the dumped offset, with the description's own locks (flock, OFD) taken once
    here (POSIX locks belong to processes: their restorers take them)."""
    import struct

    try:
        fd = os.open(rec["path"], (rec["flags"] & ~NO_OPEN) | os.O_CLOEXEC)
    except OSError as exc:
        raise PipeError(f"{rec['path']}: {exc.strerror}")
    try:
        os.lseek(fd, rec.get("pos", 0), os.SEEK_SET)
        for kind, how, start, end in rec.get("locks", ()):
            if kind == "flock":
                fcntl.flock(fd, (fcntl.LOCK_EX if how == "write" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            elif kind == "ofdlck":
                length = 0 if end is None else end - start + 1
                fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hh4xqqi4x", fcntl.F_WRLCK if how == "write" else fcntl.F_RDLCK,
                                                         0, start, length, 0))
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
    except OSError as exc:
        raise PipeError(f"{rec['path']}: {exc.strerror}")
    finally:
        os.close(fd)


def _unread(fd):
    import struct

    return struct.unpack("i", fcntl.ioctl(fd, 0x541B, b"\0\0\0\0"))[0]  # FIONREAD


def _refill(w, data, pipe_id):
    """The unread bytes back into the empty pipe (it has the dumped capacity: they fit)."""
    view = memoryview(data)
    os.set_blocking(w, False)
    try:
        while view:
            try:
                n = os.write(w, view)
            except BlockingIOError:
                raise PipeError(f"pipe {pipe_id}: its {len(data)} unread bytes do not fit its capacity")
            view = view[n:]
    finally:
        os.set_blocking(w, True)


def close_all(fds):
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
