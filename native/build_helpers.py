"""cffi builder for stages._native: thin wrappers around syscalls Python lacks.

Every native/helpers/NAME.c comes with NAME.cdef (the declarations Python
sees); adding a helper is adding such a pair, nothing here changes.
"""

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join(HERE, "helpers", "*.c")))
cdefs = []
for src in sources:
    with open(src[:-2] + ".cdef") as f:
        cdefs.append(f.read())

ffibuilder = FFI()
ffibuilder.cdef("\n".join(cdefs))
ffibuilder.set_source(
    "stages._native",
    "\n".join(open(s[:-2] + ".cdef").read() for s in sources),
    sources=[os.path.relpath(s) for s in sources],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
