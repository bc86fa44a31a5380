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
