"""The memory of a live process tree as the kernel sees it (the measure cowtree is judged by).

tree_frames(root) counts, over every process of the tree, the present anonymous
private pages (pagemap: present, not a file page, not the zero page) and the
number of distinct PFNs behind them: pages shared copy-on-write count once.
It also sums Pss_Anon from smaps_rollup.

Shared memory (MAP_SHARED anonymous memory, memfds, tmpfs files such as /dev/shm
mapped MAP_SHARED) is counted per object: the pages the object holds (its st_blocks,
resident or swapped), each object once however many processes map it.  Page tables
say nothing useful here: a restored process has not touched its shared pages yet.
Shared mappings of disk files are page cache, not the tree's memory: not counted.
"""

import os

from . import pagemap, procfs

TMPFS_MAGIC = 0x01021994
_libc = None  # ctypes' libc, made at the first fs_type

# Kernel-provided mappings whose PFNs are not process memory.
SKIP_KINDS = {"vdso", "vvar", "vvar_vclock", "vsyscall"}


def process_anon_pfns(pid, zero_pfn):
    """PFNs of the present anonymous private pages of pid (a list, one per page)."""
    pfns = []
    fd = pagemap.open_pagemap(pid)
    try:
        for vma in procfs.read_maps(pid):
            if vma["shared"] or vma["kind"] in SKIP_KINDS:
                continue
            for entries in pagemap.iter_entries(fd, vma["start"], vma["end"]):
                raw = entries.tobytes()
                if raw.count(0) == len(raw):
                    continue  # nothing present or swapped (a reservation): skipped at C speed
                for entry in entries:
                    if entry & pagemap.PRESENT and not entry & pagemap.FILE_OR_SHARED:
                        pfn = entry & pagemap.PFN_MASK
                        if pfn != zero_pfn:
                            pfns.append(pfn)
    finally:
        os.close(fd)
    return pfns


def fs_type(fd):
    """The f_type of the file system fd lives on (fstatfs), or None."""
    # ctypes imported here: cow-collect imports this module but calls this only for shared
    # memory, and the import costs ~2 ms of its start
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type first
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return int.from_bytes(buf.raw[:8], "little")


def process_shared_objects(pid):
    """{(dev, ino): pages held} of the shmem objects (tmpfs/memfd/shared anonymous) pid maps shared."""
    out = {}
    for vma in procfs.read_maps(pid):
        if not vma["shared"] or vma["kind"] in SKIP_KINDS:
            continue
        key = (vma["dev"], vma["ino"])
        if key in out:
            continue
        try:
            fd = os.open(f"/proc/{pid}/map_files/{vma['start']:x}-{vma['end']:x}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # SysV shm and the like cannot be opened: not counted
        try:
            if fs_type(fd) == TMPFS_MAGIC:
                out[key] = os.fstat(fd).st_blocks // 8  # 512-byte blocks per 4 KiB page
        finally:
            os.close(fd)
    return out


def tree_frames(root_pid):
    """{'root', 'processes': [{pid, ppid, comm, anon_pages, pss_anon_kb}], 'distinct_frames',
    'anon_pages', 'pss_anon_kb', 'shared_objects', 'shared_frames', 'all_frames'} for the live
    tree rooted at root_pid (distinct_frames: private; all_frames: private + shared)."""
    zero = pagemap.zero_pfn()
    distinct = set()
    shared = {}
    procs = []
    for pid in procfs.walk_tree(root_pid):
        try:
            stat = procfs.read_stat(pid)
            if stat["state"] in ("Z", "X"):
                continue
            pfns = process_anon_pfns(pid, zero)
            shared.update(process_shared_objects(pid))
            rollup = procfs.read_rollup(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        distinct.update(pfns)
        procs.append({
            "pid": pid, "ppid": stat["ppid"], "comm": stat["comm"],
            "anon_pages": len(pfns), "pss_anon_kb": rollup.get("Pss_Anon", 0),
        })
    if not procs:
        raise ProcessLookupError(f"process {root_pid}: no such process")
    return {
        "root": root_pid,
        "processes": procs,
        "distinct_frames": len(distinct),
        "anon_pages": sum(p["anon_pages"] for p in procs),
        "pss_anon_kb": sum(p["pss_anon_kb"] for p in procs),
        "shared_objects": len(shared),
        "shared_frames": sum(shared.values()),
        "all_frames": len(distinct) + sum(shared.values()),
    }
