"""/proc/PID/pagemap: one 64-bit entry per virtual page (real PFNs need CAP_SYS_ADMIN).

Bits: 0-54 PFN (present) or swap type (0-4) and offset (5-54) (swapped);
56 exclusively mapped; 61 file page or shared anon; 62 swapped; 63 present.
"""

import mmap
import os
from array import array

from .memory import address_of

PAGE = 4096
PFN_MASK = (1 << 55) - 1
EXCLUSIVE = 1 << 56
FILE_OR_SHARED = 1 << 61
SWAPPED = 1 << 62
PRESENT = 1 << 63

# Frame keys: a PFN as is; a swap entry tagged above every PFN so the two never collide.
SWAP_KEY = 1 << 60


def read_entries(fd, start, end):
    """Pagemap entries of [start, end) from an open pagemap fd, in one pread."""
    n = (end - start) // PAGE
    blob = os.pread(fd, n * 8, (start // PAGE) * 8)
    entries = array("Q")
    entries.frombytes(blob)
    if len(entries) != n:
        raise OSError(f"short pagemap read: {len(entries)} of {n} entries at {start:#x}")
    return entries


SLICE = 1 << 18  # pages per read of iter_entries: 2 MiB of entries, 1 GiB of address space


def iter_entries(fd, start, end):
    """read_entries of [start, end) in slices of SLICE pages: a VMA may be a reservation of a
    TiB or more (sanitizers' shadow, sandboxes), whose entries in one read would be GiBs."""
    step = SLICE * PAGE
    for at in range(start, end, step):
        yield read_entries(fd, at, min(end, at + step))


def open_pagemap(pid):
    return os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)


def frame_key(entry, zero_pfn, file_backed):
    """The identity of the physical page behind one entry, or None when nothing is to restore:
    not present, the zero page, or (file_backed) an unmodified page of a private file mapping."""
    if entry & PRESENT:
        if entry & FILE_OR_SHARED and file_backed:
            return None
        pfn = entry & PFN_MASK
        if pfn == zero_pfn:
            return None
        return pfn
    if entry & SWAPPED:
        return SWAP_KEY | (entry & PFN_MASK)
    return None


_zero_pfn = None


def zero_pfn():
    """PFN of the kernel's shared zero page: read-fault a fresh anonymous page of our own
    and look it up in our pagemap (a read fault maps the zero page)."""
    global _zero_pfn
    if _zero_pfn is None:
        m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            addr = address_of(m)
            assert m[0] == 0  # the read fault
            fd = open_pagemap(os.getpid())
            try:
                entry = read_entries(fd, addr, addr + PAGE)[0]
            finally:
                os.close(fd)
        finally:
            m.close()
        if not entry & PRESENT or (entry & PFN_MASK) == 0:
            raise OSError("cannot find the zero page's PFN (is CAP_SYS_ADMIN missing?)")
        _zero_pfn = entry & PFN_MASK
    return _zero_pfn
