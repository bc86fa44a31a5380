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
import os

from stages.linux import freeze, pagemap
from stages.linux.memory import ProcessMemory
from stages.stream import StreamWriter, images

from . import pages as pages_mod
from . import state
from .frames import FrameTable
from .refusals import Refused, process_reasons
from .vdso import vdso_identity

RESUME, KILL, LEAVE_STOPPED = "resume", "kill", "leave-stopped"


class CollectError(Exception):
    pass


class Collection:
    """The frozen tree and what was read from it (everything but the page bytes)."""

    def __init__(self, tree):
        self.tree = tree
        self.views = []
        self.records = []
        self.vma_records = []
        self.table = None
        self.vdso = None

    def inspect(self):
        """Step 2: the /proc view of every process, and refusals."""
        reasons = [(pid, "is a zombie (exited, not reaped by its parent)") for pid in self.tree.zombies]
        for pid in self.tree.order:
            try:
                view = state.ProcView(pid, self.tree.threads[pid])
            except FileNotFoundError:
                raise CollectError(f"process {pid}: vanished while frozen")
            self.views.append(view)
            reasons.extend((pid, text) for text in process_reasons(pid, view.status, view.vmas, view.fds))
        if reasons:
            raise Refused(reasons)

    def read(self):
        """Step 3: registers, brk, sigactions and frame maps of every process."""
        self.vdso = vdso_identity(self.tree.root, self.views[0].vmas)
        self.table = FrameTable(pagemap.zero_pfn())
        for index, view in enumerate(self.views):
            pid = view.pid
            try:
                threads = state.thread_records(view)
                brk, sigactions, tid_address = state.remote_state(view)
                threads[0]["tid_address"] = tid_address  # the injected calls ran in the main thread
            except OSError as exc:
                raise CollectError(f"process {pid}: {exc}")
            self.records.append(state.process_record(view, threads, brk, sigactions))
            fd = pagemap.open_pagemap(pid)
            try:
                vmas = [state.vma_record(v, self.table.vma_frames(fd, index, v)) for v in view.vmas]
            finally:
                os.close(fd)
            self.vma_records.append({"pid": pid, "vmas": vmas})

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
            frames, stored, page_bytes = pages_mod.write_pages(writer, self.table, memories, progress)
        finally:
            for mem in memories:
                mem.close()
        summary = {"frames": frames, "stored_pages": stored, "page_bytes": page_bytes,
                   "processes": len(self.records)}
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
    try:
        coll = Collection(tree)
        coll.inspect()
        coll.read()
        summary = coll.write(output.file, progress_stream)
        output.commit()
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
