"""The restorer blob: built object, loader checks, program images, register resume rules."""

import os
import struct
import subprocess

import pytest

from stages.apply import program, restorer
from stages.apply.restore import resume_regs

U64 = (1 << 64) - 1


def test_packaged_blob_is_position_independent_code():
    blob = restorer.load()
    assert len(blob.code) > 64
    assert 0 <= blob.entry < len(blob.code)
    with open(restorer.object_path(), "rb") as f:
        again = restorer.Blob.from_object(f.read())
    assert again.code == blob.code


def _compile(tmp_path, source):
    src = tmp_path / "r.c"
    src.write_text(source)
    out = tmp_path / "r.o"
    subprocess.run(["gcc", "-O2", "-fPIC", "-ffreestanding", "-nostdlib", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-c", str(src), "-o", str(out)], check=True)
    return out.read_bytes()


def test_loader_refuses_relocations_and_data(tmp_path):
    with_reloc = _compile(tmp_path, "extern int x; void cow_restorer_main(void) { x = 1; for (;;); }")
    with pytest.raises(restorer.BlobError, match="relocation"):
        restorer.Blob.from_object(with_reloc)
    with_data = _compile(tmp_path, "static int y = 5; int *cow_restorer_main(void) { y++; return 0; }")
    with pytest.raises(restorer.BlobError, match="relocation|.data"):
        restorer.Blob.from_object(with_data)
    no_entry = _compile(tmp_path, "void other(void) { for (;;); }")
    with pytest.raises(restorer.BlobError, match="cow_restorer_main"):
        restorer.Blob.from_object(no_entry)


def test_program_image_places_ops_data_and_patches():
    prog = restorer.Program()
    name = prog.string("/dev/null")
    aux = prog.struct(b"A" * 16)
    holder = prog.struct(b"\0" * 16)
    prog.patch(holder, 8, aux)
    prog.add(restorer.OP_OPEN_FD, 3, name, os.O_RDONLY)
    base = 0x10000000000
    image, entry, prog_addr, stack_top, total = prog.image(base)
    assert entry == base + restorer.load().entry
    assert len(image) == total and total % 4096 == 0
    assert base < prog_addr < stack_top <= base + total
    magic, nops, ops, done, error, finished = restorer.HEADER.unpack_from(image, prog_addr - base)
    assert (magic, nops, done, error, finished) == (restorer.MAGIC, 1, 0, 0, 0)
    op = struct.unpack_from("<8Q", image, ops - base)
    assert op[:2] == (restorer.OP_OPEN_FD, 3)
    assert image[op[2] - base: op[2] - base + 10] == b"/dev/null\0"
    # the patched pointer points at the auxv bytes
    found = [i for i in range(len(image) - 16) if image[i:i + 16] == b"A" * 16]
    assert found
    pointer_places = [i for i in range(0, len(image) - 8, 8) if struct.unpack_from("<Q", image, i)[0] == base + found[0]]
    assert pointer_places


def test_complement_covers_everything_but_keep():
    keep = [(0x5000, 0x6000), (0x1000, 0x2000)]
    assert program.complement(keep, 0, 0x8000) == [(0, 0x1000), (0x2000, 0x5000), (0x6000, 0x8000)]


def _regs(rax, orig, rip=0x1000):
    regs = dict.fromkeys(("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
                          "rcx", "rdx", "rsi", "rdi", "cs", "eflags", "rsp", "ss", "fs_base",
                          "gs_base", "ds", "es", "fs", "gs"), 0)
    regs.update(rax=rax & U64, orig_rax=orig & U64, rip=rip)
    return regs


@pytest.mark.parametrize("code", [512, 513, 514, 516])
def test_restart_codes_reissue_the_syscall(code):
    out = resume_regs(_regs(-code, 35))
    assert out["rax"] == 35 and out["rip"] == 0x1000 - 2 and out["orig_rax"] == U64


def test_no_restart_outside_syscalls_or_for_other_results():
    assert resume_regs(_regs(-4, 35))["rip"] == 0x1000  # -EINTR: the syscall already returned
    assert resume_regs(_regs(-512, -1))["rip"] == 0x1000  # not in a syscall
    out = resume_regs(_regs(7, 0))
    assert out["rax"] == 7 and out["rip"] == 0x1000


def _layout(vvar):
    return [{"kind": "vvar", "start": vvar, "end": vvar + 0x4000},
            {"kind": "vvar_vclock", "start": vvar + 0x4000, "end": vvar + 0x6000},
            {"kind": "vdso", "start": vvar + 0x6000, "end": vvar + 0x8000}]


def _own(vvar):
    return [[f"[{v['kind']}]", v["start"], v["end"]] for v in _layout(vvar)]


def test_vdso_block_moves_directly_or_through_the_parking_hole():
    prog = restorer.Program()
    program._move_vdso(prog, _layout(0x7F0000000000), _own(0x7E0000000000), (0x10000000000, 0x8000))
    assert [(c, a[:3]) for c, a in prog.ops] == [
        (restorer.OP_MREMAP, [0x7E0000000000, 0x4000, 0x7F0000000000]),
        (restorer.OP_MREMAP, [0x7E0000004000, 0x2000, 0x7F0000004000]),
        (restorer.OP_MREMAP, [0x7E0000006000, 0x2000, 0x7F0000006000]),
    ]
    overlapping = restorer.Program()  # the dumped block overlaps the current one: park first
    program._move_vdso(overlapping, _layout(0x7F0000002000), _own(0x7F0000000000), (0x10000000000, 0x8000))
    dests = [a[2] for _, a in overlapping.ops]
    assert dests == [0x10000000000, 0x10000004000, 0x10000006000, 0x7F0000002000, 0x7F0000006000, 0x7F0000008000]
    same = restorer.Program()
    program._move_vdso(same, _layout(0x7F0000000000), _own(0x7F0000000000), (0x10000000000, 0x8000))
    assert same.ops == []
