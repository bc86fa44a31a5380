"""Pipes of the tree, created by cow-apply before the root exists.

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

O_ACCMODE, O_NONBLOCK = 3, 0o4000
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032


class PipeError(OSError):
    pass


def plan_pipes(processes):
    """({pipe id: {size, data}}, {desc: (pipe id, flags)}) from the process images."""
    pipes, descs = {}, {}
    for proc in processes:
        image = proc["image"]
        for rec in image.get("pipes", ()):
            pipes[rec["id"]] = rec
        for fd in image["fds"]:
            if fd["kind"] == "pipe":
                descs.setdefault(fd["desc"], (fd["pipe"], fd["flags"]))
    return pipes, descs


def create(processes):
    """Create every pipe, refill it, open its descriptions; {desc: fd in cow-apply}.
    The caller closes the fds (close_all) once every process has taken its own."""
    pipes, descs = plan_pipes(processes)
    if not descs:
        return {}
    base = 1 + max(fd["fd"] for p in processes for fd in p["image"]["fds"])
    out = {}
    try:
        for pipe_id in sorted({pipe for pipe, _ in descs.values()}):
            rec = pipes[pipe_id]
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
