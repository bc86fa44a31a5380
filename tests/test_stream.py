"""The stream layer: round trips, and every kind of damage is refused with a message."""

import io

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from stages.stream import StreamError, StreamReader, StreamWriter, envelope, pack_u32, unpack_u32
from stages.stream import images

PAGE = 4096


def tiny_header():
    return {
        "kernel": "6.0-test",
        "arch": "x86_64",
        "page_size": PAGE,
        "root_pid": 100,
        "vdso": {"layout": [["[vdso]", 0x7000, 0x9000]], "sha256": "00" * 32},
    }


def tiny_process(pid, ppid):
    return {
        "pid": pid, "ppid": ppid, "pgid": 100, "sid": 100, "comm": "w", "exe": "/bin/w",
        "threads": [{"tid": pid, "regs": bytes(216), "xstate": bytes(64), "sigmask": 0}],
        "mm": {k: 0 for k in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
            "start_stack", "arg_start", "arg_end", "env_start", "env_end")},
        "auxv": bytes(32), "sigactions": [[0, 0, 0, 0]] * 64, "fds": [],
    }


def tiny_images(npages=3):
    """header, two processes sharing frames 1..npages, one pages run, trailer."""
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header())
    w.write("process", tiny_process(100, 1))
    w.write("process", tiny_process(101, 100))
    for pid in (100, 101):
        vma = {
            "start": 0x10000, "end": 0x10000 + npages * PAGE, "prot": 3, "shared": False, "pgoff": 0,
            "kind": "anon", "path": None, "vmflags": ["rd", "wr"], "frames": pack_u32(range(1, npages + 1)),
        }
        w.write("vmas", {"pid": pid, "vmas": [vma]})
    pages = b"".join(bytes([i]) * PAGE for i in range(1, npages + 1))
    w.write("pages", {"first": 1, "count": npages, "same": pack_u32([0] * npages), "hashes": bytes(16 * npages)}, pages)
    w.close(summary={"frames": npages})
    return out.getvalue()


def read_all(blob):
    r = StreamReader(io.BytesIO(blob))
    return r, r.records()


def test_round_trip():
    r, recs = read_all(tiny_images())
    assert r.header["root_pid"] == 100
    assert [x.kind for x in recs] == ["process", "process", "vmas", "vmas", "pages"]
    assert list(unpack_u32(recs[2].body["vmas"][0]["frames"])) == [1, 2, 3]
    assert recs[4].data[:1] == b"\x01" and len(recs[4].data) == 3 * PAGE
    assert r.trailer["summary"] == {"frames": 3}


def test_every_truncation_is_refused():
    blob = tiny_images()
    # every cut point inside the stream (the full stream is valid)
    for cut in range(0, len(blob), 7):
        with pytest.raises(StreamError):
            read_all(blob[:cut])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_bit_flip_is_refused(data):
    blob = bytearray(tiny_images())
    pos = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[pos] ^= 1 << bit
    with pytest.raises(StreamError):
        read_all(bytes(blob))


def _records(blob):
    return list(msgpack.Unpacker(io.BytesIO(blob), raw=False))


def _reframe(raws):
    """Re-encode raw envelopes with fresh, valid checksums (to test the checks beyond crc)."""
    return b"".join(msgpack.packb(r, use_bin_type=True) for r in raws)


def test_swapped_records_are_refused():
    raws = _records(tiny_images())
    raws[1], raws[2] = raws[2], raws[1]
    with pytest.raises(StreamError, match="sequence number"):
        read_all(_reframe(raws))


def test_record_out_of_phase_is_refused():
    raws = _records(tiny_images())
    # move a vmas record before the process records, renumbering seq and crcs
    order = [raws[0], raws[3], raws[1], raws[2], raws[4], raws[5]]
    fixed = []
    for seq, (kind, _, meta, data, _) in enumerate(order):
        crc = envelope.record_crc(kind, seq, meta, data)
        fixed.append([kind, seq, meta, data, crc])
    with pytest.raises(StreamError, match="out of order"):
        read_all(_reframe(fixed + raws[6:]))


def test_newer_version_is_named():
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header(), validate=False)
    # forge a header claiming the next version with a valid checksum
    body = dict(tiny_header(), format="cowtree-images", version=images.VERSION + 1)
    parts, _ = envelope.encode_record("header", 0, envelope.pack_meta(body), None)
    blob = b"".join(parts)
    with pytest.raises(StreamError, match="newer than this cowtree"):
        StreamReader(io.BytesIO(blob))
    del w


def test_schema_violation_names_the_field():
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header())
    bad = tiny_process(100, 1)
    bad["pid"] = 0
    w.validate = False
    w.write("process", bad)
    w.close()
    with pytest.raises(StreamError, match=r"record 1 \(process\)\.pid: 0 is below 1"):
        read_all(out.getvalue())


def test_writer_refuses_bad_body():
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header())
    with pytest.raises(StreamError, match="missing field 'comm'"):
        body = tiny_process(100, 1)
        del body["comm"]
        w.write("process", body)


def test_bytes_after_trailer_are_refused():
    blob = tiny_images()
    with pytest.raises(StreamError, match="after the trailer"):
        read_all(blob + blob[:20])


def test_wrong_format_expected():
    with pytest.raises(StreamError, match="expected cowtree-plan"):
        StreamReader(io.BytesIO(tiny_images()), expect="cowtree-plan")


def test_not_a_stream():
    with pytest.raises(StreamError):
        read_all(b"hello world, this is not msgpack at all\n" * 4)
    with pytest.raises(StreamError):
        read_all(b"")


def test_payload_lengths_at_every_bin_width_round_trip():
    # bin8, bin16 and bin32 headers are written by hand (the payload is not copied)
    for n in (1, 255, 256, 65535, 65536, 3 * 65536 + 7):
        out = io.BytesIO()
        w = StreamWriter(out, "cowtree-images", tiny_header())
        w.write("pages", {"first": 1, "count": 1, "same": pack_u32([0]), "hashes": bytes(16)}, bytes(n))
        w.close()
        r, recs = read_all(out.getvalue())
        assert len(recs[0].data) == n
