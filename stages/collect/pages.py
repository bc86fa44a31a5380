"""The pages records: every frame's bytes once, in ascending id order, read in runs.

A frame's bytes come from the process where it was first seen.  Consecutive ids
at consecutive addresses of one process are read with one preadv of
/proc/PID/mem straight into the record's buffer, and that buffer is what is
written: a page is copied once from the process and once into the output.

Every frame gets the CRC-32 of its bytes (``crcs``), the only pass over the
bytes besides reading and writing them: the record's payload crc is combined
from the page crcs, not computed again.  Equal crcs only propose equal content:
two frames become one (``same``) after their bytes compared equal.

Reader threads read and checksum the next records while the caller's thread
finds equal pages (in id order) and writes the current one.
"""

import collections
import time
import zlib
from array import array
from concurrent.futures import ThreadPoolExecutor

from stages.stream import pack_u32

PAGE = 4096
FRAMES_PER_RECORD = 256  # 1 MiB of data at most per record
READERS = 2  # threads reading and checksumming records ahead of the writer
VERIFIED_CACHE = 64  # pages kept from earlier records to compare candidates with (zero pages...)


def _shift_tables():
    """Four 256-entry tables for the linear map M with crc32(A + B) = M(crc32(A)) ^ crc32(B)
    for any B of PAGE bytes (zlib's crc32_combine with a fixed length), one per byte of
    crc32(A).  M(c) = crc32(B, c) ^ crc32(B) for any such B, and M is GF(2)-linear."""
    zeros = bytes(PAGE)
    base = zlib.crc32(zeros)
    basis = [zlib.crc32(zeros, 1 << bit) ^ base for bit in range(32)]
    tables = []
    for k in range(4):
        table = [0] * 256
        for b in range(1, 256):
            low = b & -b  # the lowest set bit: table[b] = table[b without it] ^ basis of it
            table[b] = table[b ^ low] ^ basis[8 * k + low.bit_length() - 1]
        tables.append(table)
    return tables


_T0, _T1, _T2, _T3 = _shift_tables()


def combined_crc(crcs):
    """zlib.crc32 of the concatenation of pages whose own crcs are ``crcs``, in order."""
    crc = 0
    for c in crcs:
        crc = _T0[crc & 255] ^ _T1[(crc >> 8) & 255] ^ _T2[(crc >> 16) & 255] ^ _T3[crc >> 24] ^ c
    return crc


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

    def read(self, first, count):
        """(buf, crcs): the bytes of ids first..first+count-1 and the crc32 of each page."""
        buf = bytearray(count * PAGE)
        with memoryview(buf) as view:
            offset = 0
            for proc, addr, n in self.table.runs_between(first, count):
                self.memories[proc].read_into(addr, view[offset:offset + n * PAGE])
                offset += n * PAGE
            crc32 = zlib.crc32
            crcs = array("I", [crc32(view[i:i + PAGE]) for i in range(0, len(buf), PAGE)])
        return buf, crcs


class _Dedup:
    """Finds, in id order, the frames whose bytes an earlier frame has: a crc proposes,
    a byte comparison decides (a crc collision never merges two different pages)."""

    def __init__(self, table, memories):
        self.table, self.memories = table, memories
        self.first_with = {}  # crc -> first frame id with that crc
        self.more_with = {}  # crc -> later frame ids with that crc but other bytes (collisions)
        self.cached = collections.OrderedDict()  # frame id -> bytes, recently compared earlier frames

    def _bytes_of(self, fid):
        data = self.cached.get(fid)
        if data is None:
            (proc, addr, _), = self.table.runs_between(fid, 1)
            data = self.memories[proc].read(addr, PAGE)  # the tree is frozen: still the same bytes
            self.cached[fid] = data
            if len(self.cached) > VERIFIED_CACHE:
                self.cached.popitem(last=False)
        else:
            self.cached.move_to_end(fid)
        return data

    def record(self, first, buf, crcs):
        """same (array of uint32) for ids first..first+len(crcs)-1; 0 = store the bytes."""
        same = array("I", bytes(4 * len(crcs)))
        first_with = self.first_with
        with memoryview(buf) as view:
            for i, crc in enumerate(crcs):
                fid = first + i
                earlier = first_with.setdefault(crc, fid)
                if earlier == fid:
                    continue
                page = view[i * PAGE:(i + 1) * PAGE]
                for cand in (earlier, *self.more_with.get(crc, ())):
                    k = cand - first
                    if (view[k * PAGE:(k + 1) * PAGE] if k >= 0 else self._bytes_of(cand)) == page:
                        same[i] = cand
                        break
                else:
                    self.more_with.setdefault(crc, []).append(fid)
        return same


def _record(first, buf, crcs, same):
    """(body, data, data crc, stored) of one pages record."""
    dups = [i for i, s in enumerate(same) if s]
    if dups:
        # rare: copy out only the pages to keep (the common case sends buf as read)
        with memoryview(buf) as view:
            keep, start = [], 0
            for i in dups:
                keep.append(view[start * PAGE:i * PAGE])
                start = i + 1
            keep.append(view[start * PAGE:])
            data = b"".join(keep)
        data_crc = combined_crc(c for c, s in zip(crcs, same) if not s)
    else:
        data = buf
        data_crc = combined_crc(crcs)
    body = {"first": first, "count": len(crcs), "same": pack_u32(same), "crcs": pack_u32(crcs)}
    return body, data, data_crc, len(crcs) - len(dups)


def write_pages(writer, table, memories, progress=None):
    """Write the pages records of every frame in table; memories[proc_index] reads that process.

    Returns (frames, stored_pages, page_bytes)."""
    total = len(table)
    reader = _Reader(table, memories)
    dedup = _Dedup(table, memories)
    stored = 0
    pending = collections.deque()
    with ThreadPoolExecutor(READERS, thread_name_prefix="cow-pages") as pool:
        for first in range(1, total + 1, FRAMES_PER_RECORD):
            pending.append((first, pool.submit(reader.read, first, min(FRAMES_PER_RECORD, total + 1 - first))))
            # a few records in flight ahead of the writer: memory stays bounded
            if len(pending) > READERS:
                stored += _write(writer, pending.popleft(), dedup, progress)
        while pending:
            stored += _write(writer, pending.popleft(), dedup, progress)
    if progress:
        progress.update(total, writer.bytes_written, final=True)
    return total, stored, stored * PAGE


def _write(writer, pending, dedup, progress):
    first, job = pending
    buf, crcs = job.result()
    body, data, crc, stored = _record(first, buf, crcs, dedup.record(first, buf, crcs))
    writer.write("pages", body, data, data_crc=crc)
    if progress:
        progress.update(body["first"] + body["count"] - 1, writer.bytes_written)
    return stored
