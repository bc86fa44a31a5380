"""The pages records: every frame's bytes once, in ascending id order, read in runs.

A frame's bytes come from the process where it was first seen.  Consecutive ids
at consecutive addresses of one process are read with one preadv of
/proc/PID/mem straight into the record's buffer, and that buffer is what is
written: a page is copied once from the process and once into the output.

Every frame gets the CRC-32 of its bytes (``crcs``, native/helpers/crc.c), the
only pass over the bytes besides reading and writing them: the record's payload
crc is combined from the page crcs, not computed again.  Equal crcs only propose equal content:
two frames become one (``same``) after their bytes compared equal.

Reader threads read and checksum the next records (preadv and the native crc run
without the GIL) while the caller's thread finds equal pages (in id order) and
writes the current one.
"""

import collections
import threading
import time
from _queue import SimpleQueue  # what queue.SimpleQueue is, without the queue module's import
from array import array

from stages._native import ffi, lib
from stages.stream import pack_u32

PAGE = 4096
FRAMES_PER_RECORD = 256  # 1 MiB of data at most per record
READERS = 2  # threads reading and checksumming records ahead of the writer
VERIFIED_CACHE = 64  # pages kept from earlier records to compare candidates with (zero pages...)


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


class _Reader:
    """Reads and checksums the pages of one record; records are independent, so two
    threads can each do one (the GIL is released while reading)."""

    def __init__(self, table, memories):
        self.table, self.memories = table, memories
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
            self.memories[proc].read_into(addr, buf[offset:offset + n * PAGE])
            offset += n * PAGE
        return (buf, *_crc32_pages(buf, count))

    def recycle(self, buf):
        self.free.append(buf.obj)


class _Dedup:
    """Finds, in id order, the frames whose bytes an earlier frame has: a crc proposes,
    a byte comparison decides (a crc collision never merges two different pages)."""

    def __init__(self, table, memories):
        self.table, self.memories = table, memories
        # crc -> first frame id with that crc (native/helpers/crc.c: a dict costs ~0.4 us a page)
        self.index = ffi.gc(lib.cow_crc_index_new(), lib.cow_crc_index_free)
        if self.index == ffi.NULL:
            raise MemoryError("cannot allocate the crc index")
        self.more_with = {}  # crc -> later frame ids with that crc but other bytes (collisions)
        self.cached = collections.OrderedDict()  # frame id -> bytes, recently compared earlier frames

    def _bytes_of(self, fid):
        data = self.cached.get(fid)
        if data is None:
            proc, addr = self.table.where(fid)
            data = self.memories[proc].read(addr, PAGE)  # the tree is frozen: still the same bytes
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


class _Job:
    __slots__ = ("args", "done", "value", "error")

    def __init__(self, args):
        self.args, self.done, self.value, self.error = args, threading.Event(), None, None

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Workers:
    """``count`` threads running fn on submitted arguments; results come back per job.
    (concurrent.futures would do, but importing it costs cow-collect 12 ms.)"""

    def __init__(self, fn, count):
        self.fn, self.jobs = fn, SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name=f"cow-pages-{i}", daemon=True)
                        for i in range(count)]
        for t in self.threads:
            t.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job.value = self.fn(*job.args)
            except BaseException as exc:  # handed to the caller by result()
                job.error = exc
            job.done.set()

    def submit(self, *args):
        job = _Job(args)
        self.jobs.put(job)
        return job

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


def write_pages(writer, table, memories, progress=None):
    """Write the pages records of every frame in table; memories[proc_index] reads that process.

    Returns (frames, stored_pages, page_bytes)."""
    total = len(table)
    reader = _Reader(table, memories)
    dedup = _Dedup(table, memories)
    stored = 0
    pending = collections.deque()
    with _Workers(reader.read, READERS) as pool:
        for first in range(1, total + 1, FRAMES_PER_RECORD):
            pending.append((first, pool.submit(first, min(FRAMES_PER_RECORD, total + 1 - first))))
            # a few records in flight ahead of the writer: memory stays bounded
            if len(pending) > READERS:
                stored += _write(writer, pending.popleft(), reader, dedup, progress)
        while pending:
            stored += _write(writer, pending.popleft(), reader, dedup, progress)
    if progress:
        progress.update(total, writer.bytes_written, final=True)
    return total, stored, stored * PAGE


def _write(writer, pending, reader, dedup, progress):
    first, job = pending
    buf, crcs, buf_crc = job.result()
    body, data, crc, stored = _record(first, buf, crcs, buf_crc, *dedup.record(first, buf, crcs))
    writer.write("pages", body, data, data_crc=crc)
    data = None
    reader.recycle(buf)  # written: the output holds no reference to it
    if progress:
        progress.update(body["first"] + body["count"] - 1, writer.bytes_written)
    return stored
