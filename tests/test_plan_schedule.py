"""The exact strategy's two schedulers agree: the bundle one (units kept per (creator,
holders) key, no dict entry per held page) must give the same writes, forks and conflicts
as the per-slot one wherever it applies; checked on the patterns and on random trees."""

import io

import pytest
from hypothesis import HealthCheck, given, settings

from stages.plan import exact
from stages.plan.cli import make_plan
from stages.plan.model import read_images
from tests.support.synthetic import PATTERNS, ImageBuilder, page_bytes, random_history
from tests.test_plan import frame_maps_stream, histories, random_frame_maps

assert random_history  # histories() draws from it


def schedules_compared(stream):
    """Plan stream with both schedulers; (times the bundle one applied, times it declined)."""
    counts = {"bundles": 0, "slots only": 0}
    real = exact._schedule

    def both(images, units):
        got = exact._schedule_bundles(images, units)
        ref = exact._schedule_slots(images, units)
        if got is None:
            counts["slots only"] += 1
        else:
            counts["bundles"] += 1
            assert got[0] == ref[0], "conflicts differ"
            assert got[1] == ref[1], "schedules differ"
        return ref

    exact._schedule = both
    images = read_images(io.BytesIO(stream))
    try:
        make_plan(images, "exact")
    finally:
        exact._schedule = real
        images.close()
    return counts


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_bundle_schedule_applies_to_the_patterns_and_agrees(name):
    counts = schedules_compared(PATTERNS[name]().images())
    assert counts["bundles"] >= 1, counts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_bundle_schedule_agrees_on_random_histories(history):
    schedules_compared(history.images())


@settings(max_examples=300, deadline=None)
@given(random_frame_maps())
def test_bundle_schedule_agrees_on_random_frame_maps(procs):
    schedules_compared(frame_maps_stream(procs))


def test_a_grandchild_needing_the_old_version_is_forked_first():
    # G holds A; P (its child) forked X, then rewrote the page (B) and forked Y.  In the
    # dumped order (Y before X) P would write B before X inherits A: the scheduler must
    # see that conflict and fork X first.
    b = ImageBuilder()
    old, new = b.frame(page_bytes("A")), b.frame(page_bytes("B"))
    for pid, ppid in ((1, 0), (2, 1), (3, 2), (4, 2)):
        b.process(pid, ppid)
    b.vma(1, 0x100000, [old])
    b.vma(2, 0x100000, [new])
    b.vma(3, 0x100000, [new])  # Y
    b.vma(4, 0x100000, [old])  # X
    stream = b.stream()
    counts = schedules_compared(stream)
    assert counts["bundles"] >= 1, counts
    images = read_images(io.BytesIO(stream))
    try:
        header, records = make_plan(images, "exact")
    finally:
        images.close()
    steps = {r["pid"]: [st.get("pid") for st in r["steps"] if st["op"] == "fork"] for r in records}
    assert steps[2] == [4, 3], steps
    assert header["stats"]["frames_duplicated"] == 0
