"""What the cow-* commands' starts do not pay for: modules they need at most rarely (ctypes,
hashlib with OpenSSL, queue, tempfile, json, contextlib) and an import hook of the editable
install.  Each is a few ms of a command whose whole run on a 256 MiB tree is ~0.25 s; the
replacements are checked against the originals.  (tests/test_apply_startup.py: cow-apply without pyelftools.)"""

import ctypes
import hashlib
import mmap
import os
import stat
import subprocess
import sys

from stages.apply import shmem
from stages.linux import memstat, pagemap, vdso
from stages.sha256 import sha256
from stages.tmpfile import unnamed_file

SKIPPED = {"ctypes", "hashlib", "_hashlib", "queue", "tempfile", "json", "contextlib"}


def imported_by(code):
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_cow_collect_start_leaves_out_rarely_needed_modules():
    mods = imported_by("from stages.collect import cli, collector, pages, state, vdso")
    assert "stages.collect.collector" in mods
    assert not mods & SKIPPED


def test_cow_plan_and_cow_apply_starts_leave_out_rarely_needed_modules():
    mods = imported_by("from stages.plan import cli; from stages.apply import cli, shmem, spool")
    assert {"stages.plan.exact", "stages.apply.restore"} <= mods
    assert not mods & SKIPPED


def test_no_import_hook_of_the_editable_install():
    # setuptools' editable finder imports pathlib, re, urllib... in every python start
    hooks = subprocess.run([sys.executable, "-c", "import sys; print([type(f).__module__ if not "
                            "isinstance(f, type) else f.__module__ for f in sys.meta_path])"],
                           capture_output=True, text=True, check=True).stdout
    assert "editable" not in hooks
    assert "pathlib" not in imported_by("import stages")


def test_builtin_sha256_is_hashlib_sha256():
    for blob in (b"", b"a", bytes(range(256)) * 100, vdso.own_vdso_bytes()):
        assert sha256(blob).hexdigest() == hashlib.sha256(blob).hexdigest()


def test_own_vdso_bytes_are_the_mapped_ones():
    (start, end), = [(s, e) for name, s, e in vdso.own_layout() if name == "[vdso]"]
    blob = vdso.own_vdso_bytes()
    assert len(blob) == end - start and blob == ctypes.string_at(start, end - start)
    assert blob[:4] == b"\x7fELF"


def test_zero_pfn_is_the_page_a_read_fault_maps():
    """zero_pfn (its address via cffi) against another read-faulted page (address via ctypes)."""
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(view)
        del view
        assert m[0] == 0
        fd = pagemap.open_pagemap("self")
        try:
            entry = pagemap.read_entries(fd, addr, addr + 4096)[0]
        finally:
            os.close(fd)
    finally:
        m.close()
    assert entry & pagemap.PRESENT and pagemap.zero_pfn() == entry & pagemap.PFN_MASK != 0


def test_fs_type_of_a_memfd_is_tmpfs():
    fd = os.memfd_create("cowtree-test")
    try:
        assert memstat.fs_type(fd) == memstat.TMPFS_MAGIC
    finally:
        os.close(fd)


def test_shared_anonymous_object_is_made_as_the_kernel_makes_one():
    fd = shmem._anonymous_object(10000)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/zero (deleted)"
        assert os.fstat(fd).st_size == 3 * 4096 and memstat.fs_type(fd) == memstat.TMPFS_MAGIC
    finally:
        os.close(fd)


def check_unnamed(fd, where):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
        assert name.startswith(os.path.join(where, "")) and name.endswith(" (deleted)"), name
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 0
        assert os.get_inheritable(fd) is False
        os.pwrite(fd, b"spool", 10)
        assert os.pread(fd, 5, 10) == b"spool"
    finally:
        os.close(fd)


def test_unnamed_file_in_the_dir_given_else_in_tmpdir(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("TMPDIR", str(b))
    check_unnamed(unnamed_file(str(a)), str(a))
    check_unnamed(unnamed_file(), str(b))
    monkeypatch.delenv("TMPDIR")
    for var in ("TEMP", "TMP"):
        monkeypatch.delenv(var, raising=False)
    check_unnamed(unnamed_file(), "/tmp")
    assert os.listdir(a) == os.listdir(b) == []


def test_unnamed_file_where_o_tmpfile_fails_comes_from_tempfile(tmp_path, monkeypatch):
    # a missing $TMPDIR: open(O_TMPFILE) fails there; tempfile then skips it for the next candidate
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches its choice
    check_unnamed(unnamed_file(), tempfile.gettempdir())
