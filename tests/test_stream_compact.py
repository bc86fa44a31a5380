"""Compact record bodies (stages.stream.compact): read one VMA at a time, behave like the
dicts they stand for, pack to the same bytes, and bad records get the usual messages."""

import copy
import io

import msgpack
import pytest

from stages.stream import StreamError, StreamReader, StreamWriter, envelope, pack_u32
from stages.stream.compact import LayoutVma, PlanRange, PlanStep, VmaBody
from tests.test_stream import tiny_header, tiny_process

PAGE = 4096


def vma(i, **extra):
    body = {"start": 0x10000 + 2 * i * PAGE, "end": 0x11000 + 2 * i * PAGE, "prot": 3 if i % 2 else 1,
            "shared": False, "pgoff": 0, "kind": "anon", "path": None, "vmflags": ["rd", "wr", "mr"],
            "frames": pack_u32([i + 1])}
    body.update(extra)
    return body


def images_with(vmas, raw_vmas_meta=None):
    """An image stream whose process 100 has ``vmas`` (or a vmas record of raw meta)."""
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header())
    w.write("process", tiny_process(100, 1))
    if raw_vmas_meta is None:
        w.write("vmas", {"pid": 100, "vmas": vmas})
    else:
        w.write_encoded("vmas", raw_vmas_meta)
    w.close()
    return out.getvalue()


def vmas_record(blob, compact):
    return [r for r in StreamReader(io.BytesIO(blob), compact=compact) if r.kind == "vmas"][0]


def test_compact_vmas_read_as_the_dicts_and_pack_to_the_same_bytes():
    vmas = [vma(i) for i in range(300)]
    vmas[7] = vma(7, kind="file", path="/usr/lib/x.so", dev="fe:00", ino=12, size=8192, mtime=5)
    rec = vmas_record(images_with(vmas), True)
    got = rec.body["vmas"]
    assert all(isinstance(v, VmaBody) for v in got)
    assert [dict(v) for v in got] == vmas and got == vmas
    assert list(got[7]) == list(vmas[7])  # the keys keep their wire order
    assert envelope.pack_meta(rec.body) == rec.meta  # what cow-plan passes on is what it read
    assert got[0]["vmflags"] is got[1]["vmflags"]  # equal flag lists are one object
    assert got[7].get("dev") == "fe:00" and got[0].get("dev") is None and "dev" not in got[0]


@pytest.mark.parametrize("damage, message", [
    (lambda v: v.pop("kind"), "record 2 (vmas).vmas[3]: missing field 'kind'"),
    (lambda v: v.update(prot=9), "record 2 (vmas).vmas[3].prot: 9 is above 7"),
    (lambda v: v.update(colour="red"), "record 2 (vmas).vmas[3]: unknown field 'colour'"),
])
def test_a_bad_vma_is_refused_with_the_message_of_the_whole_record_check(damage, message):
    vmas = [vma(i) for i in range(5)]
    damage(vmas[3])
    out = io.BytesIO()
    w = StreamWriter(out, "cowtree-images", tiny_header(), validate=False)
    w.write("process", tiny_process(100, 1))
    w.write("vmas", {"pid": 100, "vmas": vmas})
    w.close()
    for compact in (False, True):
        with pytest.raises(StreamError) as exc:
            list(StreamReader(io.BytesIO(out.getvalue()), compact=compact))
        assert str(exc.value) == message


@pytest.mark.parametrize("body", [
    {"pid": 100, "vmas": "nope"},  # not a list
    {"pid": 100},  # no vmas
    {"vmas": [vma(0)], "pid": 100, "extra": 1},  # an unknown field after the list
])
def test_an_irregular_vmas_record_gets_the_whole_record_message(body):
    meta = msgpack.packb(body, use_bin_type=True)
    blob = images_with(None, raw_vmas_meta=meta)
    with pytest.raises(StreamError) as plain:
        list(StreamReader(io.BytesIO(blob)))
    with pytest.raises(StreamError) as compact:
        list(StreamReader(io.BytesIO(blob), compact=True))
    assert str(compact.value) == str(plain.value)


def test_layout_entries_share_the_vma_and_change_alone():
    base = VmaBody.from_dict(vma(0))
    a, b = LayoutVma(base, (5, 0, 1, 0)), LayoutVma(base, [[6, 0, 1, 0]])
    assert a["pieces"] == [[5, 0, 1, 0]] and b["pieces"] == [[6, 0, 1, 0]]
    assert dict(a) == dict(vma(0), pieces=[[5, 0, 1, 0]])
    assert msgpack.packb(a, default=envelope.compact.plain) == msgpack.packb(dict(vma(0), pieces=[[5, 0, 1, 0]]))
    a["shared"] = True
    assert a["shared"] is True and b["shared"] is False and base["shared"] is False
    deep = copy.deepcopy(b)
    deep["pieces"][0][0] = 9
    assert b["pieces"] == [[6, 0, 1, 0]]


def test_plan_ranges_and_steps_pack_as_dicts_in_key_order():
    r = PlanRange(id=3, offset=4096, size=8192, backing="file")
    r.update(path="/x", pgoff=0, dev=None, ino=0)
    d = {"id": 3, "offset": 4096, "size": 8192, "backing": "file", "path": "/x", "pgoff": 0, "dev": None, "ino": 0}
    s = PlanStep(op="write", range=3, pages=pack_u32([0, 1]))
    body = {"ranges": [r] * 600, "steps": [s]}  # a list long enough to be packed in parts
    plain = {"ranges": [d] * 600, "steps": [{"op": "write", "range": 3, "pages": pack_u32([0, 1])}]}
    assert r == d and list(r) == list(d)
    parts = envelope.pack_meta_parts(body)
    assert len(parts) > 1 and b"".join(parts) == msgpack.packb(plain, use_bin_type=True)
    with pytest.raises(KeyError):
        r["colour"] = 1
