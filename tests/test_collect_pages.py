"""The page path of cow-collect without a live tree: the native crc32, equal-page detection
(a crc only proposes, bytes decide), the native frame table, the vDSO symbol reader."""

import io
import os
import random
import zlib
from array import array

import pytest

from stages.collect import pages
from stages.collect.frames import FrameTable
from stages.linux import pagemap

PAGE = 4096


def test_native_page_crcs_are_zlib_crc32():
    rnd = random.Random(7)
    for count in (1, 2, 3, 17, 256):
        blob = bytearray(rnd.randbytes(count * PAGE))
        blob[:PAGE] = bytes(PAGE)  # the zero page and a page of ones: edge values for the folding
        if count > 1:
            blob[PAGE:2 * PAGE] = b"\xff" * PAGE
        crcs, whole = pages._crc32_pages(blob, count)
        assert list(crcs) == [zlib.crc32(blob[i * PAGE:(i + 1) * PAGE]) for i in range(count)]
        assert whole == zlib.crc32(blob)
        # the payload crc of a record with pages left out: combined from the kept pages' crcs
        keep = [i for i in range(count) if i % 3 != 1]
        assert pages.combined_crc(array("I", [crcs[i] for i in keep])) == \
            zlib.crc32(b"".join(blob[i * PAGE:(i + 1) * PAGE] for i in keep))
    assert pages.combined_crc(array("I")) == zlib.crc32(b"")


def test_envelope_crc_is_zlib_crc32_for_any_length_and_start():
    """The stream envelope's native CRC-32 (any length, chained from a previous crc) gives
    zlib's values: around the 64-byte folding blocks and the size where zlib takes over."""
    from stages.stream import envelope

    rnd = random.Random(11)
    blob = rnd.randbytes(3 * PAGE + 77)
    for size in (0, 1, 63, 64, 65, 127, 4095, 4096, 4097, 4096 + 63, 8192, len(blob)):
        for start in (0, 1, 0xFFFFFFFF, rnd.getrandbits(32)):
            data = blob[:size]
            assert envelope._crc32(data, start) == zlib.crc32(data, start), (size, start)
            assert envelope._crc32(memoryview(data), start) == zlib.crc32(data, start)


class _Table:
    """Frame i (1-based) lives at address i * PAGE of process 0."""

    def runs_between(self, first, count):
        return [(0, first * PAGE, count)]

    def where(self, fid):
        return 0, fid * PAGE


class _Memory:
    def __init__(self, contents):
        self.contents, self.reads = contents, []

    def read(self, addr, length):
        self.reads.append(addr // PAGE)
        return self.contents[addr // PAGE]


def test_equal_crcs_never_merge_different_pages():
    # every page claims the same crc: only pages whose bytes are equal may become "same"
    a, b, c, d = (bytes([n]) * PAGE for n in (1, 2, 3, 4))
    contents = {1: a, 2: b, 3: a, 4: c, 5: b, 6: b, 7: d, 8: c}
    mem = _Memory(contents)
    dedup = pages._Dedup(_Table(), [mem])
    collide = array("I", [0xDEADBEEF] * 5)
    same, n = dedup.record(1, bytearray(b"".join(contents[f] for f in range(1, 6))), collide)
    assert list(same) == [0, 0, 1, 0, 2] and n == 2
    assert mem.reads == []  # all candidates were in the record itself
    # a later record: its candidates are earlier frames, read back from the (frozen) process
    same, n = dedup.record(6, bytearray(b"".join(contents[f] for f in range(6, 9))), array("I", [0xDEADBEEF] * 3))
    assert list(same) == [2, 0, 4] and n == 2
    assert set(mem.reads) <= {1, 2, 4}


def test_equal_pages_with_distinct_crcs_elsewhere_are_found():
    a, b = bytes(PAGE), b"\x01" * PAGE
    contents = {1: a, 2: b, 3: a}
    dedup = pages._Dedup(_Table(), [_Memory(contents)])
    same, n = dedup.record(1, bytearray(a + b), array("I", [zlib.crc32(a), zlib.crc32(b)]))
    assert list(same) == [0, 0] and n == 0
    same, n = dedup.record(3, bytearray(a), array("I", [zlib.crc32(a)]))
    assert list(same) == [1] and n == 1


def _entries_file(tmp_path, start, entries):
    path = tmp_path / "pagemap"
    with open(path, "wb") as f:
        f.seek(start // PAGE * 8)
        f.write(array("Q", entries).tobytes())
    return os.open(path, os.O_RDONLY)


def test_frame_table_ids_and_runs(tmp_path):
    P, S, F, ZERO = pagemap.PRESENT, pagemap.SWAPPED, pagemap.FILE_OR_SHARED, 77
    table = FrameTable(zero_pfn=ZERO)
    start = 0x40000
    anon = {"start": start, "end": start + 8 * PAGE, "shared": False, "kind": "anon"}
    fd = _entries_file(tmp_path, start, [P | 100, P | 101, 0, P | ZERO, S | 5, P | 100, P | 102, P | 103])
    try:
        frames = table.vma_frames(fd, 0, anon)
    finally:
        os.close(fd)
    # pfn 100 twice is one frame; a swap entry is a frame too; absent and zero pages are 0
    assert list(frames) == [1, 2, 0, 0, 3, 1, 4, 5]
    assert table.runs == [[1, 0, start, 2], [3, 0, start + 4 * PAGE, 1], [4, 0, start + 6 * PAGE, 2]]
    # another process: a file VMA (unmodified file pages are no frames), sharing pfn 101
    file_vma = {"start": start, "end": start + 4 * PAGE, "shared": False, "kind": "file"}
    fd = _entries_file(tmp_path, start, [P | F | 500, P | 101, P | 104, S | 6])
    try:
        frames = table.vma_frames(fd, 1, file_vma)
    finally:
        os.close(fd)
    assert list(frames) == [0, 2, 6, 7]
    assert table.runs[-1] == [6, 1, start + 2 * PAGE, 2] and len(table) == 7
    assert table.runs_between(5, 3) == [(0, start + 7 * PAGE, 1), (1, start + 2 * PAGE, 2)]
    assert [table.where(f) for f in (1, 2, 3, 5, 6, 7)] == [
        (0, start), (0, start + PAGE), (0, start + 4 * PAGE), (0, start + 7 * PAGE),
        (1, start + 2 * PAGE), (1, start + 3 * PAGE)]
    # the swap key differs from the same number as a PFN
    empty = {"start": start, "end": start + PAGE, "shared": False, "kind": "anon"}
    fd = _entries_file(tmp_path, start, [P | 5])
    try:
        assert list(table.vma_frames(fd, 2, empty)) == [8]
    finally:
        os.close(fd)
    # shared mappings and a VMA with nothing present: no frame map
    assert table.vma_frames(-1, 2, dict(empty, shared=True)) is None
    fd = _entries_file(tmp_path, start, [0])
    try:
        assert table.vma_frames(fd, 2, empty) is None
    finally:
        os.close(fd)


def test_frame_ids_of_a_child_in_its_parents_order_or_not(tmp_path):
    """frames.c guesses a page's id from the last one (a forked child maps its parent's frames in
    order); a wrong guess falls back to the table: the ids are the same either way, and the same
    whether the entries are read by vma_frames or handed to it (PagemapPrefetch)."""
    P, S = pagemap.PRESENT, pagemap.SWAPPED
    start = 0x40000
    parent = [P | (200 + i) for i in range(10)]
    child = [P | 200, P | 201, P | 202, P | 300, P | 204, P | 203, P | 205, P | 206, P | 207,
             P | 208, P | 209, 0, S | 1, P | 200]
    want = [1, 2, 3, 11, 5, 4, 6, 7, 8, 9, 10, 0, 12, 1]

    def vma(n):
        return {"start": start, "end": start + n * PAGE, "shared": False, "kind": "anon"}

    by_read = FrameTable(zero_pfn=1)
    for index, entries in enumerate((parent, child)):
        fd = _entries_file(tmp_path, start, entries)
        try:
            got = by_read.vma_frames(fd, index, vma(len(entries)))
        finally:
            os.close(fd)
    assert list(got) == want
    handed = FrameTable(zero_pfn=1)
    for index, entries in enumerate((parent, child)):
        got = handed.vma_frames(-1, index, vma(len(entries)), entries=array("Q", entries).tobytes())
    assert list(got) == want and handed.runs == by_read.runs and len(handed) == len(by_read) == 12


def test_vdso_symbols_read_with_struct_match_pyelftools():
    from elftools.elf.elffile import ELFFile

    from stages.linux import vdso
    blob = vdso.own_vdso_bytes()
    dynsym = ELFFile(io.BytesIO(blob)).get_section_by_name(".dynsym")
    expected = [[s.name, s["st_value"]] for s in dynsym.iter_symbols() if s.name]
    assert expected and vdso.symbols(blob) == expected


def one_vma_images(same, **pages_fields):
    """An image stream of one process with one anonymous VMA of len(same) frames: frame i's
    bytes are all i, stored unless same[i-1] names an earlier frame; pages_fields (crcs,
    hashes) go into the pages record as given."""
    from stages.stream import StreamWriter, pack_u32
    from tests.test_stream import tiny_header, tiny_process

    ids = list(range(1, len(same) + 1))
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header())
    w.write("process", tiny_process(100, 1))
    vma = {"start": 0x10000, "end": 0x10000 + len(ids) * PAGE, "prot": 3, "shared": False, "pgoff": 0,
           "kind": "anon", "path": None, "vmflags": ["rd", "wr"], "frames": pack_u32(ids)}
    w.write("vmas", {"pid": 100, "vmas": [vma]})
    data = b"".join(bytes([i]) * PAGE for i, s in zip(ids, same) if not s)
    w.write("pages", dict(pages_fields, first=1, count=len(ids), same=pack_u32(same)), data)
    w.close(summary={"frames": len(ids)})
    return out.getvalue()


def test_show_checks_page_crcs():
    from stages.stream import pack_u32
    from stages.tools.show import show

    def images(crcs, same):
        text = io.StringIO()
        show(io.BytesIO(one_vma_images(same, crcs=pack_u32(crcs))), text)
        return text.getvalue()

    good = [zlib.crc32(bytes([i]) * PAGE) for i in (1, 2, 3)]
    assert "page crcs: 3 checked, 0 wrong\n" in images(good, [0, 0, 0])
    assert "page crcs: 3 checked, 1 wrong (first: frame 2)" in images([good[0], good[0] ^ 1, good[2]], [0, 0, 0])
    # a frame "same" as an earlier one must carry that frame's crc
    assert "page crcs: 3 checked, 0 wrong\n" in images([good[0], good[1], good[0]], [0, 0, 1])
    assert "page crcs: 3 checked, 1 wrong (first: frame 3)" in images(good, [0, 0, 1])


@pytest.mark.parametrize("expected", [0, 100_000], ids=["growing", "sized-before"])
def test_crc_index_keeps_the_first_id_of_each_crc_while_it_grows(expected):
    from stages._native import ffi, lib
    index = ffi.gc(lib.cow_crc_index_new(expected), lib.cow_crc_index_free)
    rnd = random.Random(3)
    crcs = array("I", rnd.sample(range(1 << 32), 100_000))
    crcs[0] = 0  # crc 0 is a crc like any other
    first_id = {}
    for first in range(1, len(crcs) + 1, 256):
        part = crcs[first - 1:first + 255]
        out = array("I", bytes(4 * len(part)))
        assert lib.cow_crc_index_add(index, ffi.from_buffer("uint32_t[]", part), len(part), first,
                                     ffi.from_buffer("uint32_t[]", out)) == 0
        first_id.update((c, first + i) for i, c in enumerate(part))
    again = array("I", [crcs[0], crcs[99_999], 12345 if 12345 not in first_id else 54321, crcs[4242]])
    out = array("I", bytes(16))
    assert lib.cow_crc_index_add(index, ffi.from_buffer("uint32_t[]", again), 4, 200_000,
                                 ffi.from_buffer("uint32_t[]", out)) == 3
    assert list(out) == [1, 100_000, 0, 4243]


def test_plan_merges_equal_content_on_same_never_on_equal_crcs():
    from stages.plan import simulate
    from stages.plan.model import read_images
    from stages.stream import pack_u32

    def classes(pages_fields, same):
        images = read_images(io.BytesIO(one_vma_images(same, **pages_fields)))
        try:
            by_sim = simulate.content_classes(images.pages_bodies)
            return images.content_class()[1:], [by_sim[1], by_sim[2]]
        finally:
            images.close()

    equal_crcs = {"crcs": pack_u32([0xDEADBEEF, 0xDEADBEEF])}  # two different pages, one crc
    assert classes(equal_crcs, [0, 0]) == ([1, 2], [1, 2])
    assert classes(equal_crcs, [0, 1]) == ([1, 1], [1, 1])  # collect compared the bytes: same
    # older streams: equal SHA-256 prefixes are merged on, as before
    assert classes({"hashes": bytes(32)}, [0, 0]) == ([1, 1], [1, 1])
    assert classes({"hashes": bytes(16) + b"\x01" * 16}, [0, 0]) == ([1, 2], [1, 2])


def test_a_payload_in_pieces_is_the_same_record_as_joined():
    from stages.stream import envelope
    a, b = os.urandom(5000), os.urandom(70000)
    joined, crc = envelope.encode_record("pages", 3, b"meta", a + b)
    pieces, crc2 = envelope.encode_record("pages", 3, b"meta", [memoryview(a), memoryview(b)])
    assert crc == crc2 and b"".join(joined) == b"".join(bytes(p) for p in pieces)
    assert envelope.data_crc([a, b]) == zlib.crc32(a + b)
    empty, crc3 = envelope.encode_record("pages", 3, b"meta", [])  # every page of the record was "same"
    assert b"".join(empty) == b"".join(envelope.encode_record("pages", 3, b"meta", b"")[0])


def test_records_with_equal_pages_are_written_in_pieces(tmp_path):
    from stages.stream import StreamReader, StreamWriter
    from tests.test_stream import tiny_header
    contents = {f: bytes([f % 3]) * PAGE for f in range(1, 8)}  # frames 4.. repeat 1..3
    mem = _Memory(contents)
    dedup = pages._Dedup(_Table(), [mem])
    buf = memoryview(bytearray(b"".join(contents[f] for f in range(1, 8))))
    crcs, whole = pages._crc32_pages(buf, 7)
    same, n = dedup.record(1, buf, crcs)
    body, data, data_crc, stored = pages._record(1, buf, crcs, whole, same, n)
    assert list(same) == [0, 0, 0, 1, 2, 3, 1] and stored == 3 and isinstance(data, list)
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header(), validate=False)
    w.write("pages", body, data, data_crc=data_crc)
    w.close()
    (rec,) = StreamReader(io.BytesIO(out.getvalue()), validate=False).records()
    assert rec.data == b"".join(contents[f] for f in (1, 2, 3))
