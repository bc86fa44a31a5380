"""Where cow-apply puts the staging window and the restorer region.

Both must be free in cow-apply (every restored process starts as its fork) and
disjoint from every target VMA of every process.  They are reserved early
(PROT_NONE) so that nothing cow-apply allocates later lands there.
"""

import mmap
import os

from stages._native import lib
from stages.linux import procfs

PAGE = 4096
LOW = 0x10000000000  # 1 TiB: far from brk heaps and small fixed mappings
HIGH = 0x7F0000000000  # below the usual mmap/stack area
TASK_SIZE = 0x7FFFFFFFF000

SYS_MMAP, SYS_MUNMAP = 9, 11
PROT_NONE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0, 0x02, 0x20, 0x4000, 0x100000


def own_intervals():
    return [(v["start"], v["end"]) for v in procfs.read_maps("self")]


def target_intervals(processes):
    out = []
    for proc in processes:
        for vma in proc["layout"]:
            if vma["kind"] != "vsyscall":
                out.append((vma["start"], vma["end"]))
    return out


def is_free(start, size, busy):
    end = start + size
    return all(end <= a or start >= b for a, b in busy)


def find_hole(size, busy, low=LOW, high=HIGH):
    """Lowest page-aligned start >= low with [start, start+size) disjoint from busy."""
    start = low
    for a, b in sorted(busy):
        if b <= start:
            continue
        if a >= start + size:
            break
        start = (b + PAGE - 1) & ~(PAGE - 1)
    if start + size > high:
        raise MemoryError(f"no free hole of {size:#x} bytes")
    return start


def reserve(start, size):
    """PROT_NONE reservation at exactly start (fails rather than replace anything)."""
    r = lib.cow_syscall6(SYS_MMAP, start, size, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0)
    if r != start:
        raise OSError(-r if r < 0 else 0, f"cannot reserve {start:#x}+{size:#x}: {os.strerror(-r) if r < 0 else r}")


def release(start, size):
    lib.cow_syscall6(SYS_MUNMAP, start, size, 0, 0, 0, 0)


def choose(plan, blob_size):
    """(window base, blob base): reserved in this process."""
    busy = own_intervals() + target_intervals(plan.processes)
    size = plan.header["window"]["size"]
    hint = plan.header["window"]["base_hint"]
    base = hint if hint and hint % PAGE == 0 and hint + size <= TASK_SIZE and is_free(hint, size, busy) else find_hole(size, busy)
    reserve(base, size)
    busy.append((base, base + size))
    blob = find_hole(blob_size, busy)
    reserve(blob, blob_size)
    return base, blob


__all__ = ["choose", "release", "find_hole", "is_free", "mmap"]
