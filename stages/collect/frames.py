"""Frame ids: one dense id per physical page (PFN or swap entry) over the whole tree.

Ids are assigned in the order VMAs are fed (processes in stream order, VMAs in
address order), so the first holder of each frame is known: its contents are
read from that process only.  New ids at adjacent addresses of one process are
kept as runs, so pages are later read with one pread per run.
"""

from array import array

from stages.linux import pagemap

PAGE = pagemap.PAGE

# Kernel-provided mappings: never frames (apply places the kernel's own).
NO_FRAME_KINDS = {"vdso", "vvar", "vvar_vclock", "vsyscall", "special"}
PAGEMAP_SLICE = 1 << 18  # pages per pagemap read (2 MiB of entries, 1 GiB of address space)

_PRESENT, _SWAPPED, _FILE = pagemap.PRESENT, pagemap.SWAPPED, pagemap.FILE_OR_SHARED
_PFN, _SWAP_KEY = pagemap.PFN_MASK, pagemap.SWAP_KEY


class FrameTable:
    def __init__(self, zero_pfn):
        self.zero_pfn = zero_pfn
        self.ids = {}     # frame key -> id
        self.count = 0    # ids given so far (1..count)
        # [first id, process index, address, n]: ids first..first+n-1 were first seen at
        # address, address + 4096, ... of that process
        self.runs = []

    def __len__(self):
        return self.count

    def vma_frames(self, pagemap_fd, proc_index, vma):
        """The frame map of one VMA (array of uint32), or None when it has no frame."""
        if vma["shared"] or vma["kind"] in NO_FRAME_KINDS:
            return None
        file_backed = vma["kind"] == "file"
        npages = (vma["end"] - vma["start"]) // PAGE
        frames = None  # allocated at the first frame: big reservations are mostly empty
        zero, ids, runs = self.zero_pfn, self.ids, self.runs
        run = None  # the open run, extended while new ids come at adjacent pages
        run_next = -1  # the page index that would extend it
        # one pagemap read per VMA; huge VMAs (address space reservations) in slices.
        # pagemap.frame_key inlined: this loop runs once per page of the tree
        for base in range(0, npages, PAGEMAP_SLICE):
            start = vma["start"] + base * PAGE
            end = min(vma["end"], start + PAGEMAP_SLICE * PAGE)
            for i, entry in enumerate(pagemap.read_entries(pagemap_fd, start, end), base):
                if not entry:
                    continue
                if entry & _PRESENT:
                    if file_backed and entry & _FILE:
                        continue  # unmodified file page: the file gives it back
                    key = entry & _PFN
                    if key == zero:
                        continue
                elif entry & _SWAPPED:
                    key = _SWAP_KEY | (entry & _PFN)
                else:
                    continue
                fid = ids.get(key)
                if fid is None:
                    self.count = fid = self.count + 1
                    ids[key] = fid
                    if i == run_next:
                        run[3] += 1
                    else:
                        run = [fid, proc_index, vma["start"] + i * PAGE, 1]
                        runs.append(run)
                    run_next = i + 1
                if frames is None:
                    frames = array("I", bytes(4 * npages))
                frames[i] = fid
        return frames

    def runs_between(self, first, count):
        """(proc_index, addr, n) runs covering ids first..first+count-1, in id order."""
        runs, last = self.runs, first + count  # last: exclusive
        lo, hi = 0, len(runs)
        while lo < hi:  # binary search: the run holding id first (runs are in id order)
            mid = (lo + hi) // 2
            if runs[mid][0] + runs[mid][3] <= first:
                lo = mid + 1
            else:
                hi = mid
        out = []
        while lo < len(runs) and runs[lo][0] < last:
            run_first, proc, addr, n = runs[lo]
            a, b = max(run_first, first), min(run_first + n, last)
            out.append((proc, addr + (a - run_first) * PAGE, b - a))
            lo += 1
        return out
