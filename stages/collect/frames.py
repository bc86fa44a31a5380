"""Frame ids: one dense id per physical page (PFN or swap entry) over the whole tree.

Ids are assigned in the order VMAs are fed (processes in stream order, VMAs in
address order), so the first holder of each frame is known: its contents are
read from that process only.  New ids at adjacent addresses of one process are
kept as runs, so pages are later read with one pread per run.  The per-page work
(pagemap entry -> identity -> id) is native/helpers/frames.c.
"""

import bisect
import os
import threading
from array import array

from stages._native import ffi, lib
from stages.linux import pagemap

from .parallel import Workers

PAGE = pagemap.PAGE

# Kernel-provided mappings: never frames (apply places the kernel's own).
NO_FRAME_KINDS = {"vdso", "vvar", "vvar_vclock", "vsyscall", "special"}
PAGEMAP_SLICE = pagemap.SLICE  # pages per pagemap read (2 MiB of entries, 1 GiB of address space)
PREFETCH_BUDGET = 1 << 23  # entries PagemapPrefetch may hold (64 MiB, 32 GiB of address space)


def has_frames(vma):
    return not vma["shared"] and vma["kind"] not in NO_FRAME_KINDS


class PagemapPrefetch:
    """Reads the pagemap entries of processes on two threads while the caller works on the
    ones before (their state, their frame ids): the kernel's page walk behind a pagemap read
    (~50 ns a page) then overlaps the caller's work instead of following it.

    A process is submitted once nothing more changes its memory (its remote calls are over).
    VMAs over PAGEMAP_SLICE pages, and all once PREFETCH_BUDGET entries are held, are left to
    the caller (entries None), as is every VMA whose read failed: the caller's own read then
    reports the error as it always has."""

    def __init__(self, threads=2):
        self.left = PREFETCH_BUDGET  # entries this prefetch may still hold
        self.lock = threading.Lock()  # for left
        # two: the caller mostly waits for them once the remote calls are over
        self.workers = Workers(self._read, threads, name="cow-pagemap")
        self.jobs = {}  # process index -> its Job

    def submit(self, index, pid, vmas):
        self.jobs[index] = self.workers.submit(pid, vmas)

    def entries(self, index, count):
        """The entries read for process index (a list, one per VMA); all None when not
        submitted, or when the read failed."""
        job = self.jobs.pop(index, None)
        if job is None:
            return [None] * count
        try:
            out = job.result()
        except Exception:
            return [None] * count
        with self.lock:  # the caller has them now (and drops them VMA by VMA): budget back
            self.left += sum(len(blob) // 8 for blob in out if blob is not None)
        return out

    def close(self):
        self.workers.close()

    def _read(self, pid, vmas):
        out = [None] * len(vmas)
        try:
            fd = pagemap.open_pagemap(pid)
        except OSError:
            return out
        try:
            for i, vma in enumerate(vmas):
                npages = (vma["end"] - vma["start"]) // PAGE
                if not has_frames(vma) or npages > PAGEMAP_SLICE:
                    continue
                with self.lock:
                    if npages > self.left:
                        continue
                    self.left -= npages
                try:
                    blob = os.pread(fd, 8 * npages, vma["start"] // PAGE * 8)
                except OSError:
                    blob = b""
                if len(blob) == 8 * npages:
                    out[i] = blob
                else:
                    with self.lock:
                        self.left += npages
        finally:
            os.close(fd)
        return out


class FrameTable:
    """The page identities seen so far (a native hash table: this runs once per page of the
    tree) and the runs of first-seen pages."""

    def __init__(self, zero_pfn):
        self.zero_pfn = zero_pfn
        self.native = ffi.gc(lib.cow_frames_new(), lib.cow_frames_free)
        if self.native == ffi.NULL:
            raise MemoryError("cannot allocate the frame table")
        self.count = 0    # ids given so far (1..count)
        # [first id, process index, address, n]: ids first..first+n-1 were first seen at
        # address, address + 4096, ... of that process
        self.runs = []
        self._firsts = None  # array of runs[i][0], see _run_firsts
        # buffers for one pagemap slice, reused: entries in, frame ids and new-id runs out
        self._entries = ffi.new("uint64_t[]", PAGEMAP_SLICE)
        self._frames = ffi.new("uint32_t[]", PAGEMAP_SLICE)
        self._runs = ffi.new("uint32_t[]", 2 * PAGEMAP_SLICE)
        self._nruns = ffi.new("unsigned long *")

    def __len__(self):
        return self.count

    def vma_frames(self, pagemap_fd, proc_index, vma, entries=None):
        """The frame map of one VMA (array of uint32), or None when it has no frame.
        ``entries``: its pagemap entries when read before (PagemapPrefetch), else None."""
        if not has_frames(vma):
            return None
        file_backed = int(vma["kind"] == "file")
        npages = (vma["end"] - vma["start"]) // PAGE
        frames = None  # allocated at the first frame: big reservations are mostly empty
        run = None  # the open run, extended while new ids come at adjacent pages
        run_next = -1  # the page index that would extend it
        # one pagemap read per VMA; huge VMAs (address space reservations) in slices
        for base in range(0, npages, PAGEMAP_SLICE):
            n = min(PAGEMAP_SLICE, npages - base)
            if entries is not None and len(entries) == 8 * npages:
                source = ffi.from_buffer("uint64_t[]", entries)  # npages <= PAGEMAP_SLICE: one pass
            else:
                source = self._entries
                got = os.preadv(pagemap_fd, [ffi.buffer(source, 8 * n)], (vma["start"] // PAGE + base) * 8)
                if got != 8 * n:
                    raise OSError(f"short pagemap read: {got // 8} of {n} entries at {vma['start'] + base * PAGE:#x}")
            present = lib.cow_frames_assign(self.native, source, n, self.zero_pfn, file_backed,
                                            self._frames, self._runs, self._nruns)
            if present < 0:
                raise MemoryError("cannot grow the frame table")
            if not present:
                continue
            if frames is None:
                frames = array("I", bytes(4 * npages))
            got = array("I")
            got.frombytes(ffi.buffer(self._frames, 4 * n))
            frames[base:base + n] = got
            pairs = self._runs
            for k in range(0, 2 * self._nruns[0], 2):
                i, length = base + pairs[k], pairs[k + 1]
                if i == run_next:
                    run[3] += length
                else:
                    run = [self.count + 1, proc_index, vma["start"] + i * PAGE, length]
                    self.runs.append(run)
                self.count += length
                run_next = i + length
        assert self.count == lib.cow_frames_count(self.native)
        return frames

    def _run_firsts(self):
        """The first id of every run, for bisect (built once the table is complete)."""
        if self._firsts is None or len(self._firsts) != len(self.runs):
            self._firsts = array("I", (run[0] for run in self.runs))
        return self._firsts

    def runs_between(self, first, count):
        """(proc_index, addr, n) runs covering ids first..first+count-1, in id order."""
        runs, last = self.runs, first + count  # last: exclusive
        lo = max(bisect.bisect_right(self._run_firsts(), first) - 1, 0)  # the run holding id first
        out = []
        while lo < len(runs) and runs[lo][0] < last:
            run_first, proc, addr, n = runs[lo]
            a, b = max(run_first, first), min(run_first + n, last)
            out.append((proc, addr + (a - run_first) * PAGE, b - a))
            lo += 1
        return out

    def where(self, fid):
        """(proc_index, addr) of the page where frame fid was first seen."""
        run_first, proc, addr, _ = self.runs[bisect.bisect_right(self._run_firsts(), fid) - 1]
        return proc, addr + (fid - run_first) * PAGE
