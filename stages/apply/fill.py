"""Writing the plan's pages into the staging ranges of the restored processes.

cow-apply writes from outside while each process waits in its agent, from the spool
(the plan file's own pages, mmap'd), with native/helpers/pagefill.c:

  * anonymous ranges: through a userfaultfd of the process (created by its agent,
    taken with pidfd_getfd, its number in the process closed again at once, so its
    children never hold it), UFFDIO_COPY: the kernel makes each page with its bytes, no
    zero-fill and no page fault; consecutive pages in one call;
  * pages the process may have already (written before in it or in an ancestor before
    the fork: shared copy-on-write) are overwritten with process_vm_writev, which gives
    the process its own copy; long runs of them are first dropped in the process
    (MADV_DONTNEED: the parent/children keep theirs) and then made anew like the others;
  * private file ranges: process_vm_writev (a userfaultfd registers no file mapping).

Per process and range, one byte per page records which pages it may have (set when
written, copied to a child at fork); the userfaultfd is closed once the process's steps
are done, which ends its registration before the restorer moves anything.
Anything failing raises FillError; the caller kills the tree.
"""

import os
import threading

from stages._native import ffi, lib

from .agent import AgentError

PAGE = 4096
SYS_MADVISE, SYS_CLOSE, SYS_USERFAULTFD, SYS_PIDFD_GETFD = 28, 3, 323, 438
MADV_DONTNEED = 4
UFFD_USER_MODE_ONLY = 1  # a fault from the kernel (process_vm_writev) is EFAULT, never a wait
MIN_DROP_RUN = 16  # pages; shorter runs of present pages are overwritten in place
TWO_THREADS = 8192  # pages in one step from which two threads fill it (halves: a second core)


class FillError(OSError):
    pass


class Filler:
    """Page writes of the whole tree; ``ranges``: id -> plan range; ``spool``: the Plan."""

    def __init__(self, ranges, plan, window_base, use_uffd=True):
        self.ranges = ranges
        self.base = window_base
        self.use_uffd = use_uffd
        self.spool_ptr = int(ffi.cast("uint64_t", ffi.from_buffer(plan.map))) if plan.map is not None else 0
        self.offsets = ffi.from_buffer("uint64_t[]", plan.frame_offsets)
        self.nframes = len(plan.frame_offsets)
        self.present = {}  # pid -> {range id: bytearray, one byte per page}
        self.uffd = {}  # pid -> (fd in cow-apply, {registered range ids}) or None
        self.pages_written = 0
        self.pages_overwritten = 0  # of them, by process_vm_writev (pages the process had)
        self.pages_dropped = 0  # pages dropped (MADV_DONTNEED) to be written as new pages
        self.uffd_processes = 0  # processes whose new pages went by UFFDIO_COPY

    # -- the life of one process's ranges -----------------------------------------------------

    def mapped(self, pid, range_id):
        """pid has mapped range_id fresh (nothing in it yet)."""
        self.present.setdefault(pid, {})[range_id] = bytearray(self.ranges[range_id]["size"] // PAGE)

    def dropped(self, pid, range_id):
        self.present.get(pid, {}).pop(range_id, None)

    def forked(self, parent, child):
        """child starts with every range parent has now, with the same pages."""
        self.present[child] = {rid: bytearray(bits) for rid, bits in self.present.get(parent, {}).items()}

    def done(self, pid):
        """pid's steps are over: its userfaultfd goes (and with it every registration)."""
        self.present.pop(pid, None)
        entry = self.uffd.pop(pid, None)
        if entry:
            os.close(entry[0])

    def close_all(self):
        for pid in list(self.uffd):
            self.done(pid)

    def stats(self):
        return {"userfaultfd_processes": self.uffd_processes, "pages_written": self.pages_written, "pages_overwritten": self.pages_overwritten,
                "pages_dropped": self.pages_dropped}

    # -- writes ------------------------------------------------------------------------------

    def write(self, ag, pid, range_id, packed):
        """One write step: packed little-endian uint32 pairs (page, frame)."""
        n = len(packed) // 8
        if not n:
            return 0
        if len(packed) % 8:
            raise FillError(f"process {pid}: write into range {range_id}: odd page list")
        rng = self.ranges[range_id]
        at = self.base + rng["offset"]
        bits = self.present[pid][range_id]
        pairs = ffi.from_buffer("uint32_t[]", packed)
        uffd = self._uffd_for(ag, pid, rng) if rng["backing"] != "file" else -1
        if uffd >= 0:
            self._drop_present_runs(ag, pid, range_id, at, pairs, n, bits)
        halves = [(0, n)] if n < TWO_THREADS else [(0, n // 2), (n // 2, n)]
        results = [None] * len(halves)
        overwritten = ffi.new("uint64_t[]", len(halves))
        present = ffi.from_buffer(bits)

        def fill(i):
            lo, hi = halves[i]
            results[i] = lib.cow_fill_pages(ag.pid, uffd, self.spool_ptr, self.offsets, self.nframes,
                                            pairs + 2 * lo, hi - lo, at, present, len(bits), PAGE, overwritten + i)

        helper = None
        if len(halves) > 1:
            helper = threading.Thread(target=fill, args=(1,))
            helper.start()
        try:
            fill(0)
        finally:
            if helper is not None:
                helper.join()
        for r in results:
            if r is None or r < 0:
                err = -r if r is not None else 0
                raise FillError(err, f"process {pid}: writing {n} pages into range {range_id}: "
                                f"{os.strerror(err) if err else 'failed'}")
        self.pages_written += n
        self.pages_overwritten += sum(overwritten[i] for i in range(len(halves)))
        return n

    def _drop_present_runs(self, ag, pid, range_id, at, pairs, n, bits):
        """Long runs of pages the process has (copy-on-write shared, mostly) go first."""
        cap = n // MIN_DROP_RUN + 1
        out = ffi.new("uint64_t[]", 2 * cap)
        found = lib.cow_present_runs(pairs, n, ffi.from_buffer(bits), len(bits), MIN_DROP_RUN, out, cap)
        for i in range(found):
            first, count = out[2 * i], out[2 * i + 1]
            ag.syscall(SYS_MADVISE, at + first * PAGE, count * PAGE, MADV_DONTNEED,
                       what=f"drop {count} pages of range {range_id} before writing them")
            bits[first:first + count] = bytes(count)
            self.pages_dropped += count

    def _uffd_for(self, ag, pid, rng):
        """The userfaultfd of pid with rng registered, made on first use; -1 when the kernel
        gives none (then everything goes by process_vm_writev)."""
        if not self.use_uffd:
            return -1
        entry = self.uffd.get(pid, False)
        if entry is False:
            entry = self.uffd[pid] = self._take_uffd(ag, pid)
        if entry is None:
            return -1
        fd, registered = entry
        if rng["id"] not in registered:
            r = lib.cow_uffd_register(fd, self.base + rng["offset"], rng["size"])
            if r < 0:
                raise FillError(-r, f"process {pid}: userfaultfd registration of range {rng['id']}: "
                                f"{os.strerror(-r)}")
            registered.add(rng["id"])
        return fd

    def _take_uffd(self, ag, pid):
        try:
            remote = ag.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | UFFD_USER_MODE_ONLY, what="userfaultfd")
        except AgentError:
            return None  # not in this kernel, or not allowed: the slower way
        try:
            pidfd = os.pidfd_open(ag.pid)
            try:
                fd = lib.cow_syscall6(SYS_PIDFD_GETFD, pidfd, remote, 0, 0, 0, 0)
            finally:
                os.close(pidfd)
        finally:
            ag.syscall(SYS_CLOSE, remote, what="close its userfaultfd")
        if fd < 0:
            raise FillError(-fd, f"process {pid}: pidfd_getfd of its userfaultfd: {os.strerror(-fd)}")
        os.set_inheritable(fd, False)
        r = lib.cow_uffd_api(fd)
        if r < 0:
            os.close(fd)
            raise FillError(-r, f"process {pid}: userfaultfd handshake: {os.strerror(-r)}")
        self.uffd_processes += 1
        return fd, set()
