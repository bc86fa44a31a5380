"""Reading a whole (small) image stream into plain Python objects, for tests."""

import zlib

from stages.stream import StreamReader, unpack_u32

PAGE = 4096


class Images:
    def __init__(self, path):
        self.processes = []   # process bodies, stream order
        self.vmas = {}        # pid -> [vma body with 'ids' (list of frame ids, or None)]
        self.pages_records = []
        self.content = {}     # frame id -> bytes (resolved through 'same')
        self.crcs = {}        # frame id -> CRC-32 of its bytes, from the stream
        self.stored = 0
        self.stored_ids = []  # the frames whose bytes the stream holds (not 'same' as another)
        with open(path, "rb") as f:
            reader = StreamReader(f)
            self.header = reader.header
            for rec in reader:
                if rec.kind == "process":
                    self.processes.append(rec.body)
                elif rec.kind == "vmas":
                    for v in rec.body["vmas"]:
                        v["ids"] = list(unpack_u32(v["frames"])) if v["frames"] is not None else None
                    self.vmas[rec.body["pid"]] = rec.body["vmas"]
                elif rec.kind == "pages":
                    self._pages(rec)
            self.trailer = reader.trailer

    def _pages(self, rec):
        body = rec.body
        self.pages_records.append((body["first"], body["count"]))
        same = unpack_u32(body["same"])
        offset = 0
        for i in range(body["count"]):
            fid = body["first"] + i
            if same[i]:
                self.content[fid] = self.content[same[i]]
            else:
                self.content[fid] = rec.data[offset:offset + PAGE]
                offset += PAGE
                self.stored += 1
                self.stored_ids.append(fid)
            self.crcs[fid] = unpack_u32(body["crcs"])[i]
        assert offset == len(rec.data), "pages record data longer than its stored frames"

    @property
    def pids(self):
        return [p["pid"] for p in self.processes]

    def frame_ids(self):
        """Every non-zero frame id used by any VMA."""
        out = set()
        for vmas in self.vmas.values():
            for v in vmas:
                if v["ids"]:
                    out.update(v["ids"])
        out.discard(0)
        return out

    def crc_ok(self, fid):
        return zlib.crc32(self.content[fid]) == self.crcs[fid]


RSEQ_SIZE = 32


def rseq_pages(images):
    """{pid: {page address: offset of the rseq area}} from the thread records."""
    out = {}
    for p in images.processes:
        for t in p["threads"]:
            rs = t.get("rseq")
            if rs and rs["addr"]:
                out.setdefault(p["pid"], {})[rs["addr"] & ~(PAGE - 1)] = rs["addr"] % PAGE
    return out


def without_rseq(page, offset):
    """page with the rseq area at offset zeroed: its cpu fields are the kernel's, rewritten
    whenever the thread returns to user space (a remote call, cow-collect's pager)."""
    return page if offset is None else page[:offset] + bytes(RSEQ_SIZE) + page[offset + RSEQ_SIZE:]
