"""Packed little-endian integer arrays, the wire form of frame maps and id lists."""

import sys
from array import array

from .errors import StreamError

_LITTLE = sys.byteorder == "little"


def pack_u32(values):
    arr = values if isinstance(values, array) and values.typecode == "I" else array("I", values)
    if not _LITTLE:
        arr = array("I", arr)
        arr.byteswap()
    return arr.tobytes()


def unpack_u32(blob, what="array"):
    if len(blob) % 4:
        raise StreamError(f"{what}: length {len(blob)} is not a multiple of 4")
    arr = array("I")
    arr.frombytes(blob)
    if not _LITTLE:
        arr.byteswap()
    return arr


def view_u32(blob, what="array"):
    """The u32 values of blob without a copy (a read-only memoryview) where the host is
    little endian, else an array like unpack_u32: for large arrays kept while in use.
    Small ones are copied all the same (a view costs more than a few values)."""
    if len(blob) % 4:
        raise StreamError(f"{what}: length {len(blob)} is not a multiple of 4")
    if not _LITTLE or len(blob) < 1024:
        return unpack_u32(blob, what)
    return memoryview(blob).cast("B").cast("I")
