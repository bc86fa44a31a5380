"""The vDSO identity written in the image header: layout, sha256 and dynamic symbols."""

import hashlib
import io

from elftools.elf.elffile import ELFFile

from stages.linux.memory import ProcessMemory

LAYOUT_KINDS = ("vvar", "vvar_vclock", "vdso")


def vdso_symbols(blob):
    """(name, value) of every named dynamic symbol of a vDSO image."""
    elf = ELFFile(io.BytesIO(blob))
    dynsym = elf.get_section_by_name(".dynsym")
    if dynsym is None:
        return []
    return [[sym.name, sym["st_value"]] for sym in dynsym.iter_symbols() if sym.name]


def vdso_identity(pid, vmas):
    layout = [[f"[{v['kind']}]", v["start"], v["end"]] for v in vmas if v["kind"] in LAYOUT_KINDS]
    vdso = [v for v in vmas if v["kind"] == "vdso"]
    if not vdso:
        return {"layout": layout, "sha256": "", "symbols": []}
    with ProcessMemory(pid) as mem:
        blob = mem.read(vdso[0]["start"], vdso[0]["end"] - vdso[0]["start"])
    return {"layout": layout, "sha256": hashlib.sha256(blob).hexdigest(), "symbols": vdso_symbols(blob)}
