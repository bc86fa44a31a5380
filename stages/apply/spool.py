"""Reading a whole plan before anything runs: every record checked, page bytes spooled.

From a pipe, the page data goes to an unlinked temp file (one copy, mmap'd
afterwards).  From a regular file, the pages are used where they are: the file
itself is mmap'd (the stream reader's in-place mode: records are framed and
checked in the mapping, their crcs computed by two threads), so no copy is made
(it must not change while cow-apply runs).
Frames are indexed by id, with ``same`` resolved to the frame whose bytes are
stored.  Nothing is trusted until the trailer has been read and checked.
"""

import array
import mmap
import os

from stages.stream import StreamReader, plans, unpack_u32
from stages.tmpfile import unnamed_file

PAGE = 4096


class Plan:
    def __init__(self, header, processes, frame_offsets, spool_fd, spool_size, shared=None, map_=None):
        self.header = header
        # shared memory objects: id -> {"kind", "size", "name", "pages": [(page index, spool offset)]}
        self.shared = shared or {}
        self.processes = processes  # plan process records, creation order
        self.by_pid = {p["pid"]: p for p in processes}
        self.frame_offsets = frame_offsets  # frame id -> byte offset in the spool
        self.spool_fd = spool_fd
        self.spool_size = spool_size
        self.map = map_
        if map_ is None and spool_size:
            self.map = mmap.mmap(spool_fd, spool_size, prot=mmap.PROT_READ)

    @property
    def frames(self):
        return len(self.frame_offsets) - 1

    def close(self):
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view of it is still alive somewhere: unmapped when it goes
                pass
            self.map = None
        if self.spool_fd is not None:
            os.close(self.spool_fd)
            self.spool_fd = None


def spool_plan(fileobj, tmpdir=None):
    """Read the plan stream from fileobj to its trailer; returns a Plan (StreamError if bad)."""
    # in place: a plan file is mapped, its page data never copied; compact: layout entries,
    # ranges and steps as slotted mappings, not a dict each
    reader = StreamReader(fileobj, expect=plans.FORMAT, in_place=True, compact=True)
    if reader.map is not None:
        return _plan_in_place(reader, fileobj)
    fd = unnamed_file(tmpdir)  # private and gone when we are
    try:
        processes = []
        offsets = array.array("Q", [0])
        written = 0
        shared = {}
        out = os.fdopen(os.dup(fd), "wb", buffering=1 << 20)
        with out:
            for rec in reader:
                if rec.kind == "process":
                    processes.append(rec.body)
                elif rec.kind == "pages":
                    written = _spool_pages(rec, offsets, out, written)
                elif rec.kind == "shmem":
                    written = _spool_shmem(rec, shared, out, written)
        return Plan(reader.header, processes, offsets, fd, written, shared)
    except BaseException:
        os.close(fd)
        raise


def _plan_in_place(reader, fileobj):
    """The pages stay in the input file: frame offsets are file offsets."""
    processes = []
    offsets = array.array("Q", [0])
    shared = {}
    for rec in reader:
        if rec.kind == "process":
            processes.append(rec.body)
        elif rec.kind == "pages":
            _index_pages(rec, offsets, rec.data_offset)
        elif rec.kind == "shmem":
            _index_shmem(rec, shared, rec.data_offset)
    fd = os.dup(fileobj.fileno())
    try:
        size = os.fstat(fd).st_size
        return Plan(reader.header, processes, offsets, fd, size, shared, map_=reader.map or None)
    except BaseException:
        os.close(fd)
        raise


def _spool_pages(rec, offsets, out, written):
    at = _index_pages(rec, offsets, written)  # checks the record first
    out.write(rec.data)
    return at


def _index_pages(rec, offsets, at):
    """Append the offsets of the frames of one pages record whose stored bytes start at
    ``at``; returns the offset after them."""
    from stages.stream import StreamError

    body, data = rec.body, rec.data
    first, count = body["first"], body["count"]
    same = unpack_u32(body["same"])
    if first != len(offsets) or len(same) != count:
        raise StreamError(f"record {rec.seq} (pages): frames {first}.. do not continue the previous run "
                          f"(expected {len(offsets)}) or same[] has the wrong length")
    stored = same.count(0)
    if len(data) != stored * PAGE:
        raise StreamError(f"record {rec.seq} (pages): {len(data)} data bytes for {stored} stored pages")
    if stored == count:  # every frame's bytes stored (the usual case): no lookups
        offsets.extend(range(at, at + count * PAGE, PAGE))
        return at + count * PAGE
    for i, s in enumerate(same):
        if s == 0:
            offsets.append(at)
            at += PAGE
        else:
            if s >= first + i:
                raise StreamError(f"record {rec.seq} (pages): frame {first + i} is 'same' as a later frame {s}")
            offsets.append(offsets[s])
    return at


def _spool_shmem(rec, shared, out, written):
    """A shared memory object's pages: bytes to the spool, (page index, offset) to its entry."""
    at = _index_shmem(rec, shared, written)  # checks the record first
    out.write(rec.data)
    return at


def _index_shmem(rec, shared, at):
    """Add the pages of one shmem record, whose bytes start at ``at``, to its object's
    entry; returns the offset after them."""
    from stages.stream import StreamError

    body = rec.body
    pages = unpack_u32(body["pages"])
    if len(rec.data) != len(pages) * PAGE:
        raise StreamError(f"record {rec.seq} (shmem): {len(rec.data)} data bytes for {len(pages)} pages")
    if any(p >= body["npages"] for p in pages) or body["npages"] * PAGE < body["size"]:
        raise StreamError(f"record {rec.seq} (shmem): a page beyond object {body['id']}'s size")
    obj = shared.setdefault(body["id"], {"kind": body["kind"], "size": body["size"],
                                         "name": body.get("name"), "seals": body.get("seals", 1),
                                         "pages": []})
    if (obj["kind"], obj["size"], obj["name"]) != (body["kind"], body["size"], body.get("name")):
        raise StreamError(f"record {rec.seq} (shmem): object {body['id']} is described differently than before")
    obj["pages"].extend((p, at + i * PAGE) for i, p in enumerate(pages))
    return at + len(rec.data)
