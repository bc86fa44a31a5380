"""cow-apply's plan reader: pages used in place from a regular file, spooled from a pipe.

Both must index the same bytes for every frame, and both must refuse a damaged plan.
"""

import os
import threading

import pytest

from stages.apply.spool import PAGE, spool_plan
from stages.plan.cli import main as plan_main
from stages.stream import StreamError
from tests.test_plan_cli import golden_images


def make_plan(tmp_path, name):
    out = tmp_path / f"{name}.plan"
    assert plan_main(["-i", golden_images(name), "-o", str(out)]) == 0
    return out


def spool_from_pipe(data):
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:
                pass

    t = threading.Thread(target=feed)
    t.start()
    try:
        with os.fdopen(r, "rb") as f:
            return spool_plan(f)
    finally:
        t.join()


def frame_bytes(plan):
    return [bytes(plan.map[plan.frame_offsets[f]:plan.frame_offsets[f] + PAGE]) for f in range(1, plan.frames + 1)]


@pytest.mark.parametrize("name", ["mixed", "rewrote", "split"])
def test_in_place_and_spooled_pages_agree(tmp_path, name):
    path = make_plan(tmp_path, name)
    with open(path, "rb") as f:
        in_place = spool_plan(f)
    piped = spool_from_pipe(path.read_bytes())
    try:
        assert in_place.frames == piped.frames > 0
        # in place: the map is the plan file itself; from a pipe: only the stored pages
        assert in_place.spool_size == path.stat().st_size
        assert piped.spool_size < in_place.spool_size
        assert frame_bytes(in_place) == frame_bytes(piped)
        assert [p["pid"] for p in in_place.processes] == [p["pid"] for p in piped.processes]
    finally:
        in_place.close()
        piped.close()


def test_damaged_plan_is_refused_in_place_and_from_a_pipe(tmp_path):
    data = make_plan(tmp_path, "mixed").read_bytes()
    flipped = bytearray(data)
    flipped[len(data) * 2 // 3] ^= 0x40
    for bad in (data[:len(data) - 7], bytes(flipped)):
        path = tmp_path / "bad.plan"
        path.write_bytes(bad)
        with open(path, "rb") as f, pytest.raises(StreamError):
            spool_plan(f)
        with pytest.raises(StreamError):
            spool_from_pipe(bad)
