"""The vDSO identity written in the image header: layout, sha256 and dynamic symbols."""

from stages.linux.memory import ProcessMemory
from stages.linux.vdso import LAYOUT_KINDS, symbols
from stages.sha256 import sha256


def vdso_identity(pid, vmas):
    layout = [[f"[{v['kind']}]", v["start"], v["end"]] for v in vmas if v["kind"] in LAYOUT_KINDS]
    vdso = [v for v in vmas if v["kind"] == "vdso"]
    if not vdso:
        return {"layout": layout, "sha256": "", "symbols": []}
    with ProcessMemory(pid) as mem:
        blob = mem.read(vdso[0]["start"], vdso[0]["end"] - vdso[0]["start"])
    return {"layout": layout, "sha256": sha256(blob).hexdigest(), "symbols": symbols(blob)}
