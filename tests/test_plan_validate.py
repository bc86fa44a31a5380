"""stages.plan.validate: every plan cow-plan makes passes; each broken field is refused by name."""

import copy
import io

import pytest

from stages.plan.cli import make_plan
from stages.plan.model import read_images
from stages.plan.validate import PlanInvalid, validate_plan
from stages.stream import pack_u32, unpack_u32
from tests.support.synthetic import PATTERNS


@pytest.fixture(scope="module")
def plan():
    images = read_images(io.BytesIO(PATTERNS["chain"]().images()))
    header, records = make_plan(images, "exact")
    frame_ids = set(range(1, images.nframes + 1))
    images.close()
    return header, records, frame_ids


def broken(plan, mutate):
    header, records, frame_ids = copy.deepcopy(plan)
    mutate(header, records)
    with pytest.raises(PlanInvalid) as exc:
        validate_plan(header, records, frame_ids)
    return str(exc.value)


def first(records, pid_index, op):
    return next(s for s in records[pid_index]["steps"] if s["op"] == op)


def test_good_plans_pass(plan):
    for name, fn in PATTERNS.items():
        images = read_images(io.BytesIO(fn().images()))
        for strategy in ("exact", "address", "none"):
            header, records = make_plan(images, strategy)  # make_plan validates
            validate_plan(header, records, set(range(1, images.nframes + 1)))
        images.close()


def test_duplicate_pid(plan):
    def m(h, r):
        r[2]["pid"] = r[1]["pid"]
    assert "not unique" in broken(plan, m)


def test_ppid_not_earlier(plan):
    def m(h, r):
        r[1]["ppid"] = 9999
    msg = broken(plan, m)
    assert f"process {plan[1][1]['pid']}" in msg and "ppid" in msg


def test_child_forked_twice(plan):
    def m(h, r):
        r[0]["steps"].append(dict(first(r, 0, "fork")))
    assert "forked exactly once" in broken(plan, m)


def test_range_outside_window(plan):
    def m(h, r):
        r[0]["ranges"][0]["offset"] = h["window"]["size"]
    assert "outside the window" in broken(plan, m)


def test_overlapping_ranges(plan):
    def m(h, r):
        extra = dict(r[0]["ranges"][0], id=999)
        r[1]["ranges"].append(extra)
    assert "overlaps range" in broken(plan, m)


def test_write_to_unmapped_range(plan):
    def m(h, r):
        first(r, 0, "write")["range"] = 4242
    msg = broken(plan, m)
    assert "steps[" in msg and "not mapped" in msg


def test_write_outside_range(plan):
    def m(h, r):
        st = first(r, 0, "write")
        pairs = list(unpack_u32(st["pages"]))
        pairs[0] = 1 << 20
        st["pages"] = pack_u32(pairs)
    assert "outside range" in broken(plan, m)


def test_write_of_unknown_frame(plan):
    def m(h, r):
        st = first(r, 0, "write")
        pairs = list(unpack_u32(st["pages"]))
        pairs[1] = 10 ** 6
        st["pages"] = pack_u32(pairs)
    assert "not in the plan's pages" in broken(plan, m)


def test_layout_overlapping_window(plan):
    def m(h, r):
        h["window"]["base_hint"] = r[0]["layout"][0]["start"]
    assert "overlaps the staging window" in broken(plan, m)


def test_layout_unsorted(plan):
    def m(h, r):
        v = dict(r[0]["layout"][0], pieces=[])
        r[0]["layout"].append(v)
    assert "not sorted or overlaps" in broken(plan, m)


def test_pieces_gap(plan):
    def m(h, r):
        v = r[1]["layout"][0]
        pieces = v["pieces"]  # make_plan's layout gives a new list: set it back
        pieces[0][3] = 1
        v["pieces"] = pieces
    assert "gap or overlap" in broken(plan, m)


def test_pieces_short(plan):
    def m(h, r):
        v = r[1]["layout"][0]
        pieces = v["pieces"]
        pieces[-1][2] -= 1
        v["pieces"] = pieces
    assert "pieces cover" in broken(plan, m)


def test_file_piece_from_anon_range(plan):
    def m(h, r):
        v = r[1]["layout"][0]
        v["kind"], v["path"] = "file", "/usr/lib/x.so"
    assert "another file or offset" in broken(plan, m)


def test_absurd_window(plan):
    def m(h, r):
        h["window"]["size"] = 1 << 50
    assert "beyond the user address space" in broken(plan, m)


def test_pieces_on_shared_vma(plan):
    def m(h, r):
        r[1]["layout"][0]["shared"] = True
    assert "shared" in broken(plan, m)


def test_no_process(plan):
    def m(h, r):
        r.clear()
    assert "no process" in broken(plan, m)


def test_range_pages_taken_twice(plan):
    # the restorer mremaps a piece's pages out of its range: a second piece of the same pages
    # would find nothing there, after every process was created
    def m(h, r):
        for proc in r:
            for v in proc["layout"]:
                pieces = v["pieces"]
                if pieces and pieces[0][2] >= 2:
                    rid, rpage, count, _ = pieces[0]
                    v["pieces"] = [[rid, rpage, 1, 0], [rid, rpage, count - 1, 1]] + pieces[1:]
                    return
        raise AssertionError("no VMA with a piece of 2 pages or more")
    assert "is also taken by" in broken(plan, m)
