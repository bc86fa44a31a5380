"""The memory of a live process tree as the kernel sees it (the measure cowtree is judged by).

tree_frames(root) counts, over every process of the tree, the present anonymous
private pages (pagemap: present, not a file page, not the zero page) and the
number of distinct PFNs behind them: pages shared copy-on-write count once.
It also sums Pss_Anon from smaps_rollup.
"""

import os

from . import pagemap, procfs

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
            for entry in pagemap.read_entries(fd, vma["start"], vma["end"]):
                if entry & pagemap.PRESENT and not entry & pagemap.FILE_OR_SHARED:
                    pfn = entry & pagemap.PFN_MASK
                    if pfn != zero_pfn:
                        pfns.append(pfn)
    finally:
        os.close(fd)
    return pfns


def tree_frames(root_pid):
    """{'root', 'processes': [{pid, ppid, comm, anon_pages, pss_anon_kb}], 'distinct_frames',
    'anon_pages', 'pss_anon_kb'} for the live tree rooted at root_pid."""
    zero = pagemap.zero_pfn()
    distinct = set()
    procs = []
    for pid in procfs.walk_tree(root_pid):
        try:
            stat = procfs.read_stat(pid)
            if stat["state"] in ("Z", "X"):
                continue
            pfns = process_anon_pfns(pid, zero)
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
    }
