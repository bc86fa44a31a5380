"""Reading an image stream into the planner's model: tree, VMAs, frame maps, content classes.

Page bytes are never kept in memory.  From a regular file, ``pages`` records are read
again where they are when the plan is written (checked against their crc: a file that
changed meanwhile is an error); from a pipe they are spooled (raw meta + data) to a
temporary file and copied through to the plan afterwards.  Not spooling what is in a
file saves writing and reading the whole payload once more (2 GiB for a 1 GiB tree).
"""

import os
from array import array

from stages.stream import StreamReader, reread_data, unpack_u32, view_u32
from stages.stream.compact import VmaBody

from .records import RecordSpool
from .shared import SharedError, SharedObjects

PAGE = 4096
# VMA kinds whose private pages the plan restores; the others apply handles by kind.
PLANNABLE_KINDS = {"anon", "file", "heap", "stack"}
# smaps VmFlags of VMAs a child does not inherit (MADV_DONTFORK, MADV_WIPEONFORK).
NOT_INHERITED_FLAGS = {"dc", "wf"}
# x86-64 user addresses end here; only the kernel's fixed [vsyscall] page lies above.
ADDRESS_LIMIT = 1 << 47
# The planner still looks at every page of a private VMA (frame or not), in C for the
# most part but in Python for VMAs with pages without a frame, so its time grows with
# the address space, not the frames: refuse before that turns into minutes of work
# (64 GiB of private VMAs in one tree).
MAX_PLANNABLE_PAGES = 1 << 24


def count_zeros(ids):
    """How many pages of a frame map (array or view) have no frame."""
    if isinstance(ids, array):
        return ids.count(0)
    copy = array("I")
    copy.frombytes(ids.cast("B"))  # a memcpy; array.count runs in C
    return copy.count(0)


class PlanError(Exception):
    """The images are valid but the plan cannot handle them."""


class Vma(VmaBody):
    """An image VMA as the planner sees it: its compact body (the record's fields, made by
    the stream reader as this class) plus what the plan asks of it.  One object per VMA:
    a process may have 20,000."""

    __slots__ = ("pid", "index", "npages", "_ids", "plannable", "inheritable")

    def setup(self, pid, index):
        self.pid, self.index = pid, index
        self.npages = (self.end - self.start) // PAGE
        frames = self.frames
        # big frame maps: a view of the record's bytes, not a copy (they go into the plan
        # too); small ones are copied when asked for (an array kept per VMA costs more)
        self._ids = view_u32(frames, f"process {pid} vma {index} frames") \
            if frames is not None and len(frames) >= 1024 else None
        self.plannable = not self.shared and self.kind in PLANNABLE_KINDS
        self.inheritable = self.plannable and NOT_INHERITED_FLAGS.isdisjoint(self.vmflags)
        return self

    @property
    def body(self):
        return self

    @property
    def ids(self):
        """The frame id of each page (uint32 values), or None."""
        if self._ids is not None:
            return self._ids
        frames = self.frames
        return None if frames is None else unpack_u32(frames, f"process {self.pid} vma {self.index} frames")

    @property
    def is_file(self):
        return self.kind == "file" and self.path is not None

    def backing_key(self):
        """Pages of VMAs with equal keys may live in one staging range (file offsets must match)."""
        if self.is_file:
            return ("file", self.path)
        return ("anon",)


class Images:
    """Everything the planner needs from an image stream, minus page bytes."""

    def __init__(self):
        self.header = None
        self.processes = []  # process bodies in stream order
        self.vmas = {}  # pid -> [Vma]
        self.same = {}  # frame id -> earlier frame with equal bytes
        self.hashes = {}  # frame id -> 16-byte SHA-256 prefix (older streams; crcs are never merged on)
        self.nframes = 0
        self.spool = RecordSpool()  # the pages records, when the input is a pipe
        self.source_fd = -1  # the input file (a regular file): its pages records are read again
        self.in_source = []  # (meta, seq, data offset, data length, crc) of each, from source_fd
        self.pages_bodies = []  # the pages records' bodies (first, count, same, crcs or hashes): no bytes
        self.shared = SharedObjects()  # MAP_SHARED anonymous memory and memfds (shmem records)

    # -- tree -------------------------------------------------------------
    def finish_tree(self):
        self.pids = [p["pid"] for p in self.processes]
        self.order = {pid: i for i, pid in enumerate(self.pids)}
        self.process_body = {p["pid"]: p for p in self.processes}
        self._lca_cache = {}
        self.parent = {}
        self.children = {pid: [] for pid in self.pids}
        self.depth = {}
        for p in self.processes:
            pid, ppid = p["pid"], p["ppid"]
            if pid in self.parent:
                raise PlanError(f"process {pid} appears twice")
            if ppid in self.order and self.order[ppid] < self.order[pid]:
                self.parent[pid] = ppid
                self.children[ppid].append(pid)
                self.depth[pid] = self.depth[ppid] + 1
            else:
                self.parent[pid] = 0
                self.depth[pid] = 0
        roots = [pid for pid in self.pids if self.parent[pid] == 0]
        if len(roots) != 1:
            raise PlanError(f"the images hold {len(roots)} trees (roots {roots}); a plan restores one tree")
        self.root = roots[0]

    def lca(self, a, b):
        depth, parent = self.depth, self.parent
        while depth[a] > depth[b]:
            a = parent[a]
        while depth[b] > depth[a]:
            b = parent[b]
        while a != b:
            a, b = parent[a], parent[b]
        return a

    def lca_of(self, pids):
        if len(pids) > 2:
            # many frames have the same holders: remember their LCA
            key = tuple(pids)
            got = self._lca_cache.get(key)
            if got is None:
                got = self._lca_cache[key] = self._lca_of(pids)
            return got
        return self._lca_of(pids)

    def _lca_of(self, pids):
        it = iter(pids)
        acc = next(it)
        for pid in it:
            if acc != pid:
                acc = self.lca(acc, pid)
        return acc

    # -- content ----------------------------------------------------------
    def content_class(self):
        """frame id -> smallest frame id with equal bytes (via ``same``, whose bytes collect
        compared, and equal SHA-256 hashes of older streams; a crc alone proves nothing)."""
        cls = [0] * (self.nframes + 1)
        by_hash = {}
        for f in range(1, self.nframes + 1):
            s = self.same.get(f, 0)
            c = cls[s] if s else f
            h = self.hashes.get(f)
            if h is not None:
                c = by_hash.setdefault(h, c)
            cls[f] = c
        return cls

    def keep_pages(self, rec):
        """Where to find the bytes of pages record rec when the plan is written."""
        if self.source_fd >= 0:
            self.in_source.append((rec.meta, rec.seq, rec.data_offset, len(rec.data), rec.crc))
            return
        self.spool.add(rec)

    def pages_records(self):
        """(meta, data) of every pages record, in stream order."""
        for meta, seq, offset, length, crc in self.in_source:
            yield meta, reread_data(self.source_fd, "pages", seq, meta, offset, length, crc)
        yield from self.spool.records()

    def close(self):
        self.shared.close()
        if self.source_fd >= 0:
            os.close(self.source_fd)
            self.source_fd = -1
        self.spool.close()


def read_images(fileobj):
    """Read and check a whole image stream; raise StreamError / PlanError with a message."""
    images = Images()
    try:
        reader = StreamReader(fileobj, expect="cowtree-images", compact=Vma)
        images.header = reader.header
        if reader.base is not None:  # a regular file: its records can be read again
            images.source_fd = os.dup(fileobj.fileno())
        next_first = 1
        for rec in reader:
            if rec.kind == "process":
                images.processes.append(rec.body)
            elif rec.kind == "vmas":
                pid = rec.body["pid"]
                if pid in images.vmas:
                    raise PlanError(f"process {pid}: two vmas records")
                images.vmas[pid] = [v.setup(pid, i) for i, v in enumerate(rec.body["vmas"])]
            elif rec.kind == "pages":
                body = rec.body
                first, count = body["first"], body["count"]
                if first != next_first:
                    raise PlanError(f"pages record {rec.seq}: starts at frame {first}, expected {next_first}")
                same = unpack_u32(body["same"], f"pages record {rec.seq} same")
                hashes = body.get("hashes")  # older streams: SHA-256 prefixes, strong enough to merge on
                if len(same) != count or (hashes is not None and len(hashes) != 16 * count) or \
                        ("crcs" in body and len(body["crcs"]) != 4 * count):
                    raise PlanError(f"pages record {rec.seq}: same/hashes/crcs do not have {count} entries")
                stored = 0
                for i, s in enumerate(same):
                    fid = first + i
                    if s:
                        if s >= fid:
                            raise PlanError(f"pages record {rec.seq}: frame {fid} is 'same' as later frame {s}")
                        images.same[fid] = s
                    else:
                        stored += 1
                    if hashes is not None:
                        images.hashes[fid] = bytes(hashes[16 * i:16 * i + 16])
                if len(rec.data) != stored * PAGE:
                    raise PlanError(f"pages record {rec.seq}: {len(rec.data)} data bytes for {stored} stored pages")
                images.pages_bodies.append(body)
                images.keep_pages(rec)
                next_first = first + count
            elif rec.kind == "shmem":
                try:
                    images.shared.add(rec)
                except SharedError as exc:
                    raise PlanError(str(exc))
        images.nframes = next_first - 1
        images.trailer = reader.trailer
        images.finish_tree()
        check_images(images)
        try:
            images.shared.check_references(images.vmas, images.processes)
        except SharedError as exc:
            raise PlanError(str(exc))
        return images
    except BaseException:
        images.close()  # the input file's duplicate fd, the spool
        raise


def check_images(images):
    """Refuse images the plan cannot handle, naming process and VMA."""
    n = images.nframes
    plannable_pages = 0
    for pid in images.pids:
        if pid not in images.vmas:
            raise PlanError(f"process {pid}: no vmas record")
    for pid in images.vmas:
        if pid not in images.order:
            raise PlanError(f"vmas record for pid {pid}, which has no process record")
    for pid in images.pids:
        seen = set()  # frames of this process's plannable VMAs so far
        prev_end = 0
        for v in images.vmas[pid]:
            where = f"process {pid}: vma {v.index} [{v.start:#x}-{v.end:#x})"
            if v.start % PAGE or v.end % PAGE or v.end <= v.start:
                raise PlanError(f"{where}: not page aligned or empty")
            if v.start < prev_end:
                raise PlanError(f"{where}: overlaps the previous VMA")
            if v.end > ADDRESS_LIMIT and v.body["kind"] != "vsyscall":
                raise PlanError(f"{where}: ends beyond the user address space ({ADDRESS_LIMIT:#x})")
            if v.body["kind"] == "vsyscall" and v.npages > 1:
                raise PlanError(f"{where}: a [vsyscall] area of {v.npages} pages (it is one page)")
            prev_end = v.end
            if v.plannable:
                plannable_pages += v.npages
                if plannable_pages > MAX_PLANNABLE_PAGES:
                    raise PlanError(f"{where}: the tree's private VMAs exceed {MAX_PLANNABLE_PAGES} pages "
                                    f"({MAX_PLANNABLE_PAGES * PAGE >> 30} GiB of address space), "
                                    "more than cow-plan handles")
            if v.ids is None:
                continue
            if len(v.ids) != v.npages:
                raise PlanError(f"{where}: {len(v.ids)} frame ids for {v.npages} pages")
            if not v.plannable:
                if any(v.ids):
                    raise PlanError(f"{where}: a {v.body['kind']} {'shared ' if v.body['shared'] else ''}VMA has frames")
                continue
            # whole-array checks in C; the page-by-page loop only to name a fault
            mine = set(v.ids)
            mine.discard(0)
            if max(v.ids) <= n and len(mine) + count_zeros(v.ids) == v.npages and seen.isdisjoint(mine):
                seen |= mine
                continue
            _name_bad_frame(images, pid, v, where, n)


def _name_bad_frame(images, pid, v, where, n):
    """Raise the PlanError for the first page of v whose frame is out of range or already
    mapped in process pid (the VMAs before v passed the checks)."""
    at = {}
    for w in images.vmas[pid]:
        if w is v:
            break
        if w.ids is not None and w.plannable:
            at.update((f, w.start + i * PAGE) for i, f in enumerate(w.ids) if f)
    for i, f in enumerate(v.ids):
        if f:
            if f > n:
                raise PlanError(f"{where}: frame {f} is not in the images' pages (they hold 1..{n})")
            if f in at:
                raise PlanError(f"{where}: frame {f} is mapped twice in one process (also at {at[f]:#x})")
            at[f] = v.start + i * PAGE
    raise AssertionError(f"{where}: no bad frame found")
