"""This machine's vDSO as cow-apply sees it in itself: layout, sha256, symbols.

A restored process keeps the kernel's vDSO of this machine, moved to the dumped
address; that is only correct when the dumped one is byte-identical with the
same layout, which is what the plan's header describes.
"""

import ctypes
import hashlib
import io

from elftools.elf.elffile import ELFFile

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


def symbols(blob):
    elf = ELFFile(io.BytesIO(blob))
    dynsym = elf.get_section_by_name(".dynsym")
    if dynsym is None:
        return []
    return [[s.name, s["st_value"]] for s in dynsym.iter_symbols() if s.name]


def own_identity():
    blob = own_vdso_bytes()
    return {
        "layout": own_layout(),
        "sha256": hashlib.sha256(blob).hexdigest() if blob else "",
        "symbols": symbols(blob) if blob else [],
    }
