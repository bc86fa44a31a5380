"""This machine's vDSO as cow-apply sees it in itself: layout, sha256, symbols.

A restored process keeps the kernel's vDSO of this machine, moved to the dumped
address; that is only correct when the dumped one is byte-identical with the
same layout, which is what the plan's header describes.
"""

import struct

from stages.sha256 import sha256

from . import procfs
from .memory import ProcessMemory

LAYOUT_KINDS = ("vvar", "vvar_vclock", "vdso")


def own_layout():
    """[[name, start, end], ...] of [vvar], [vvar_vclock], [vdso] in this process."""
    return [[f"[{v['kind']}]", v["start"], v["end"]] for v in procfs.read_maps("self") if v["kind"] in LAYOUT_KINDS]


def own_vdso_bytes():
    for name, start, end in own_layout():
        if name == "[vdso]":
            # through /proc/self/mem: ctypes.string_at would cost ctypes' import (~2 ms)
            with ProcessMemory("self") as mem:
                return mem.read(start, end - start)
    return b""


ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")  # name, type, flags, addr, offset, size, link, info, align, entsize
ELF64_SYMBOL = struct.Struct("<IBBHQQ")  # name, info, other, shndx, value, size
SHT_DYNSYM = 11


def symbols(blob):
    """[name, value] of every named symbol of the ELF64 image's .dynsym, in table order.

    A few structs, not pyelftools: cow-apply checks this at every start, and the
    library's import alone costs more than the whole check (tests compare the two)."""
    try:
        head = ELF64_HEADER.unpack_from(blob)
        if head[0][:4] != b"\x7fELF" or head[0][4] != 2:
            raise ValueError("not an ELF64 image")
        shoff, shentsize, shnum = head[6], head[11], head[12]
        sections = [ELF64_SECTION.unpack_from(blob, shoff + i * shentsize) for i in range(shnum)]
        out = []
        for sec in sections:
            if sec[1] != SHT_DYNSYM:
                continue
            strtab = sections[sec[6]]
            strings = blob[strtab[4]:strtab[4] + strtab[5]]
            for at in range(sec[4], sec[4] + sec[5], sec[9] or ELF64_SYMBOL.size):
                name_at, _, _, _, value, _ = ELF64_SYMBOL.unpack_from(blob, at)
                name = strings[name_at:strings.index(b"\0", name_at)].decode()
                if name:
                    out.append([name, value])
        return out
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the vDSO image cannot be read: {exc}")


def own_identity():
    blob = own_vdso_bytes()
    return {
        "layout": own_layout(),
        "sha256": sha256(blob).hexdigest() if blob else "",
        "symbols": symbols(blob) if blob else [],
    }
