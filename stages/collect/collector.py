"""cow-collect's work: freeze the tree, read it, write the image stream, release the tree.

Order matters:
  1. freeze every thread of the tree (nothing changes while we read);
  2. read /proc for every process and decide refusals, before any byte is written;
  3. read registers, remote-syscall state and the frame maps of every process;
  4. write header, process records, vmas records, then the pages (streamed as read);
  5. release the tree: resume (default), leave it stopped, or kill it once the
     stream is complete and flushed.
Whatever fails, the tree is resumed (see run_collect's finally).
"""

import datetime
import errno
import os
import time

from stages.linux import freeze, pagemap, procfs, tty
from stages.linux.memory import ProcessMemory
from stages.stream import StreamWriter, images, is_broken_pipe

from . import pages as pages_mod
from . import state
from .frames import FrameTable, PagemapPrefetch
from .parallel import ordered_map
from .refusals import Refused, mark_caller_terminal, pipe_reasons, process_reasons
from .shmem import SharedObjects
from .vdso import vdso_identity

RESUME, KILL, LEAVE_STOPPED = "resume", "kill", "leave-stopped"
DEATH_GRACE = 0.5  # seconds to wait for a process that failed a read to show it is dying
SIGKILL_BIT = 1 << 8  # SIGKILL (9) in the SigPnd/ShdPnd masks


def _dying(pid):
    try:
        stat = procfs.read_stat(pid)
        status = procfs.read_status(pid)
    except OSError:
        return True
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    return stat["state"] in ("Z", "X") or bool(stat["flags"] & procfs.PF_EXITING) or bool(pending & SIGKILL_BIT)


class CollectError(Exception):
    pass


class OutputError(CollectError):
    """The image could not be written (disk full, I/O error, ...); a closed pipe stays an
    OSError(EPIPE), which the command reports as such."""


def _output_error(exc, where):
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return OutputError(f"cannot write {where}: {exc.strerror or exc} ({name})")


class _Sink:
    """The output file object, with write errors that say which file and which errno."""

    def __init__(self, fileobj, where):
        self.fileobj, self.where = fileobj, where

    def write(self, blob):
        try:
            return self.fileobj.write(blob)
        except OSError as exc:
            if exc.errno == errno.EPIPE or exc.errno is None:
                raise
            raise _output_error(exc, self.where) from exc

    def flush(self):
        try:
            self.fileobj.flush()
        except OSError as exc:
            if exc.errno == errno.EPIPE or exc.errno is None:
                raise
            raise _output_error(exc, self.where) from exc


class Collection:
    """The frozen tree and what was read from it (everything but the page bytes)."""

    def __init__(self, tree):
        self.tree = tree
        self.views = []
        self.records = []
        self.vma_records = []
        self.table = None
        self.vdso = None
        self.shared = None  # SharedObjects: MAP_SHARED anonymous memory and memfds
        self.notes = []  # warnings for the user

    def inspect(self):
        """Step 2: the /proc view of every process, and refusals."""
        reasons = [(pid, "is a zombie (exited, not reaped by its parent)") for pid in self.tree.zombies]
        reasons += [(pid, f"its main thread has exited ({n} other threads run on)")
                    for pid, n in self.tree.leaderless.items()]
        terminal = tty.caller_terminal()
        # on several threads: each smaps read is a kernel page walk (~8 ms per 256 MiB process)
        self.views = ordered_map(self._view, self.tree.order)
        for pid, view in zip(self.tree.order, self.views):
            mark_caller_terminal(view.fds, terminal)
            reasons.extend((pid, text)
                           for text in process_reasons(pid, view.status, view.vmas, view.fds, view.tids))
        holders = state.pipe_holders(self.views)
        reasons.extend(pipe_reasons(holders, state.pipes_held_outside(set(self.tree.order), state.pipe_links(self.views))))
        self.shared = SharedObjects(self.views)
        self.shared.held_outside(set(self.tree.order))
        reasons.extend(self.shared.reasons)
        if reasons:
            raise Refused(reasons)

    def _view(self, pid):
        try:
            return state.ProcView(pid, self.tree.threads[pid])
        except FileNotFoundError:  # its /proc entries went: killed (check_alive's words)
            raise CollectError(f"process {pid}: exited while the tree was frozen (killed?)")

    def read(self):
        """Step 3: registers, brk, sigactions and frame maps of every process."""
        self.vdso = vdso_identity(self.tree.root, self.views[0].vmas)
        self.table = FrameTable(pagemap.zero_pfn())
        try:
            pipes = state.PipeTable(self.views)
        except OSError as exc:
            raise CollectError(f"reading pipes: {exc}")
        try:
            pipe_descs = [f["desc"] for f in pipes.fd_fields.values()]
            self.shared.assign_descs(1 + max(pipe_descs, default=0))
        except OSError as exc:
            raise CollectError(f"reading memfds: {exc}")
        prefetch = PagemapPrefetch()
        try:
            self._read_states(pipes, prefetch)
            self._read_frames(prefetch)
        finally:
            prefetch.close()

    def _read_states(self, pipes, prefetch):
        for index, view in enumerate(self.views):
            pid = view.pid
            try:
                state.abort_rseq_sections(view)
                threads = state.thread_records(view)
                brk, sigactions, tid_address = state.remote_state(view, self.notes)
                threads[0]["tid_address"] = tid_address  # the injected calls ran in the main thread
                for thread in threads[1:]:
                    thread["tid_address"], thread["sigaltstack"] = state.remote_thread_state(view, thread["tid"])
            except OSError as exc:
                self.check_alive()
                raise CollectError(f"process {pid}: {exc}")
            record = state.process_record(view, threads, brk, sigactions, pipes)
            if pid in self.tree.stopped:
                record["state"]["stopped"] = True  # cow-apply stops it again
            for fd_rec, fd in zip(record["fds"], view.fds):
                sid = self.shared.fd_id(pid, fd)
                if sid:
                    fd_rec["shmem"], fd_rec["desc"] = sid, self.shared.fd_desc[(pid, fd["fd"])]
            self.records.append(record)
            # its remote calls are over: what the pagemap says now is what it will be
            prefetch.submit(index, pid, view.vmas)

    def _read_frames(self, prefetch):
        """Frame ids are given in process order: they need every earlier process's."""
        for index, view in enumerate(self.views):
            pid = view.pid
            entries = prefetch.entries(index, len(view.vmas))
            try:
                fd = pagemap.open_pagemap(pid)
                try:
                    vmas = [self._vma_record(v, self.table.vma_frames(fd, index, v, pre), pid)
                            for v, pre in zip(view.vmas, entries)]
                finally:
                    os.close(fd)
            except OSError:
                self.check_alive()
                raise
            self.vma_records.append({"pid": pid, "vmas": vmas})

    def _vma_record(self, vma, frames, pid):
        rec = state.vma_record(vma, frames, pid)
        sid = self.shared.vma_id(vma)
        if sid:
            rec["shmem"] = sid
            rec["pgoff"] = vma["pgoff"]  # where in the object (also for anonymous ones)
        return rec

    def check_alive(self):
        """Raise CollectError naming a process of the tree that has died since it was frozen
        (only a SIGKILL from someone else does that to a stopped process).  A killed task
        leaves its ptrace stop before it is marked exiting, so look for a short while."""
        deadline = time.monotonic() + DEATH_GRACE
        while True:
            for view in self.views:
                if _dying(view.pid):
                    raise CollectError(f"process {view.pid}: exited while the tree was frozen (killed?)")
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def header(self):
        uname = os.uname()
        return {
            "kernel": uname.release, "arch": uname.machine, "page_size": pagemap.PAGE,
            "root_pid": self.tree.root, "vdso": self.vdso, "tool": "cow-collect",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def write(self, out, progress_stream=None):
        """Step 4: the whole stream.  Returns the trailer summary."""
        writer = StreamWriter(out, images.FORMAT, self.header())
        for rec in self.records:
            writer.write("process", rec)
        for rec in self.vma_records:
            writer.write("vmas", rec)
        memories = [ProcessMemory(view.pid) for view in self.views]
        try:
            progress = pages_mod.Progress(progress_stream, len(self.table)) if progress_stream else None
            frames, stored, page_bytes = pages_mod.write_pages(writer, self.table, memories, progress,
                                                               views=self.views, notes=self.notes)
        except OSError as exc:
            if not is_broken_pipe(exc):
                self.check_alive()  # a read failed: most likely its process died
            raise
        finally:
            for mem in memories:
                mem.close()
        summary = {"frames": frames, "stored_pages": stored, "page_bytes": page_bytes,
                   "processes": len(self.records)}
        if len(self.shared):
            try:
                summary["shmem_objects"], summary["shmem_pages"] = self.shared.write(writer)
            except OSError as exc:
                if not is_broken_pipe(exc):
                    self.check_alive()
                raise
        writer.close(summary=summary)
        summary["stream_bytes"] = writer.bytes_written
        return summary


def run_collect(root, output, mode=RESUME, progress_stream=None, notes=None):
    """Collect the tree at root into output (a stages.stream.OutputFile).

    On success the output is committed and the tree released per ``mode``; on any
    exception the output is abandoned, the tree resumed, and the exception re-raised.
    ``notes`` (a list) receives warnings for the user.  Returns the summary."""
    notes = notes if notes is not None else []
    try:
        tree = freeze.freeze_tree(root)  # resumes what it froze if it fails
    except BaseException:
        output.abandon()
        raise
    notes.extend(f"process {pid} left the tree while it was being frozen (its parent exited): not dumped"
                 for pid in tree.departed)
    try:
        coll = Collection(tree)
        coll.inspect()
        coll.read()
        where = output.path or "the standard output"
        try:
            summary = coll.write(_Sink(output.file, where), progress_stream)
        finally:
            notes.extend(coll.notes)
        try:
            output.commit()  # the last buffered bytes: the disk may fill here too
        except OSError as exc:
            if exc.errno == errno.EPIPE or exc.errno is None:
                raise
            raise _output_error(exc, where) from exc
    except BaseException:
        output.abandon()
        errors = tree.resume()
        notes.extend(errors)
        raise
    finally:
        if not tree.released and mode == RESUME:
            notes.extend(tree.resume())
    if mode == KILL:
        for pid, ppid in tree.kill():
            notes.append(f"process {pid} is dead but not yet reaped by its parent {ppid}: its pid is not free yet")
    elif mode == LEAVE_STOPPED:
        notes.extend(tree.leave_stopped())
    summary["processes"] = len(tree.order)
    return summary
