"""The stream reader's in-place mode (a regular file framed in a mapping, as cow-apply reads a
plan file): the same records as the ordinary reader, and the same refusals of any damage."""

import io

import pytest

from stages.stream import StreamError, StreamReader, StreamWriter, envelope, pack_u32
from tests.test_stream import _records, _reframe, tiny_header, tiny_images


def read_in_place(path):
    with open(path, "rb") as f:
        r = StreamReader(f, in_place=True)
        assert r.map is not None, "a regular file is read in place"
        recs = r.records()
        return r, [(x.kind, x.seq, x.body, None if x.data is None else bytes(x.data), x.data_offset) for x in recs]


def read_plainly(path):
    with open(path, "rb") as f:
        r = StreamReader(f)
        recs = r.records()
        return r, [(x.kind, x.seq, x.body, x.data, x.data_offset) for x in recs]


def test_same_records_as_the_ordinary_reader(tmp_path):
    path = tmp_path / "s.cow"
    path.write_bytes(tiny_images(5))
    r1, recs1 = read_in_place(path)
    r2, recs2 = read_plainly(path)
    assert recs1 == recs2
    assert r1.trailer == r2.trailer and r1.header == r2.header
    pages = [x for x in recs1 if x[0] == "pages"][0]
    blob = path.read_bytes()
    assert blob[pages[4]:pages[4] + len(pages[3])] == pages[3]  # data_offset: where the bytes are


def test_data_is_a_view_of_the_file_not_a_copy(tmp_path):
    path = tmp_path / "s.cow"
    path.write_bytes(tiny_images(3))
    with open(path, "rb") as f:
        r = StreamReader(f, in_place=True)
        data = [x.data for x in r if x.kind == "pages"][0]
        assert isinstance(data, memoryview) and data.readonly and data.obj is r.map
        data.release()


def test_a_pipe_is_read_the_ordinary_way():
    r = StreamReader(io.BytesIO(tiny_images()), in_place=True)
    assert r.map is None and len(r.records()) == 5


def test_every_truncation_is_refused(tmp_path):
    blob = tiny_images()
    path = tmp_path / "cut.cow"
    for cut in list(range(0, 200)) + list(range(200, len(blob), 97)) + list(range(len(blob) - 64, len(blob))):
        path.write_bytes(blob[:cut])
        with pytest.raises(StreamError):
            read_in_place(path)


def test_every_bit_flip_outside_the_page_bytes_and_some_inside_are_refused(tmp_path):
    blob = tiny_images(2)
    path = tmp_path / "flip.cow"
    path.write_bytes(blob)
    _, recs = read_in_place(path)
    start = [x for x in recs if x[0] == "pages"][0][4]
    positions = [p for p in range(len(blob)) if not start <= p < start + 2 * 4096] + list(range(start, start + 8192, 509))
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(StreamError):
            read_in_place(path)


def test_reordered_records_and_bytes_after_the_trailer_are_refused(tmp_path):
    path = tmp_path / "bad.cow"
    raws = _records(tiny_images())
    raws[1], raws[2] = raws[2], raws[1]
    path.write_bytes(_reframe(raws))
    with pytest.raises(StreamError, match="sequence number"):
        read_in_place(path)
    blob = tiny_images()
    path.write_bytes(blob + blob[:20])
    with pytest.raises(StreamError, match="after the trailer"):
        read_in_place(path)


def test_payloads_at_every_bin_width(tmp_path):
    for n in (1, 255, 256, 65535, 65536, 3 * 65536 + 7):
        out = io.BytesIO()
        w = StreamWriter(out, "cowtree-images", tiny_header())
        w.write("pages", {"first": 1, "count": 1, "same": pack_u32([0]), "hashes": bytes(16)}, bytes(range(256)) * (n // 256) + bytes(n % 256))
        w.close()
        path = tmp_path / f"w{n}.cow"
        path.write_bytes(out.getvalue())
        assert read_in_place(path)[1] == read_plainly(path)[1]


def test_an_oversized_payload_length_is_refused_before_anything_is_read(tmp_path):
    path = tmp_path / "big.cow"
    raws = _records(tiny_images())
    head = _reframe(raws[:5])
    # a pages envelope that claims more data than any record may carry
    bad = bytes([0x95, 0xA5]) + b"pages" + bytes([5, 0xC4, 1, 0x80, 0xC6]) + (envelope.MAX_DATA_BYTES + 1).to_bytes(4, "big")
    path.write_bytes(head + bad + bytes(64))
    with pytest.raises(StreamError, match="too long"):
        read_in_place(path)
