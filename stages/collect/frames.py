"""Frame ids: one dense id per physical page (PFN or swap entry) over the whole tree.

Ids are assigned in the order VMAs are fed (processes in stream order, VMAs in
address order), so the first holder of each frame is known: its contents are
read from that process only.
"""

from array import array

from stages.linux import pagemap

PAGE = pagemap.PAGE

# Kernel-provided mappings: never frames (apply places the kernel's own).
NO_FRAME_KINDS = {"vdso", "vvar", "vvar_vclock", "vsyscall", "special"}
PAGEMAP_SLICE = 1 << 18  # pages per pagemap read (2 MiB of entries, 1 GiB of address space)


class FrameTable:
    def __init__(self, zero_pfn):
        self.zero_pfn = zero_pfn
        self.ids = {}                  # frame key -> id
        self.first_proc = array("I")   # id-1 -> index of the process it was first seen in
        self.first_addr = array("Q")   # id-1 -> its address there

    def __len__(self):
        return len(self.first_addr)

    def vma_frames(self, pagemap_fd, proc_index, vma):
        """The frame map of one VMA (array of uint32), or None when it has no frame."""
        if vma["shared"] or vma["kind"] in NO_FRAME_KINDS:
            return None
        file_backed = vma["kind"] == "file"
        npages = (vma["end"] - vma["start"]) // PAGE
        frames = None  # allocated at the first frame: big reservations are mostly empty
        zero, ids = self.zero_pfn, self.ids
        # one pagemap read per VMA; huge VMAs (address space reservations) in slices
        for base in range(0, npages, PAGEMAP_SLICE):
            start = vma["start"] + base * PAGE
            end = min(vma["end"], start + PAGEMAP_SLICE * PAGE)
            for i, entry in enumerate(pagemap.read_entries(pagemap_fd, start, end), base):
                if not entry:
                    continue
                key = pagemap.frame_key(entry, zero, file_backed)
                if key is None:
                    continue
                fid = ids.get(key)
                if fid is None:
                    fid = len(self.first_addr) + 1
                    ids[key] = fid
                    self.first_proc.append(proc_index)
                    self.first_addr.append(vma["start"] + i * PAGE)
                if frames is None:
                    frames = array("I", bytes(4 * npages))
                frames[i] = fid
        return frames
