"""The native restorer blob: loading it from the built object, and writing its program.

The object (stages/apply/restorer.o, built by setup.py from native/restorer)
must be pure position-independent code: one .text section, no relocations, no
data.  pyelftools reads it; anything else is refused, because the blob runs at
an address chosen at restore time with no loader to patch it.  What it found (code
and entry) is kept next to the object (restorer.o.blob, with the object's sha256),
so that a cow-apply run does not parse (nor import pyelftools) again.

A *program* is what the blob executes: a header, then operations of 8 words
(code, 7 arguments), then the strings and structs they point to.  It is built
for one base address and copied there together with the code and a stack.
"""

import io
import os
import struct

from stages.sha256 import sha256

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGED = os.path.join(HERE, "restorer.o")
ENTRY_SYMBOL = "cow_restorer_main"
PAGE = 4096
MAGIC = int.from_bytes(b"cowrest1", "little")
STACK_SIZE = 64 * 1024

OP_UNMAP, OP_MREMAP, OP_MMAP, OP_MPROTECT, OP_MADVISE, OP_SIGACTION, OP_OPEN_FD = range(1, 8)
OP_MM_MAP, OP_TID_ADDRESS, OP_ROBUST_LIST, OP_CLOSE_RANGE, OP_CHDIR, OP_UMASK, OP_SYSCALL, OP_REAP = range(8, 16)
OP_THREAD, OP_WAIT_THREAD = 16, 17
OP_NAMES = {v: k for k, v in globals().items() if k.startswith("OP_") and isinstance(v, int)}

HEADER = struct.Struct("<QQQQqQ")  # magic, nops, ops, done, error, finished
THREAD_STATUS = struct.Struct("<QqQQ")  # at the start of a thread's area: done, error, finished, tid
THREAD_AREA = 16 * 1024  # a restored thread's status words and the stack its ops run on
OP = struct.Struct("<8Q")


class BlobError(Exception):
    pass


class Blob:
    """The restorer's code bytes and the offset of its entry point."""

    def __init__(self, code, entry):
        self.code, self.entry = code, entry

    @classmethod
    def from_object(cls, data):
        from elftools.elf.elffile import ELFFile
        from elftools.elf.relocation import RelocationSection

        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] != "EM_X86_64" or elf["e_type"] != "ET_REL":
            raise BlobError("restorer object is not an x86_64 relocatable object")
        text = None
        for section in elf.iter_sections():
            if isinstance(section, RelocationSection) and section.num_relocations():
                raise BlobError(f"restorer object has relocations ({section.name}): it must be position independent")
            alloc = section["sh_flags"] & 0x2
            if alloc and section.name == ".text":
                text = section
            elif alloc and section["sh_size"]:
                raise BlobError(f"restorer object has a {section.name} section: it must be code only")
        if text is None:
            raise BlobError("restorer object has no .text")
        symtab = elf.get_section_by_name(".symtab")
        entry = [s for s in symtab.iter_symbols() if s.name == ENTRY_SYMBOL] if symtab else []
        if not entry or entry[0]["st_shndx"] != elf.get_section_index(".text"):
            raise BlobError(f"restorer object has no {ENTRY_SYMBOL} in .text")
        undefined = [s.name for s in symtab.iter_symbols() if s.name and s["st_shndx"] == "SHN_UNDEF"]
        if undefined:
            raise BlobError(f"restorer object needs undefined symbols {undefined}")
        return cls(text.data(), entry[0]["st_value"])


def object_path():
    """The packaged object; built into a cache dir if the package build did not make it."""
    if os.path.exists(PACKAGED):
        return PACKAGED
    import importlib.util
    import tempfile

    src = os.path.join(os.path.dirname(os.path.dirname(HERE)), "native", "restorer", "build.py")
    if not os.path.exists(src):
        raise BlobError(f"{PACKAGED} is missing and no native/restorer sources are around to build it")
    spec = importlib.util.spec_from_file_location("restorer_build", src)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.build(os.path.join(tempfile.gettempdir(), f"cowtree-restorer-{os.getuid()}", "restorer.o"))


_BLOB = None


CACHE_MAGIC = b"cowblob1"
CACHE_HEAD = struct.Struct("<8s32sQ")  # magic, sha256 of the object, entry; the code follows


def load():
    global _BLOB
    if _BLOB is None:
        path = object_path()
        with open(path, "rb") as f:
            data = f.read()
        digest = sha256(data).digest()
        _BLOB = _cached(path + ".blob", digest)
        if _BLOB is None:
            _BLOB = Blob.from_object(data)
            _save(path + ".blob", digest, _BLOB)
    return _BLOB


def _cached(path, digest):
    """The blob found in this very object (same sha256) before, or None."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    if len(blob) < CACHE_HEAD.size:
        return None
    magic, sha, entry = CACHE_HEAD.unpack_from(blob)
    code = blob[CACHE_HEAD.size:]
    if magic != CACHE_MAGIC or sha != digest or not entry < len(code):
        return None
    return Blob(code, entry)


def _save(path, digest, blob):
    """Best effort: a directory we cannot write to just means parsing again next time."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(CACHE_HEAD.pack(CACHE_MAGIC, digest, blob.entry) + blob.code)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


class Program:
    """Operations for one process, and the strings/structs they refer to."""

    def __init__(self):
        self.ops = []  # (code, [args]) with args possibly ("data", index)
        self.data = []  # byte strings placed after the ops
        self.patches = []  # (ref, offset, target ref): an address stored inside a data item

    def _ref(self, blob):
        self.data.append(blob)
        return ("data", len(self.data) - 1)

    def string(self, text):
        return self._ref(os.fsencode(text) + b"\0")

    def struct(self, blob):
        return self._ref(blob)

    def thread(self, tid):
        """Start a thread with this tid (OP_THREAD): ops added until end_thread() are the
        thread's own, run by it.  Returns the reference of its area (status + stack)."""
        area = self._ref(bytes(THREAD_AREA))
        self.add(OP_THREAD, tid, area, THREAD_AREA, 0)
        self._thread_start = len(self.ops)
        return area

    def end_thread(self):
        code, args = self.ops[self._thread_start - 1]
        args[3] = len(self.ops) - self._thread_start  # nops: the ops the thread runs, the caller skips

    def patch(self, ref, offset, target):
        """Store the address of data item `target` at `offset` inside data item `ref`."""
        self.patches.append((ref, offset, target))

    def add(self, code, *args):
        if len(args) > 7:
            raise ValueError("an operation has at most 7 arguments")
        self.ops.append((code, list(args) + [0] * (7 - len(args))))

    def describe(self, index):
        code, args = self.ops[index]
        return f"{OP_NAMES.get(code, code)}({', '.join(hex(a) if isinstance(a, int) else 'ptr' for a in args)})"

    def threads(self, base):
        """[(tid, address of its status words, index of its first op)] of the threads this
        program starts, for a program at base."""
        places = self._places(base)
        return [(args[0], places[args[1][1]], i + 1) for i, (code, args) in enumerate(self.ops) if code == OP_THREAD]

    def _places(self, base):
        at = base + _align(len(load().code), 16) + HEADER.size + OP.size * len(self.ops)
        places = []
        for item in self.data:
            at = _align(at, 8)
            places.append(at)
            at += len(item)
        return places

    def image(self, base):
        """(region bytes, entry address, program address, stack top, total size) at base."""
        blob = load()
        code_size = _align(len(blob.code), 16)
        prog_addr = base + code_size
        ops_addr = prog_addr + HEADER.size
        data_addr = ops_addr + OP.size * len(self.ops)
        places, at = [], data_addr
        for item in self.data:
            at = _align(at, 8)
            places.append(at)
            at += len(item)
        stack_bottom = _align(at, 16)
        total = _align(stack_bottom - base + STACK_SIZE, PAGE)
        out = bytearray(total)
        out[: len(blob.code)] = blob.code
        HEADER.pack_into(out, prog_addr - base, MAGIC, len(self.ops), ops_addr, 0, 0, 0)
        for i, (code, args) in enumerate(self.ops):
            words = [places[a[1]] if isinstance(a, tuple) else a & (2**64 - 1) for a in args]
            OP.pack_into(out, ops_addr - base + i * OP.size, code, *words)
        for item, place in zip(self.data, places):
            out[place - base: place - base + len(item)] = item
        for ref, offset, target in self.patches:
            struct.pack_into("<Q", out, places[ref[1]] - base + offset, places[target[1]])
        return bytes(out), base + blob.entry, prog_addr, base + total - 64, total

    def size_estimate(self):
        blob = load()
        size = _align(len(blob.code), 16) + HEADER.size + OP.size * len(self.ops)
        size += sum(_align(len(d), 8) + 8 for d in self.data)
        return _align(size + STACK_SIZE + 64, PAGE)


def read_outcome(header_bytes):
    """(finished, done, error) from the program header read back from the process."""
    magic, nops, ops, done, error, finished = HEADER.unpack(header_bytes[: HEADER.size])
    return finished, done, error


def _align(x, a):
    return (x + a - 1) & ~(a - 1)
