"""Compile the freestanding restorer (native/restorer/*.c) into one relocatable object.

Used by setup.py (package build) and by stages.apply.restorer as a fallback
when the packaged object is missing.  The flags keep the code position
independent and free of relocations and data sections: the loader refuses an
object that has any.
"""

import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = [
    "-O2", "-fPIC", "-ffreestanding", "-nostdlib", "-fno-builtin", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns", "-fno-jump-tables", "-Wall", "-Werror",
]


def sources():
    return sorted(os.path.join(HERE, n) for n in os.listdir(HERE) if n.endswith(".c"))


def build(out, cc="gcc"):
    """Compile every restorer source into the single object `out` (atomically)."""
    srcs = sources()
    if len(srcs) != 1:
        # one translation unit: calls between files would need relocations
        raise RuntimeError(f"restorer: expected exactly one C source, found {srcs}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    subprocess.run([cc, *CFLAGS, "-c", srcs[0], "-o", tmp], check=True)
    os.replace(tmp, out)
    return out
