"""The pages records: every frame's bytes once, in ascending id order, read in runs.

A frame's bytes come from the process where it was first seen.  Consecutive ids
at consecutive addresses of one process are read with one preadv of
/proc/PID/mem straight into the record's buffer.  Frames with equal bytes are
stored once (``same``).

Reader threads read, hash and checksum the next records while the caller's
thread finds equal pages (in id order) and writes the current one.  preadv,
SHA-256 of a page, crc32 and write release the GIL, so they use every core.
"""

import collections
import hashlib
import time
from array import array
from concurrent.futures import ThreadPoolExecutor

from stages.stream import envelope, pack_u32

PAGE = 4096
FRAMES_PER_RECORD = 256  # 1 MiB of data at most per record
READERS = 2  # threads reading and hashing records ahead of the writer


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
    """Reads, hashes and checksums the pages of one record; records are independent, so
    two threads can each do one (the GIL is released while reading and hashing)."""

    def __init__(self, table, memories):
        self.table, self.memories = table, memories

    def read(self, first, count):
        """(buf, hashes, crc): the bytes of ids first..first+count-1, their frame hashes and
        the payload crc of buf (used when no page of buf turns out to be a duplicate)."""
        buf = bytearray(count * PAGE)
        with memoryview(buf) as view:
            offset = 0
            for proc, addr, n in self.table.runs_between(first, count):
                self.memories[proc].read_into(addr, view[offset:offset + n * PAGE])
                offset += n * PAGE
            # SHA-256 (first 16 bytes): with the CPU's SHA instructions about twice as fast
            # as BLAKE2b on 4 KiB pages
            sha256 = hashlib.sha256
            hashes = [sha256(view[i:i + PAGE]).digest()[:16] for i in range(0, len(buf), PAGE)]
        return buf, hashes, envelope.data_crc(buf)


def _record(first, buf, hashes, buf_crc, seen):
    """(body, data, data crc or None, stored) of one pages record; ``seen`` (content
    hash -> first frame id with those bytes) is updated, so records must come here in
    id order."""
    count = len(hashes)
    same = array("I", bytes(4 * count))
    dups = []  # indexes of pages whose bytes an earlier frame already has
    for i, digest in enumerate(hashes):
        earlier = seen.setdefault(digest, first + i)
        if earlier != first + i:
            same[i] = earlier
            dups.append(i)
    if dups:
        # rare: copy out only the pages to keep (the common case sends buf as read)
        with memoryview(buf) as view:
            keep, start = [], 0
            for i in dups:
                keep.append(view[start * PAGE:i * PAGE])
                start = i + 1
            keep.append(view[start * PAGE:])
            data = b"".join(keep)
        buf_crc = None  # not the crc of data: the writer computes it
    else:
        data = buf
    body = {"first": first, "count": count, "same": pack_u32(same), "hashes": b"".join(hashes)}
    return body, data, buf_crc, count - len(dups)


def write_pages(writer, table, memories, progress=None):
    """Write the pages records of every frame in table; memories[proc_index] reads that process.

    Returns (frames, stored_pages, page_bytes)."""
    total = len(table)
    reader = _Reader(table, memories)
    seen = {}
    stored = 0
    pending = collections.deque()
    with ThreadPoolExecutor(READERS, thread_name_prefix="cow-pages") as pool:
        for first in range(1, total + 1, FRAMES_PER_RECORD):
            pending.append((first, pool.submit(reader.read, first, min(FRAMES_PER_RECORD, total + 1 - first))))
            # a few records in flight ahead of the writer: memory stays bounded
            if len(pending) > READERS:
                stored += _write(writer, pending.popleft(), seen, progress)
        while pending:
            stored += _write(writer, pending.popleft(), seen, progress)
    if progress:
        progress.update(total, writer.bytes_written, final=True)
    return total, stored, stored * PAGE


def _write(writer, pending, seen, progress):
    first, job = pending
    body, data, crc, stored = _record(first, *job.result(), seen)
    writer.write("pages", body, data, data_crc=crc)
    if progress:
        progress.update(body["first"] + body["count"] - 1, writer.bytes_written)
    return stored
