"""The pages records: every frame's bytes once, in ascending id order, read in runs.

A frame's bytes come from the process where it was first seen.  Consecutive ids
at consecutive addresses of one process are read with one pread of
/proc/PID/mem.  Frames with equal bytes are stored once (``same``).
"""

import hashlib
import time
from array import array

from stages.stream import pack_u32

PAGE = 4096
FRAMES_PER_RECORD = 256  # 1 MiB of data at most per record


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


def _runs(table, first, count):
    """Split ids first..first+count-1 into (proc_index, addr, n) runs of adjacent pages."""
    runs = []
    for fid in range(first, first + count):
        proc, addr = table.first_proc[fid - 1], table.first_addr[fid - 1]
        if runs and runs[-1][0] == proc and runs[-1][1] + runs[-1][2] * PAGE == addr:
            runs[-1][2] += 1
        else:
            runs.append([proc, addr, 1])
    return runs


def write_pages(writer, table, memories, progress=None):
    """Write the pages records of every frame in table; memories[proc_index] reads that process.

    Returns (frames, stored_pages, page_bytes)."""
    total = len(table)
    seen = {}  # content hash -> first frame id with those bytes
    stored = 0
    for first in range(1, total + 1, FRAMES_PER_RECORD):
        count = min(FRAMES_PER_RECORD, total + 1 - first)
        same = array("I")
        hashes = bytearray()
        data = bytearray()
        fid = first
        for proc, addr, n in _runs(table, first, count):
            blob = memories[proc].read(addr, n * PAGE)
            for i in range(n):
                page = blob[i * PAGE:(i + 1) * PAGE]
                digest = hashlib.blake2b(page, digest_size=16).digest()
                hashes += digest
                earlier = seen.get(digest)
                if earlier is None:
                    seen[digest] = fid
                    same.append(0)
                    data += page
                    stored += 1
                else:
                    same.append(earlier)
                fid += 1
        body = {"first": first, "count": count, "same": pack_u32(same), "hashes": bytes(hashes)}
        writer.write("pages", body, bytes(data))
        if progress:
            progress.update(first + count - 1, writer.bytes_written)
    if progress:
        progress.update(total, writer.bytes_written, final=True)
    return total, stored, stored * PAGE
