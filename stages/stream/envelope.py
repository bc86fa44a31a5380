"""The wire envelope: how one record is framed, checksummed and chained.

A stream is a sequence of msgpack arrays, one per record:

    [kind: str, seq: int, meta: bin, data: bin | nil, crc: int]

* ``meta`` is the record body, itself msgpack-encoded (a map).  Keeping it as
  bytes lets the reader check the checksum before it trusts the content.
* ``data`` carries bulk bytes (page contents) outside the body, so page bytes
  are never re-encoded: they travel as one msgpack bin payload.
* ``crc`` is CRC-32 over ``"kind:seq"``, meta and data, in that order.
* ``seq`` counts records from 0 (the header); a missing, repeated or swapped
  record breaks the sequence.

The trailer (last record) carries the number of records, per-kind counts and
``chain``: CRC-32 over the 4-byte little-endian crcs of every record before it.
A stream without a trailer is truncated; bytes after it are garbage.
"""

import struct
import zlib

import msgpack

from . import compact
from .errors import StreamError

try:  # the same CRC-32 as zlib's, a few times faster (carry-less multiplication, no GIL)
    from stages._native import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - a source tree without its native build: zlib gives equal values
    _lib = None

NATIVE_CRC_MIN = 4096  # below this zlib is as fast as the call into C


def _crc32(data, crc=0):
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if _lib is None or size < NATIVE_CRC_MIN:
        return zlib.crc32(data, crc)
    return _lib.cow_crc32(crc, _ffi.from_buffer(data), size)


# One record may carry at most this many bytes of meta or data.  Bigger than
# any record cowtree writes (page runs are capped well below), small enough
# that a corrupted length cannot make the reader allocate gigabytes.
MAX_META_BYTES = 256 << 20
MAX_DATA_BYTES = 64 << 20


def data_crc(data):
    """The part of a record's crc that covers its data payload (see record_crc); ``data``
    may be a list of buffers that make the payload one after another."""
    return _payload_crc(data)


def _payload_crc(data):
    if isinstance(data, list):
        crc = 0
        for part in data:
            crc = _crc32(part, crc)
        return crc
    return _crc32(data)


def record_crc(kind, seq, meta, data, data_crc=None):
    """CRC-32 over data, then "kind:seq", then meta.  The data comes first so that its
    crc (``data_crc``, the bulk of the work) can be computed apart from the record:
    cow-collect does it in the threads that read the pages."""
    crc = 0
    if data is not None:
        crc = _payload_crc(data) if data_crc is None else data_crc
    crc = _crc32(f"{kind}:{seq}".encode(), crc)
    if isinstance(meta, list):  # the parts of pack_meta_parts
        for part in meta:
            crc = _crc32(part, crc)
        return crc
    return _crc32(meta, crc)


def pack_meta(body):
    return msgpack.packb(body, use_bin_type=True, default=compact.plain)


# A body list longer than this is packed in chunks (see pack_meta_parts).
_CHUNK_ITEMS = 512


def pack_meta_parts(body):
    """pack_meta(body) as a list of byte strings that join to it.  A big list in the
    top-level map (a layout of 20,000 VMAs) is packed a few hundred items at a time, so
    the encoded record is never copied whole (msgpack grows its buffer by doubling,
    then copies it out)."""
    if not isinstance(body, dict) or not any(
            isinstance(v, list) and len(v) > _CHUNK_ITEMS for v in body.values()):
        return [pack_meta(body)]
    packer = msgpack.Packer(use_bin_type=True, default=compact.plain)
    parts = [packer.pack_map_header(len(body))]
    for key, value in body.items():
        parts.append(packer.pack(key))
        if not (isinstance(value, list) and len(value) > _CHUNK_ITEMS):
            parts.append(packer.pack(value))
            continue
        parts.append(packer.pack_array_header(len(value)))
        for i in range(0, len(value), _CHUNK_ITEMS):
            chunk = value[i:i + _CHUNK_ITEMS]
            parts.append(b"".join(map(packer.pack, chunk)))
    return parts


def unpack_meta(meta, kind, seq):
    try:
        body = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise StreamError(f"record {seq} ({kind}): body is not valid msgpack: {exc}")
    if not isinstance(body, dict):
        raise StreamError(f"record {seq} ({kind}): body is not a map")
    return body


def bin_header(length):
    """The msgpack bin 8/16/32 header for a payload of ``length`` bytes."""
    if length < 1 << 8:
        return struct.pack(">BB", 0xC4, length)
    if length < 1 << 16:
        return struct.pack(">BH", 0xC5, length)
    return struct.pack(">BI", 0xC6, length)


def encode_record(kind, seq, meta, data, data_crc=None):
    """Frame one record; returns (list of byte strings to write in order, crc).

    The page payload is not copied into a msgpack buffer: it is written as it
    is, between the encoded prefix and suffix of the envelope.  ``data_crc``:
    data_crc(data) when the caller has it already.  ``data`` may be a list of buffers
    (pieces of one payload, written one after another: no copy to join them).
    """
    crc = record_crc(kind, seq, meta, data, data_crc)
    metas = meta if isinstance(meta, list) else [meta]
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack_array_header(5)
    packer.pack(kind)
    packer.pack(seq)
    # meta as msgpack would pack it (a bin), but not copied into the packer's buffer
    prefix = packer.bytes() + bin_header(sum(map(len, metas)))
    if data is None:
        return [prefix, *metas, msgpack.packb(None) + msgpack.packb(crc)], crc
    pieces = data if isinstance(data, list) else [data]
    return [prefix, *metas, bin_header(sum(map(len, pieces))), *pieces, msgpack.packb(crc)], crc


def packed_crc_len(crc):
    """Bytes of the crc at the end of an encoded record (msgpack: 1, 2, 3 or 5)."""
    return len(msgpack.packb(crc))


def chain_update(chain, crc):
    return _crc32(struct.pack("<I", crc), chain)


def make_unpacker(fileobj):
    return msgpack.Unpacker(
        fileobj,
        raw=False,
        use_list=True,
        strict_map_key=False,
        max_buffer_size=MAX_META_BYTES + MAX_DATA_BYTES + (1 << 20),
        max_bin_len=max(MAX_META_BYTES, MAX_DATA_BYTES),
        max_str_len=1 << 16,
        max_array_len=16,
        max_map_len=16,
    )


def check_envelope(obj, expected_seq):
    """Check the shape and checksum of one raw envelope; return its parts."""
    if not isinstance(obj, list) or len(obj) != 5:
        raise StreamError(f"record {expected_seq}: not a cowtree record (bad envelope)")
    kind, seq, meta, data, crc = obj
    if not isinstance(kind, str) or not isinstance(seq, int) or not isinstance(crc, int):
        raise StreamError(f"record {expected_seq}: not a cowtree record (bad envelope fields)")
    if not isinstance(meta, bytes) or not (data is None or isinstance(data, (bytes, memoryview))):
        raise StreamError(f"record {expected_seq} ({kind}): meta/data are not binary")
    if seq != expected_seq:
        raise StreamError(
            f"record {expected_seq} ({kind}): sequence number is {seq}: "
            "records are missing, repeated or out of order"
        )
    if record_crc(kind, seq, meta, data) != crc:
        raise StreamError(f"record {seq} ({kind}): checksum mismatch: the stream is corrupted")
    return kind, meta, data, crc


# -- reading records in place (a mapped regular file), without copying their data ---------------

_UINT = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q"}
_SINT = {0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_STR = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
_BIN = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}


class Truncated(Exception):
    """The buffer ends inside a record."""


class _Cursor:
    __slots__ = ("buf", "pos", "end", "seq")

    def __init__(self, buf, pos, seq):
        self.buf, self.pos, self.end, self.seq = buf, pos, len(buf), seq

    def take(self, n):
        at = self.pos
        if at + n > self.end:
            raise Truncated()
        self.pos = at + n
        return at

    def number(self, fmt):
        at = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, at)[0]

    def byte(self):
        return self.buf[self.take(1)]

    def integer(self, what):
        b = self.byte()
        if b < 0x80:
            return b
        if b >= 0xE0:
            return b - 0x100
        fmt = _UINT.get(b) or _SINT.get(b)
        if fmt is None:
            raise StreamError(f"record {self.seq}: not a cowtree record (bad envelope fields: {what})")
        return self.number(fmt)

    def span(self, table, limit, what, nil_ok=False):
        """(start, length) of a str/bin item, or None for nil where allowed."""
        b = self.byte()
        if nil_ok and b == 0xC0:
            return None
        if table is _STR and 0xA0 <= b <= 0xBF:
            n = b & 0x1F
        elif b in table:
            n = self.number(table[b])
        else:
            raise StreamError(f"record {self.seq}: not a cowtree record (bad envelope fields: {what})")
        if n > limit:
            raise StreamError(f"record {self.seq}: undecodable bytes ({what} of {n} bytes is too long)")
        return self.take(n), n


def split_record(buf, pos, expected_seq):
    """Frame the record at buf[pos:] without copying anything: (kind, seq, (meta start,
    meta length), (data start, data length) or None, crc, end position).  Raises Truncated when buf
    ends inside the record, StreamError when the bytes are not a record envelope.
    The crc is not checked here (record_crc, with the data's crc computed by the caller)."""
    cur = _Cursor(buf, pos, expected_seq)
    if cur.byte() != 0x95:  # fixarray of 5
        raise StreamError(f"record {expected_seq}: not a cowtree record (bad envelope)")
    at, n = cur.span(_STR, 1 << 16, "kind")
    try:
        kind = bytes(buf[at:at + n]).decode()
    except UnicodeDecodeError:
        raise StreamError(f"record {expected_seq}: undecodable bytes (kind is not utf-8)")
    seq = cur.integer("seq")
    meta = cur.span(_BIN, MAX_META_BYTES, "meta")
    data = cur.span(_BIN, MAX_DATA_BYTES, "data", nil_ok=True)
    crc = cur.integer("crc")
    return kind, seq, meta, data, crc, cur.pos
