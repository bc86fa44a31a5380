"""From a strategy's draft to plan records: hole ranges, pieces, drops, the window, stats.

A strategy fills a Draft: the staging ranges each process creates, each process's
ordered writes and forks, and for every plannable VMA the pieces (runs of staging
slots) its pages are moved from.  This module turns that into what
docs/FORMAT.md describes, and makes pages with no frame (id 0) read clean: when
their slot was written on the way, the process maps them from a fresh range of
its own instead.
"""

import functools
import gc
from array import array
from itertools import compress
from operator import ne

from stages.stream import pack_u32
from stages.stream.compact import LayoutVma

from .model import PAGE

# Staging windows stay below this (the top of the user address space, minus room).
WINDOW_LIMIT = 0x7FF000000000
WINDOW_FLOOR = 0x10000  # vm.mmap_min_addr


def without_gc(fn):
    """Run fn with the cyclic GC paused: planning makes millions of acyclic tuples and
    dicts, and the collections they trigger cost time without freeing anything."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


class Draft:
    def __init__(self, images):
        self.images = images
        self.ranges = {}  # rid -> dict(creator, npages, backing, path, pgoff, dev, ino)
        self.created = {pid: [] for pid in images.pids}  # pid -> [rid]
        self.events = {pid: [] for pid in images.pids}  # pid -> [("w", rid, page, frame) | ("f", child)]
        # pid -> {vma index: pieces [[rid, range page, count, vma page], ...] covering the VMA}
        self.sources = {pid: {} for pid in images.pids}

    def creation_order(self):
        """Processes in the order they are created: depth first, children in fork-step order."""
        order, todo = [], [self.images.root]
        while todo:
            pid = todo.pop()
            order.append(pid)
            todo.extend(reversed([ev[1] for ev in self.events[pid] if ev[0] == "f"]))
        if sorted(order) != sorted(self.images.pids):
            raise AssertionError("the strategy does not fork every process exactly once")
        return order

    def new_range(self, creator, npages, vma=None, pgoff=None):
        """A range of npages; file-backed like ``vma`` (at byte offset pgoff) when given a file VMA."""
        rid = len(self.ranges) + 1
        r = {"creator": creator, "npages": npages, "backing": "anon"}
        if vma is not None and vma.is_file:
            b = vma.body
            r.update(backing="file", path=b["path"], pgoff=pgoff, dev=b.get("dev"), ino=b.get("ino"))
        self.ranges[rid] = r
        self.created[creator].append(rid)
        return rid


UNSET = 0xFFFFFFFF


class Written:
    """What each staging page holds in one process while the plan runs: range id -> array
    of values per page (0: untouched).  A fork shares the arrays with the child; whoever
    writes to a shared array first copies it (so a wide fork costs no copy per child)."""

    __slots__ = ("arrays", "own", "sizes")

    def __init__(self, sizes, arrays=None):
        self.sizes = sizes  # rid -> npages
        self.arrays = {} if arrays is None else arrays
        self.own = set()  # rids whose array only this process has

    def fork(self):
        self.own = set()
        return Written(self.sizes, dict(self.arrays))

    def set(self, rid, page, value):
        if rid not in self.own:
            a = self.arrays.get(rid)
            self.arrays[rid] = a = array("I", a) if a is not None else array("I", [0]) * self.sizes[rid]
            self.own.add(rid)
        else:
            a = self.arrays[rid]
        a[page] = value

    def get(self, rid, page):
        a = self.arrays.get(rid)
        return a[page] if a is not None else 0

    def run(self, rid, page, count):
        """The values of pages page..page+count of range rid (an array)."""
        a = self.arrays.get(rid)
        return a[page:page + count] if a is not None else array("I", [0]) * count


def expand(pieces):
    """Per VMA page, its staging slot (rid, range page)."""
    return [(rid, rpage + k) for rid, rpage, count, _ in pieces for k in range(count)]


def _clean_slot_ok(rng, vma, page, rpage):
    """Does an unwritten page of range ``rng`` at rpage read as page ``page`` of ``vma`` should?"""
    if vma.is_file:
        return (rng["backing"] == "file" and rng["path"] == vma.body["path"]
                and rng["pgoff"] + rpage * PAGE == vma.body["pgoff"] + page * PAGE)
    return rng["backing"] == "anon"


def _add_holes(draft):
    """Give pages with no frame whose slot is written (or wrongly backed) a clean range."""
    images = draft.images
    sizes = {rid: r["npages"] for rid, r in draft.ranges.items()}
    state = {images.root: Written(sizes)}  # pid -> pages written before it runs its steps
    for pid in draft.creation_order():
        written = state.pop(pid)
        for ev in draft.events[pid]:
            if ev[0] == "w":
                written.set(ev[1], ev[2], 1)
            else:
                state[ev[1]] = written.fork()
        for v in images.vmas[pid]:
            pieces = draft.sources[pid].get(v.index)
            if pieces is None:
                continue
            ids = v.ids
            if ids is not None and 0 not in ids:
                continue  # every page has a frame: no hole to find
            src = expand(pieces)
            hole = None
            for i in range(v.npages):
                f = ids[i] if ids is not None else 0
                if f:
                    continue
                s = src[i]
                if not written.get(*s) and _clean_slot_ok(draft.ranges[s[0]], v, i, s[1]):
                    continue
                if hole is None:
                    hole = draft.new_range(pid, v.npages, v, v.body["pgoff"])
                    sizes[hole] = v.npages
                src[i] = (hole, i)
            if hole is not None:
                draft.sources[pid][v.index] = pieces_of(src)


def pieces_of(src):
    """Per-page slots (rid, range page) -> pieces [rid, range page, count, vma page]."""
    pieces = []
    for i, (rid, rpage) in enumerate(src):
        if pieces:
            last = pieces[-1]
            if last[0] == rid and last[1] + last[2] == rpage:
                last[2] += 1
                continue
        pieces.append([rid, rpage, 1, i])
    return pieces


def _window(images, size):
    """(base_hint) in the largest hole of the union of every target VMA."""
    spans = sorted((v.start, v.end) for vmas in images.vmas.values() for v in vmas)
    holes = []
    cursor = WINDOW_FLOOR
    for start, end in spans:
        if start > cursor:
            holes.append((cursor, min(start, WINDOW_LIMIT)))
        cursor = max(cursor, end)
        if cursor >= WINDOW_LIMIT:
            break
    if cursor < WINDOW_LIMIT:
        holes.append((cursor, WINDOW_LIMIT))
    holes = [(a, b) for a, b in holes if b - a >= size]
    if not holes:
        raise ValueError(f"no hole of {size} bytes for the staging window below {WINDOW_LIMIT:#x}")
    a, b = max(holes, key=lambda h: (h[1] - h[0], -h[0]))
    base = a + (b - a - size) // 2
    aligned = base & ~((1 << 21) - 1)
    return aligned if aligned >= a else (base & ~(PAGE - 1))


def _note_units(first_unit, more_units, frames, writes):
    """Page k maps frame frames[k] from the page written by write writes[k] (0: unwritten):
    remember each frame's first write, and any other write of it (a duplicated frame)."""
    seen = array("I", map(first_unit.__getitem__, frames))
    if seen == writes:
        return  # every frame already noted with this write (the common case), checked in C
    for k in compress(range(len(frames)), map(ne, seen, writes)):
        f = frames[k]
        if not f:
            continue
        u = writes[k]
        first = first_unit[f]
        if first == UNSET:
            first_unit[f] = u
        elif first != u:
            more_units.setdefault(f, {first}).add(u)


@without_gc
def build(draft, strategy):
    """Plan header (minus stream fields) and process records, from a complete draft."""
    images = draft.images
    _add_holes(draft)
    offsets = {}
    size = 0
    for rid in sorted(draft.ranges):
        offsets[rid] = size
        size += draft.ranges[rid]["npages"] * PAGE
    size = max(size, PAGE)
    base_hint = _window(images, size)

    records = []
    # image frame -> the write whose page its holders map (first seen; more_units: any others)
    first_unit = array("I", [UNSET]) * (images.nframes + 1)
    first_unit[0] = 0  # a page with no frame maps an unwritten slot (0)
    more_units = {}
    writes_total = 0
    moves = 0
    mapped_at_start = {images.root: set()}
    sizes = {rid: r["npages"] for rid, r in draft.ranges.items()}
    state = {images.root: Written(sizes)}  # pid -> write id of each staging page, at start
    for pid in draft.creation_order():
        values = state.pop(pid)  # shared with the parent at the fork
        mapped = set(mapped_at_start.pop(pid))
        mapped.update(draft.created[pid])
        steps = []
        for ev in draft.events[pid]:
            if ev[0] == "w":
                _, rid, page, frame = ev
                writes_total += 1
                values.set(rid, page, writes_total)
                if steps and steps[-1]["op"] == "write" and steps[-1]["range"] == rid:
                    steps[-1]["_pairs"].extend((page, frame))
                else:
                    steps.append({"op": "write", "range": rid, "_pairs": [page, frame]})
            else:
                child = ev[1]
                state[child] = values.fork()
                mapped_at_start[child] = set(mapped)
                steps.append({"op": "fork", "pid": child})
        layout = []
        used = set()
        sources = draft.sources.pop(pid)  # the draft's pieces go into the layout as they are
        for v in images.vmas[pid]:
            pieces = sources.pop(v.index, None)
            # the image's VMA body with the pieces, its fields shared, not copied
            layout.append(LayoutVma(v.body, pieces if pieces is not None else []))
            if pieces is None:
                continue
            moves += len(pieces)
            for piece in pieces:
                used.add(piece[0])
            if v.ids is not None:
                for rid, rpage, count, vpage in pieces:
                    _note_units(first_unit, more_units, v.ids[vpage:vpage + count], values.run(rid, rpage, count))
        for rid in sorted(mapped - used):
            steps.append({"op": "drop", "range": rid})
        for st in steps:
            if st["op"] == "write":
                st["pages"] = pack_u32(st.pop("_pairs"))
        ranges = []
        for rid in draft.created[pid]:
            r = draft.ranges[rid]
            rec = {"id": rid, "offset": offsets[rid], "size": r["npages"] * PAGE, "backing": r["backing"]}
            if r["backing"] == "file":
                rec.update(path=r["path"], pgoff=r["pgoff"], dev=r.get("dev"), ino=r.get("ino") or 0)
            ranges.append(rec)
        proc = images.process_body[pid]
        own_writes = sum(len(st["pages"]) // 8 for st in steps if st["op"] == "write")
        records.append({"pid": pid, "ppid": images.parent[pid], "image": proc,
                        "ranges": ranges, "steps": steps, "layout": layout,
                        "stats": {"pages_written": own_writes,
                                  "moves": sum(len(v["pieces"]) for v in layout)}})

    frames_in_images = images.nframes - first_unit.count(UNSET)
    duplicated = sum(len(u) - 1 for u in more_units.values())
    stats = {
        "frames_in_images": frames_in_images,
        "frames_planned": writes_total,
        "frames_duplicated": duplicated,
        "frames_merged_equal": frames_in_images + duplicated - writes_total,
        "bytes_to_write": writes_total * PAGE,
        "processes": len(images.pids),
        "moves": moves,
        "ranges": len(draft.ranges),
    }
    header = {
        "kernel": images.header["kernel"],
        "arch": images.header["arch"],
        "page_size": images.header["page_size"],
        "root_pid": images.root,
        "vdso": images.header["vdso"],
        "strategy": strategy,
        "window": {"base_hint": base_hint, "size": size},
        "stats": stats,
        "tool": "cow-plan",
    }
    return header, records
