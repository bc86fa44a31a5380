"""The pages records: every frame's bytes once, in ascending id order, read in runs.

A frame's bytes come from the process where it was first seen.  Consecutive ids
at consecutive addresses of one process form a run.  A process with at least
PAGER_MIN_PAGES to give runs a pager (stages/linux/pager.py): it vmsplices its
readable runs, in id order, into pipes that the reader threads read straight into
the record's buffer, one copy.  The rest (small processes, runs in VMAs without
PROT_READ, a process that cannot run the pager) is read with one preadv of
/proc/PID/mem per run.  The record's buffer is what is written.

Every frame gets the CRC-32 of its bytes (``crcs``, native/helpers/crc.c), the
only pass over the bytes besides reading and writing them: the record's payload
crc is combined from the page crcs, not computed again.  Equal crcs only propose equal content:
two frames become one (``same``) after their bytes compared equal.

A reader thread (two when /proc/PID/mem does the reading) reads and checksums the
next records (the reads and the native crc run without the GIL) while the caller's
thread, the tracer, finds equal pages (in id order), writes the current record and
starts, watches and finishes the pagers.
"""

import bisect
import collections
import time
from array import array

from stages._native import ffi, lib
from stages.linux import pager as pager_mod
from stages.linux import ptrace
from stages.stream import pack_u32

from .parallel import Workers

PAGE = 4096
FRAMES_PER_RECORD = 256  # 1 MiB of data at most per record
# threads reading and checksumming records ahead of the writer: two when /proc/PID/mem is read
# (its two copies cost more than the writer's one), one when pagers give most pages (the
# pagers run too: a second reader only takes the 2 cores' time from the writer and them)
READERS, READERS_WITH_PAGERS = 2, 1
# records read ahead of the writer beyond one per reader: reading and writing a record cost
# about the same (a copy each), so with no slack the writer waits at every hiccup of the reader
AHEAD = 2
VERIFIED_CACHE = 64  # pages kept from earlier records to compare candidates with (zero pages...)
PAGER_MIN_PAGES = 256  # below this, setting a pager up (a dozen remote calls) costs more than it saves
WAIT_POLL = 0.05  # seconds between looks at the running pagers while waiting for a record


def _crc32_pages(buf, count):
    """(crcs, crc of all of buf): the crc32 of each of count pages, in native code (PCLMULQDQ
    folding, without the GIL: about ten times zlib's speed here)."""
    crcs = array("I", bytes(4 * count))
    whole = lib.cow_crc32_pages(ffi.from_buffer(buf), count, ffi.from_buffer("uint32_t[]", crcs))
    return crcs, whole


def combined_crc(crcs):
    """zlib.crc32 of the concatenation of pages whose own crcs are ``crcs`` (an array), in order."""
    return lib.cow_crc32_combine_pages(ffi.from_buffer("uint32_t[]", crcs), len(crcs))


class Progress:
    """pages, bytes and rate on stderr, at most a few times a second."""

    def __init__(self, stream, total):
        self.stream, self.total = stream, total
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, frames, out_bytes, final=False):
        if self.stream is None:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.5:
            return
        self.last = now
        secs = max(now - self.start, 1e-6)
        self.stream.write(
            f"cow-collect: pages {frames}/{self.total}, {out_bytes / (1 << 20):.1f} MiB written, "
            f"{frames * PAGE / (1 << 20) / secs:.1f} MiB/s\n"
        )
        self.stream.flush()


class _PipeStream:
    """One process's pager and where each of its runs is in the pager's stream."""

    def __init__(self, view, ranges, first_id, last_id):
        self.view, self.ranges = view, ranges  # view: the process's state.ProcView
        self.first_id, self.last_id = first_id, last_id  # the ids of the runs it gives
        self.starts = array("Q", (a for a, _ in ranges))
        self.offsets = array("Q")
        total = 0
        for _, length in ranges:
            self.offsets.append(total)
            total += length
        self.pager = None

    def offset_of(self, addr):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.starts[i] + self.ranges[i][1]:
            return None
        return self.offsets[i] + addr - self.starts[i]

    def read_at(self, offset, view):
        self.pager.read_at(offset, view)


class _Pagers:
    """The pipe streams of the processes that get a pager; started as the reading
    reaches them and finished once their last record is read (tracer thread)."""

    def __init__(self, table, views, notes):
        self.notes = notes
        self.streams = {}  # process index -> _PipeStream
        by_proc = collections.defaultdict(list)
        for first, proc, addr, n in table.runs:
            by_proc[proc].append((first, addr, n))
        for proc, runs in by_proc.items():
            vmas = views[proc].vmas
            starts = [v["start"] for v in vmas]
            ranges, last_id = [], 0  # runs come in id order: the last readable one ends the stream
            for first, addr, n in runs:
                vma = vmas[bisect.bisect_right(starts, addr) - 1]
                if vma["prot"] & 1:  # vmsplice reads as the process does: PROT_READ only
                    ranges.append((addr, n * PAGE))
                    last_id = first + n - 1
            if sum(length for _, length in ranges) >= PAGER_MIN_PAGES * PAGE:
                self.streams[proc] = _PipeStream(views[proc], ranges, runs[0][0], last_id)
        # the page of each such process's rseq area, where the kernel writes the cpu the
        # pager runs on: its bytes in the image may not be its bytes at the end
        self.volatile = set()
        for proc, stream in self.streams.items():
            addr = ptrace.get_rseq_configuration(stream.view.pid)[0] & ~(PAGE - 1)
            for first, run_addr, n in by_proc[proc]:
                if run_addr <= addr < run_addr + n * PAGE:
                    self.volatile.add(first + (addr - run_addr) // PAGE)
        self.waiting = sorted(self.streams.values(), key=lambda s: s.first_id)  # not started yet
        self.running = []

    def source(self, proc, addr):
        """(stream, offset) when the run at addr of process proc comes through a pipe."""
        stream = self.streams.get(proc)
        if stream is None or stream.pager is None:
            return None
        offset = stream.offset_of(addr)
        return None if offset is None else (stream, offset)

    def start_upto(self, last_id):
        """Start the pagers of the processes whose runs begin at or before id last_id."""
        while self.waiting and self.waiting[0].first_id <= last_id:
            stream = self.waiting.pop(0)
            pid = stream.view.pid
            pager = pager_mod.Pager(pid, stream.view.syscall_addr, stream.ranges)
            try:
                pager.start()
            except pager_mod.Unavailable as exc:
                self.notes.append(f"{exc}: its pages are read through /proc/{pid}/mem instead of a pager")
                continue
            stream.pager = pager
            self.running.append(stream)

    def finish_upto(self, last_id):
        """Finish the pagers whose runs all end at or before id last_id (all read)."""
        for stream in [s for s in self.running if s.last_id <= last_id]:
            self.running.remove(stream)
            stream.pager.finish()

    def poll(self):
        for stream in self.running:
            stream.pager.poll()

    def abandon(self):
        """After a failure, before the readers are joined: none of them waits on a pipe."""
        for stream in self.running:
            stream.pager.cancel()

    def clean_up(self):
        """Every running pager taken out of its process; returns the first error of those
        (raised by the caller only when nothing else failed)."""
        error = None
        for stream in self.running:
            try:
                stream.pager.finish()
            except OSError as exc:
                error = error or exc
        self.running = []
        return error


class _Reader:
    """Reads and checksums the pages of one record; records are independent, so two
    threads can each do one (the GIL is released while reading; pipes are read in turn)."""

    def __init__(self, table, memories, pagers):
        self.table, self.memories, self.pagers = table, memories, pagers
        # record buffers, reused once written: a fresh 1 MiB bytearray costs page faults and
        # two passes of zeroing (kernel and bytearray) for bytes that are overwritten anyway
        self.free = collections.deque()

    def read(self, first, count):
        """(buf, crcs, crc): the bytes of ids first..first+count-1 (a memoryview of a
        record buffer: give it back with recycle()), the crc32 of each page, and of all of
        buf (the payload crc when no page of buf is a duplicate)."""
        try:
            whole = self.free.pop()
        except IndexError:
            whole = bytearray(FRAMES_PER_RECORD * PAGE)
        buf = memoryview(whole)[:count * PAGE]
        offset = 0
        for proc, addr, n in self.table.runs_between(first, count):
            dest = buf[offset:offset + n * PAGE]
            source = self.pagers.source(proc, addr) if self.pagers else None
            if source is None:
                self.memories[proc].read_into(addr, dest)
            else:
                source[0].read_at(source[1], dest)
            offset += n * PAGE
        return (buf, *_crc32_pages(buf, count))

    def recycle(self, buf):
        self.free.append(buf.obj)


class _Dedup:
    """Finds, in id order, the frames whose bytes an earlier frame has: a crc proposes,
    a byte comparison decides (a crc collision never merges two different pages)."""

    def __init__(self, table, memories, volatile=frozenset(), expected=0):
        self.table, self.memories = table, memories
        # frames whose bytes may have changed since they were written (rseq areas of processes
        # that ran a pager): never the frame another one is said to equal
        self.volatile = volatile
        # crc -> first frame id with that crc (native/helpers/crc.c: a dict costs ~0.4 us a page)
        self.index = ffi.gc(lib.cow_crc_index_new(expected), lib.cow_crc_index_free)  # expected: pages
        if self.index == ffi.NULL:
            raise MemoryError("cannot allocate the crc index")
        self.more_with = {}  # crc -> later frame ids with that crc but other bytes (collisions)
        self.cached = collections.OrderedDict()  # frame id -> bytes, recently compared earlier frames

    def _bytes_of(self, fid):
        data = self.cached.get(fid)
        if data is None:
            proc, addr = self.table.where(fid)
            data = self.memories[proc].read(addr, PAGE)  # frozen: the same bytes (volatile ones aside)
            self.cached[fid] = data
            if len(self.cached) > VERIFIED_CACHE:
                self.cached.popitem(last=False)
        else:
            self.cached.move_to_end(fid)
        return data

    def record(self, first, buf, crcs):
        """(same, n): same (array of uint32) for ids first..first+len(crcs)-1, 0 = store the
        bytes; n = how many are not 0."""
        earlier = array("I", bytes(4 * len(crcs)))
        found = lib.cow_crc_index_add(self.index, ffi.from_buffer("uint32_t[]", crcs), len(crcs), first,
                                      ffi.from_buffer("uint32_t[]", earlier))
        if found < 0:
            raise MemoryError("cannot grow the crc index")
        if not found:
            return earlier, 0  # the common case: no crc seen before, all zeros
        same, dups = array("I", bytes(4 * len(crcs))), 0
        with memoryview(buf) as view:
            for i, cand in enumerate(earlier):
                if not cand:
                    continue
                # bytes, not memoryviews: memoryview == compares item by item (7 us a page)
                crc, page = crcs[i], view[i * PAGE:(i + 1) * PAGE].tobytes()
                for cand in (cand, *self.more_with.get(crc, ())):
                    if cand in self.volatile:
                        continue
                    k = cand - first
                    if (view[k * PAGE:(k + 1) * PAGE].tobytes() if k >= 0 else self._bytes_of(cand)) == page:
                        same[i] = cand
                        dups += 1
                        break
                else:
                    self.more_with.setdefault(crc, []).append(first + i)
        return same, dups


def _record(first, buf, crcs, buf_crc, same, ndups):
    """(body, data, data crc, stored) of one pages record."""
    if ndups:
        # the pages to keep, as pieces of buf written one after another (no copy)
        data, start = [], 0
        for i in (i for i, s in enumerate(same) if s):
            if i > start:
                data.append(buf[start * PAGE:i * PAGE])
            start = i + 1
        if start < len(crcs):
            data.append(buf[start * PAGE:])
        data_crc = combined_crc(array("I", (c for c, s in zip(crcs, same) if not s)))
    else:
        data, data_crc = buf, buf_crc
    body = {"first": first, "count": len(crcs), "same": pack_u32(same), "crcs": pack_u32(crcs)}
    return body, data, data_crc, len(crcs) - ndups


def write_pages(writer, table, memories, progress=None, views=None, notes=None):
    """Write the pages records of every frame in table; memories[proc_index] reads that process.
    With views (the frozen processes, in table order; called from the tracer thread), big
    processes give their pages through a pager; notes gets a line for each that could not.

    Returns (frames, stored_pages, page_bytes)."""
    total = len(table)
    pagers = _Pagers(table, views, notes if notes is not None else []) if views is not None else None
    reader = _Reader(table, memories, pagers)
    dedup = _Dedup(table, memories, pagers.volatile if pagers else frozenset(), expected=total)
    stored = 0
    pending = collections.deque()
    poll = pagers.poll if pagers else None
    readers = READERS_WITH_PAGERS if pagers and pagers.streams else READERS
    try:
        with Workers(reader.read, readers, name="cow-pages") as pool:
            try:
                for first in range(1, total + 1, FRAMES_PER_RECORD):
                    count = min(FRAMES_PER_RECORD, total + 1 - first)
                    if pagers:
                        pagers.start_upto(first + count - 1)
                    pending.append((first, pool.submit(first, count)))
                    # a few records in flight ahead of the writer (readers + AHEAD MiB): memory stays bounded
                    if len(pending) > readers + AHEAD:
                        stored += _write(writer, pending.popleft(), reader, dedup, progress, pagers, poll)
                while pending:
                    stored += _write(writer, pending.popleft(), reader, dedup, progress, pagers, poll)
            except BaseException:
                if pagers:
                    pagers.abandon()  # before the workers are joined: none waits on a pipe
                raise
    except BaseException:
        if pagers:
            pagers.clean_up()  # the first error stays the one reported
        raise
    if pagers:
        error = pagers.clean_up()
        if error is not None:
            raise error
    if progress:
        progress.update(total, writer.bytes_written, final=True)
    return total, stored, stored * PAGE


def _write(writer, pending, reader, dedup, progress, pagers, poll):
    first, job = pending
    buf, crcs, buf_crc = job.result(poll, WAIT_POLL)
    if pagers:
        pagers.finish_upto(first + len(crcs) - 1)
    body, data, crc, stored = _record(first, buf, crcs, buf_crc, *dedup.record(first, buf, crcs))
    writer.write("pages", body, data, data_crc=crc)
    data = None
    reader.recycle(buf)  # written: the output holds no reference to it
    if progress:
        progress.update(body["first"] + body["count"] - 1, writer.bytes_written)
    return stored
