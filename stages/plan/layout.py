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
from itertools import chain, compress
from operator import ne

from stages.stream import pack_u32
from stages.stream.compact import LayoutVma, PlanRange, PlanStep

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


class Range:
    """A staging range of the draft: its creator, size, and (path, pgoff, dev, ino) of a
    file range (None: anonymous)."""

    __slots__ = ("creator", "npages", "file")

    def __init__(self, creator, npages, file=None):
        self.creator, self.npages, self.file = creator, npages, file

    @property
    def backing(self):
        return "anon" if self.file is None else "file"


class Draft:
    """A strategy's result.  Kept compact: a process with 20,000 VMAs has as many ranges,
    writes and pieces."""

    def __init__(self, images):
        self.images = images
        self.ranges = [None]  # rid -> Range (ids from 1)
        self.created = {pid: [] for pid in images.pids}  # pid -> [rid]
        # pid -> its steps in order, three uint32 each: (rid, page, frame) a write, (0, child, 0) a fork
        self.events = {pid: array("I") for pid in images.pids}
        # pid -> per VMA index: the pieces covering the VMA, flat (rid, range page, count,
        # vma page, rid, ...), or None (a list, not a dict: 20,000 VMAs)
        self.sources = {pid: [None] * len(images.vmas[pid]) for pid in images.pids}

    def write(self, pid, rid, page, frame):
        self.events[pid].extend((rid, page, frame))

    def fork(self, pid, child):
        self.events[pid].extend((0, child, 0))

    def events_of(self, pid):
        """(rid, page, frame) per write, (0, child, 0) per fork, in order."""
        ev = self.events[pid]
        return zip(ev[0::3], ev[1::3], ev[2::3])

    def children_of(self, pid):
        return [child for rid, child, _ in self.events_of(pid) if not rid]

    def creation_order(self):
        """Processes in the order they are created: depth first, children in fork-step order."""
        order, todo = [], [self.images.root]
        while todo:
            pid = todo.pop()
            order.append(pid)
            todo.extend(reversed(self.children_of(pid)))
        if sorted(order) != sorted(self.images.pids):
            raise AssertionError("the strategy does not fork every process exactly once")
        return order

    def new_range(self, creator, npages, vma=None, pgoff=None):
        """A range of npages; file-backed like ``vma`` (at byte offset pgoff) when given a file VMA."""
        rid = len(self.ranges)
        file = None
        if vma is not None and vma.is_file:
            b = vma.body
            file = (b["path"], pgoff, b.get("dev"), b.get("ino"))
        self.ranges.append(Range(creator, npages, file))
        self.created[creator].append(rid)
        return rid


UNSET = 0xFFFFFFFF


class Window:
    """rid -> the range's first page in the staging window (ranges laid out in id order, as
    build places them); ranges added later are placed after the others."""

    __slots__ = ("ranges", "starts")

    def __init__(self, ranges):
        self.ranges = ranges  # the draft's: ranges added later included
        self.starts = array("q", [0, 0])  # rid 0 is not a range; rid 1 starts at page 0

    def start(self, rid):
        starts = self.starts
        while len(starts) <= rid:
            last = len(starts) - 1
            starts.append(starts[last] + self.ranges[last].npages)
        return starts[rid]


CHUNK = 1024  # pages per array of Written


class Written:
    """What each staging page holds in one process while the plan runs (0: untouched), by
    window page in arrays of CHUNK pages.  A fork shares the arrays with the child; whoever
    writes to a shared array first copies it (so a wide fork costs no copy per child, a
    write costs a copy of CHUNK pages at most, and 20,000 one-page ranges are 20 arrays)."""

    __slots__ = ("chunks", "own", "window")

    def __init__(self, window, chunks=None):
        self.window = window
        self.chunks = {} if chunks is None else chunks  # chunk number -> array
        self.own = set()  # chunks only this process has

    def fork(self):
        self.own = set()
        return Written(self.window, dict(self.chunks))

    def set(self, rid, page, value):
        at = self.window.start(rid) + page
        k = at // CHUNK
        if k in self.own:
            self.chunks[k][at % CHUNK] = value
            return
        a = self.chunks.get(k)
        self.chunks[k] = a = array("I", a) if a is not None else array("I", [0]) * CHUNK
        self.own.add(k)
        a[at % CHUNK] = value

    def get(self, rid, page):
        at = self.window.start(rid) + page
        a = self.chunks.get(at // CHUNK)
        return a[at % CHUNK] if a is not None else 0

    def run(self, rid, page, count):
        """The values of pages page..page+count of range rid (an array)."""
        at = self.window.start(rid) + page
        end = at + count
        out = None
        while at < end:
            k, lo = divmod(at, CHUNK)
            n = min(CHUNK - lo, end - at)
            a = self.chunks.get(k)
            part = a[lo:lo + n] if a is not None else array("I", [0]) * n
            if out is None:
                if n == count:
                    return part
                out = part
            else:
                out.extend(part)
            at += n
        return out if out is not None else array("I")


def flat(pieces):
    """Pieces [[rid, range page, count, vma page], ...] as one tuple (rid, range page, ...):
    kept per VMA, a list of lists costs 150 bytes, the tuple 70."""
    return tuple(chain.from_iterable(pieces))


def rows(pieces):
    """Flat pieces as (rid, range page, count, vma page) tuples."""
    return [pieces[i:i + 4] for i in range(0, len(pieces), 4)]


def expand(pieces):
    """Per VMA page, its staging slot (rid, range page) (pieces flat or as rows)."""
    if type(pieces) is tuple:
        pieces = rows(pieces)
    return [(rid, rpage + k) for rid, rpage, count, _ in pieces for k in range(count)]


def _clean_slot_ok(rng, vma, page, rpage):
    """Does an unwritten page of range ``rng`` at rpage read as page ``page`` of ``vma`` should?"""
    if vma.is_file:
        return (rng.file is not None and rng.file[0] == vma.body["path"]
                and rng.file[1] + rpage * PAGE == vma.body["pgoff"] + page * PAGE)
    return rng.file is None


def _add_holes(draft):
    """Give pages with no frame whose slot is written (or wrongly backed) a clean range."""
    images = draft.images
    state = {images.root: Written(Window(draft.ranges))}  # pid -> pages written before it runs its steps
    for pid in draft.creation_order():
        written = state.pop(pid)
        for rid, page, _ in draft.events_of(pid):
            if rid:
                written.set(rid, page, 1)
            else:
                state[page] = written.fork()
        # clean slots already given to a page of this process: the restorer mremaps a slot's
        # page away, so two VMAs cannot both take it
        taken = set()
        for v in images.vmas[pid]:
            pieces = draft.sources[pid][v.index]
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
                if s not in taken and not written.get(*s) and _clean_slot_ok(draft.ranges[s[0]], v, i, s[1]):
                    taken.add(s)
                    continue
                if hole is None:
                    hole = draft.new_range(pid, v.npages, v, v.body["pgoff"])
                src[i] = (hole, i)
            if hole is not None:
                draft.sources[pid][v.index] = flat(pieces_of(src))


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
    offsets = [0]  # rid -> byte offset in the window
    size = 0
    for rid in range(1, len(draft.ranges)):
        offsets.append(size)
        size += draft.ranges[rid].npages * PAGE
    size = max(size, PAGE)
    base_hint = _window(images, size)

    records = []
    # image frame -> the write whose page its holders map (first seen; more_units: any others)
    first_unit = array("I", [UNSET]) * (images.nframes + 1)
    first_unit[0] = 0  # a page with no frame maps an unwritten slot (0)
    more_units = {}
    writes_total = 0
    moves = 0
    nranges = len(draft.ranges)
    rid_obj = [0] * nranges  # rid -> the int object of the draft's: steps share it, not a copy each
    for rids in draft.created.values():
        for rid in rids:
            rid_obj[rid] = rid
    mapped_at_start = {images.root: bytearray(nranges)}  # pid -> rid -> 1 if mapped when it starts
    window = Window(draft.ranges)
    window.start(len(draft.ranges) - 1)  # all placed: a range is dropped from the draft once recorded
    state = {images.root: Written(window)}  # pid -> write id of each staging page, at start
    byte_sizes = {}  # npages -> its size in bytes: one int object per size, not per range
    for pid in draft.creation_order():
        values = state.pop(pid)  # shared with the parent at the fork
        mapped = mapped_at_start.pop(pid)  # its own copy
        for rid in draft.created[pid]:
            mapped[rid] = 1
        steps = []
        pairs, pairs_rid = None, 0  # the write step being gathered: (page, frame) pairs of one range

        def end_write():
            if pairs is not None:
                steps.append(PlanStep(op="write", range=rid_obj[pairs_rid], pages=pack_u32(pairs)))

        for rid, page, frame in draft.events_of(pid):
            if rid:
                writes_total += 1
                values.set(rid, page, writes_total)
                if pairs is not None and pairs_rid == rid:
                    pairs.extend((page, frame))
                else:
                    end_write()
                    pairs, pairs_rid = array("I", (page, frame)), rid
            else:
                end_write()
                pairs = None
                child = page
                state[child] = values.fork()
                mapped_at_start[child] = bytearray(mapped)
                steps.append(PlanStep(op="fork", pid=child))
        end_write()
        del draft.events[pid]
        layout = []
        own_moves = 0
        unused = mapped  # rid -> 1 if mapped at the end and used by no piece: dropped
        sources = draft.sources.pop(pid)  # the draft's pieces go into the layout as they are
        for v in images.vmas[pid]:
            pieces = sources[v.index]
            sources[v.index] = None
            # the image's VMA body with the pieces, its fields shared, not copied
            layout.append(LayoutVma(v.body, pieces if pieces is not None else []))
            if pieces is None:
                continue
            pieces = rows(pieces)
            own_moves += len(pieces)
            for piece in pieces:
                unused[piece[0]] = 0
            if v.ids is not None:
                for rid, rpage, count, vpage in pieces:
                    _note_units(first_unit, more_units, v.ids[vpage:vpage + count], values.run(rid, rpage, count))
        for rid in compress(range(nranges), unused):
            steps.append(PlanStep(op="drop", range=rid_obj[rid]))
        moves += own_moves
        ranges = []
        for rid in draft.created[pid]:
            r = draft.ranges[rid]
            nbytes = byte_sizes.get(r.npages)
            if nbytes is None:
                nbytes = byte_sizes[r.npages] = r.npages * PAGE
            rec = PlanRange(id=rid, offset=offsets[rid], size=nbytes, backing=r.backing)
            if r.file is not None:
                path, pgoff, dev, ino = r.file
                rec.update(path=path, pgoff=pgoff, dev=dev, ino=ino or 0)
            ranges.append(rec)
            draft.ranges[rid] = None
        proc = images.process_body[pid]
        own_writes = sum(len(st["pages"]) // 8 for st in steps if st["op"] == "write")
        records.append({"pid": pid, "ppid": images.parent[pid], "image": proc,
                        "ranges": ranges, "steps": steps, "layout": layout,
                        "stats": {"pages_written": own_writes, "moves": own_moves}})

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
        "ranges": nranges - 1,
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
