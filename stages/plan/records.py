"""RecordSpool: records with a payload kept aside for the plan: an unnamed temporary file of
(meta, data) pairs, written as the images are read and copied through in the same order."""

import struct

from stages.tmpfile import unnamed_file

LENGTHS = struct.Struct("<QQ")


class RecordSpool:
    def __init__(self):
        self.file = None  # made at the first record
        self.count = 0

    def add(self, rec):
        if self.file is None:
            self.file = open(unnamed_file(), "w+b")
        self.file.write(LENGTHS.pack(len(rec.meta), len(rec.data)))
        self.file.write(rec.meta)
        self.file.write(rec.data)
        self.count += 1

    def records(self):
        """(meta, data) of every record added, in order."""
        if self.file is None:
            return
        self.file.seek(0)
        for _ in range(self.count):
            mlen, dlen = LENGTHS.unpack(self.file.read(LENGTHS.size))
            yield self.file.read(mlen), self.file.read(dlen)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
