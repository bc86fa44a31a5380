"""Synthetic image streams for the plan stage: no kernel needed.

``ImageBuilder`` writes a valid cowtree-images stream from processes, VMAs and frame
contents given directly.  ``History`` simulates a fork history (mmap, write, fork,
mremap, munmap, mprotect, exit with reparenting to the grandparent) over abstract
physical pages and turns the survivors into images, so tests see realistic frame
maps.  ``PATTERNS`` builds the six sharing patterns of issue #3; ``random_history``
is a hypothesis strategy of arbitrary histories.
"""

import hashlib
import io

from stages.stream import StreamWriter, pack_u32

PAGE = 4096
BASE = 0x10000000
VDSO = {"layout": [["[vvar]", 0x7FFFF7FC0000, 0x7FFFF7FC4000], ["[vdso]", 0x7FFFF7FC6000, 0x7FFFF7FC8000]],
        "sha256": "0" * 64}


def page_bytes(tag):
    """Deterministic page contents: equal tags give equal bytes."""
    seed = hashlib.sha256(repr(tag).encode()).digest()
    return (seed * (PAGE // len(seed)))[:PAGE]


def _process_body(pid, ppid, comm):
    mm = {k: 0 for k in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
                         "start_stack", "arg_start", "arg_end", "env_start", "env_end")}
    return {"pid": pid, "ppid": ppid, "pgid": pid, "sid": pid, "comm": comm, "exe": "/bin/true",
            "threads": [], "mm": mm, "auxv": b"", "sigactions": [], "fds": []}


class ImageBuilder:
    def __init__(self):
        self.procs = []  # [pid, ppid, comm]
        self.vmas = {}  # pid -> [vma body]
        self.contents = []  # frame id - 1 -> bytes
        self.shmem = []  # (shmem record body, data), written after the pages

    def frame(self, data):
        self.contents.append(data)
        return len(self.contents)

    def process(self, pid, ppid, comm="synth"):
        self.procs.append((pid, ppid, comm))
        self.vmas[pid] = []

    def vma(self, pid, start, frames=None, npages=None, kind="anon", path=None, pgoff=0, shared=False,
            vmflags=("rd", "wr", "mr", "mw", "me", "ac"), prot=3, shmem=None):
        npages = len(frames) if frames is not None else npages
        self.vmas[pid].append({
            "start": start, "end": start + npages * PAGE, "prot": prot, "shared": shared, "pgoff": pgoff,
            "kind": kind, "path": path, "vmflags": list(vmflags),
            "frames": pack_u32(frames) if frames is not None and any(frames) else None,
        })
        if shmem is not None:
            self.vmas[pid][-1]["shmem"] = shmem

    def stream(self, run=64):
        out = io.BytesIO()
        self.write(out, run)
        return out.getvalue()

    def write(self, out, run=64):
        root = self.procs[0][0]
        w = StreamWriter(out, "cowtree-images", {"kernel": "6.1.0-synthetic", "arch": "x86_64",
                                                 "page_size": PAGE, "root_pid": root, "vdso": VDSO})
        for pid, ppid, comm in self.procs:
            w.write("process", _process_body(pid, ppid, comm))
        for pid, _, _ in self.procs:
            w.write("vmas", {"pid": pid, "vmas": sorted(self.vmas[pid], key=lambda v: v["start"])})
        first_of = {}
        for first in range(1, len(self.contents) + 1, run):
            ids = range(first, min(first + run, len(self.contents) + 1))
            same, hashes, data = [], b"", b""
            for f in ids:
                c = self.contents[f - 1]
                h = hashlib.sha256(c).digest()[:16]
                hashes += h
                if h in first_of:
                    same.append(first_of[h])
                else:
                    first_of[h] = f
                    same.append(0)
                    data += c
            w.write("pages", {"first": first, "count": len(ids), "same": pack_u32(same), "hashes": hashes},
                    data)
        for body, data in self.shmem:
            w.write("shmem", body, data)
        w.close({"frames": len(self.contents), "processes": len(self.procs)})


class _Page:
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class _Vma:
    def __init__(self, start, npages, flags=(), kind="anon", path=None, pgoff=0, prot=3):
        self.start, self.npages, self.flags = start, npages, tuple(flags)
        self.kind, self.path, self.pgoff, self.prot = kind, path, pgoff, prot
        self.pages = {}  # page index -> _Page

    def copy(self, pages=True):
        v = _Vma(self.start, self.npages, self.flags, self.kind, self.path, self.pgoff, self.prot)
        if pages:
            v.pages = dict(self.pages)
        return v

    def cut(self, lo, hi):
        """The part [lo, hi) (page indexes) as a new VMA."""
        v = _Vma(self.start + lo * PAGE, hi - lo, self.flags, self.kind, self.path,
                 self.pgoff + lo * PAGE if self.path else 0, self.prot)
        v.pages = {i - lo: p for i, p in self.pages.items() if lo <= i < hi}
        return v


class History:
    """A fork history over abstract memory; ``images()`` gives the survivors' image stream."""

    def __init__(self, root=100):
        self.next_pid = root + 1
        self.next_addr = BASE
        self.procs = {root: {"ppid": 0, "vmas": [], "alive": True}}
        self.order = [root]
        self.root = root

    # -- operations -------------------------------------------------------
    def _addr(self, npages):
        a = self.next_addr
        self.next_addr += (npages + 16) * PAGE  # a gap, so moved VMAs never touch
        return a

    def mmap(self, pid, npages, flags=(), path=None, pgoff=0):
        v = _Vma(self._addr(npages), npages, flags, "file" if path else "anon", path, pgoff)
        self.procs[pid]["vmas"].append(v)
        return v.start

    def _find(self, pid, addr):
        for v in self.procs[pid]["vmas"]:
            if v.start <= addr < v.start + v.npages * PAGE:
                return v
        raise KeyError(f"{pid}: no VMA at {addr:#x}")

    def write(self, pid, addr, tag):
        v = self._find(pid, addr)
        v.pages[(addr - v.start) // PAGE] = _Page(page_bytes(tag))

    def write_range(self, pid, addr, npages, tag):
        for i in range(npages):
            self.write(pid, addr + i * PAGE, (tag, i))

    def fork(self, pid):
        child = self.next_pid
        self.next_pid += 1
        vmas = []
        for v in self.procs[pid]["vmas"]:
            if "dc" in v.flags:
                continue
            vmas.append(v.copy(pages="wf" not in v.flags))
        self.procs[child] = {"ppid": pid, "vmas": vmas, "alive": True}
        self.order.append(child)
        return child

    def mremap(self, pid, addr):
        """Move the VMA at addr to a fresh address; returns the new start."""
        v = self._find(pid, addr)
        v.start = self._addr(v.npages)
        return v.start

    def _split(self, pid, addr, npages):
        v = self._find(pid, addr)
        lo = (addr - v.start) // PAGE
        hi = min(v.npages, lo + npages)
        vmas = self.procs[pid]["vmas"]
        vmas.remove(v)
        parts = [v.cut(0, lo), v.cut(lo, hi), v.cut(hi, v.npages)]
        vmas.extend(p for p in parts if p.npages)
        return parts[1]

    def munmap(self, pid, addr, npages):
        mid = self._split(pid, addr, npages)
        self.procs[pid]["vmas"].remove(mid)

    def mprotect(self, pid, addr, npages, prot=1):
        self._split(pid, addr, npages).prot = prot

    def exit(self, pid):
        """The process exits; its children are reparented to its parent."""
        ppid = self.procs[pid]["ppid"]
        assert ppid, "the root does not exit"
        self.procs[pid]["alive"] = False
        for p in self.procs.values():
            if p["ppid"] == pid:
                p["ppid"] = ppid

    def alive(self):
        return [pid for pid in self.order if self.procs[pid]["alive"]]

    # -- images -----------------------------------------------------------
    def images(self):
        b = ImageBuilder()
        ids = {}
        for pid in self.alive():
            b.process(pid, self.procs[pid]["ppid"])
        for pid in self.alive():
            for v in sorted(self.procs[pid]["vmas"], key=lambda v: v.start):
                frames = []
                for i in range(v.npages):
                    page = v.pages.get(i)
                    if page is None:
                        frames.append(0)
                        continue
                    f = ids.get(id(page))
                    if f is None:
                        f = ids[id(page)] = b.frame(page.data)
                    frames.append(f)
                vmflags = ["rd", "wr", "mr", "mw", "me", "ac"] + list(v.flags)
                b.vma(pid, v.start, frames, kind=v.kind, path=v.path, pgoff=v.pgoff, prot=v.prot,
                      vmflags=vmflags)
        # keep page objects alive until ids are assigned (id() must not be reused)
        return b.stream()


# -- the six patterns of issue #3 ------------------------------------------------
def pattern_same(n=3, pages=8):
    h = History()
    a = h.mmap(h.root, pages)
    h.write_range(h.root, a, pages, "p")
    for k in range(n):
        c = h.fork(h.root)
        h.write(c, a + (k % pages) * PAGE, ("c", c))
    return h


def pattern_moved(n=2, pages=8):
    h = History()
    a = h.mmap(h.root, pages)
    h.write_range(h.root, a, pages, "p")
    for k in range(n):
        c = h.fork(h.root)
        b = h.mremap(c, a)
        h.write(c, b + PAGE, ("c", c))
    return h


def pattern_rewrote(n=3, pages=8):
    h = History()
    a = h.mmap(h.root, pages)
    h.write_range(h.root, a, pages, "old")
    for _ in range(n):
        h.fork(h.root)
    h.write_range(h.root, a, pages, "new")
    return h


def pattern_chain(pages=8):
    h = History()
    a = h.mmap(h.root, pages)
    h.write_range(h.root, a, pages, "g")
    mid = h.fork(h.root)
    h.write_range(mid, a, pages // 2, "m")
    for k in range(2):
        gc = h.fork(mid)
        h.write(gc, a + (pages - 1 - k) * PAGE, ("gc", gc))
    return h


def pattern_split(pages=12):
    h = History()
    a = h.mmap(h.root, pages)
    h.write_range(h.root, a, pages, "p")
    c1 = h.fork(h.root)
    h.mprotect(c1, a + 2 * PAGE, 3)
    c2 = h.fork(h.root)
    h.munmap(c2, a + 4 * PAGE, 2)
    h.write(c2, a + 8 * PAGE, "c2")
    return h


def pattern_orphans(n=3, pages=8):
    h = History()
    a = h.mmap(h.root, pages)
    h.write_range(h.root, a, pages, "r")
    mid = h.fork(h.root)
    h.write_range(mid, a, pages, "mid")
    for k in range(n):
        c = h.fork(mid)
        h.write(c, a + k * PAGE, ("c", c))
    h.exit(mid)
    h.write_range(h.root, a, pages, "r2")
    return h


PATTERNS = {
    "same": pattern_same, "moved": pattern_moved, "rewrote": pattern_rewrote,
    "chain": pattern_chain, "split": pattern_split, "orphans": pattern_orphans,
}


def random_history(draw, st, max_ops=25):
    """Draw a random fork history with hypothesis (``draw`` from st.composite)."""
    h = History()
    regions = 0
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 6))
        flags = draw(st.sampled_from([(), (), (), ("dc",), ("wf",)]))
        a = h.mmap(h.root, n, flags)
        regions += 1
        h.write_range(h.root, a, n, ("init", regions))
    for step in range(draw(st.integers(0, max_ops))):
        pid = draw(st.sampled_from(h.alive()))
        vmas = h.procs[pid]["vmas"]
        op = draw(st.sampled_from(["write", "write", "write", "fork", "fork", "mremap", "munmap",
                                   "mprotect", "exit", "mmap", "mmapfile", "equal"]))
        if op == "mmap":
            n = draw(st.integers(1, 4))
            a = h.mmap(pid, n)
            h.write_range(pid, a, n, ("mm", step))
        elif op == "mmapfile":
            # a private file mapping: only the pages written become frames
            n = draw(st.integers(1, 4))
            a = h.mmap(pid, n, path="/usr/lib/libsynth.so", pgoff=draw(st.integers(0, 3)) * PAGE)
            h.write(pid, a + draw(st.integers(0, n - 1)) * PAGE, ("file", step))
        elif op == "fork" and len(h.alive()) < 8:
            h.fork(pid)
        elif op == "exit" and pid != h.root:
            h.exit(pid)
        elif vmas:
            v = draw(st.sampled_from(sorted(vmas, key=lambda v: v.start)))
            i = draw(st.integers(0, v.npages - 1))
            addr = v.start + i * PAGE
            if op == "write":
                h.write(pid, addr, ("w", step, draw(st.integers(0, 3))))
            elif op == "equal":
                # rewrite a page with the bytes it already has (a COW copy, equal content)
                page = v.pages.get(i)
                if page is not None:
                    v.pages[i] = _Page(page.data)
            elif op == "mremap":
                h.mremap(pid, v.start)
            elif op == "munmap" and v.npages > 1:
                h.munmap(pid, addr, draw(st.integers(1, v.npages - 1)))
            elif op == "mprotect":
                h.mprotect(pid, addr, draw(st.integers(1, v.npages)))
    return h
