"""This machine's vDSO as cow-apply sees it in itself: layout, sha256, symbols.

A restored process keeps the kernel's vDSO of this machine, moved to the dumped
address; that is only correct when the dumped one is byte-identical with the
same layout, which is what the plan's header describes.
"""

import ctypes
import hashlib
import struct

from . import procfs

LAYOUT_KINDS = ("vvar", "vvar_vclock", "vdso")


def own_layout():
    """[[name, start, end], ...] of [vvar], [vvar_vclock], [vdso] in this process."""
    return [[f"[{v['kind']}]", v["start"], v["end"]] for v in procfs.read_maps("self") if v["kind"] in LAYOUT_KINDS]


def own_vdso_bytes():
    for name, start, end in own_layout():
        if name == "[vdso]":
            return ctypes.string_at(start, end - start)
    return b""


def _cstr(blob, offset):
    end = blob.index(b"\0", offset)
    return blob[offset:end].decode("utf-8", "replace")


def symbols(blob):
    """[[name, value], ...] of the named symbols of the ELF64 (little-endian) image's .dynsym,
    in table order.  Read with struct: pyelftools costs cow-collect 50 ms of imports for this."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        raise ValueError("the vDSO is not a little-endian ELF64 image")
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    # name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name, _, _, _, offset, size, link, _, _, entsize in sections:
        if _cstr(blob, names_at + name) != ".dynsym":
            continue
        strings_at = sections[link][4]
        out = []
        for at in range(offset, offset + size, entsize or 24):
            st_name, _, _, _, st_value, _ = struct.unpack_from("<IBBHQQ", blob, at)
            if st_name and blob[strings_at + st_name] != 0:
                out.append([_cstr(blob, strings_at + st_name), st_value])
        return out
    return []


def own_identity():
    blob = own_vdso_bytes()
    return {
        "layout": own_layout(),
        "sha256": hashlib.sha256(blob).hexdigest() if blob else "",
        "symbols": symbols(blob) if blob else [],
    }
