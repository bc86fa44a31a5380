"""cow-plan strategies checked by the plan simulator: the six patterns and random fork histories."""

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.plan.cli import make_plan, pages_bodies
from stages.plan.model import PAGE, read_images
from stages.plan.simulate import simulate
from tests.support.synthetic import PATTERNS, History, ImageBuilder, page_bytes, random_history


def plan_of(stream, strategy):
    images = read_images(io.BytesIO(stream))
    try:
        header, records = make_plan(images, strategy)
        result = simulate(header, records, pages_bodies(images))
        return header, records, result, images
    finally:
        images.close()


def frames_per_process(images):
    return sum(1 for vmas in images.vmas.values() for v in vmas
               if v.plannable and v.ids is not None for f in v.ids if f)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_patterns_exact_duplicates_nothing(name):
    stream = PATTERNS[name]().images()
    header, _, result, images = plan_of(stream, "exact")
    assert result.ok, result.errors
    stats = header["stats"]
    assert stats["frames_duplicated"] == 0
    assert result.lost_sharing == 0
    assert stats["frames_planned"] == stats["frames_in_images"] == images.nframes


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_patterns_compare_strategies(name):
    stream = PATTERNS[name]().images()
    planned = {}
    for strategy in ("exact", "address", "none"):
        header, _, result, images = plan_of(stream, strategy)
        assert result.ok, (strategy, result.errors)
        planned[strategy] = header["stats"]["frames_planned"]
    assert planned["exact"] <= planned["address"] <= planned["none"]
    assert planned["none"] == frames_per_process(images)


@pytest.mark.parametrize("name", ["moved", "rewrote", "split", "orphans"])
def test_address_strategy_duplicates_where_the_reference_tool_does(name):
    header, _, result, _ = plan_of(PATTERNS[name]().images(), "address")
    assert result.ok
    assert header["stats"]["frames_duplicated"] > 0


def test_moved_vma_is_one_piece_per_vma():
    header, records, result, _ = plan_of(PATTERNS["moved"]().images(), "exact")
    assert result.ok
    for rec in records:
        for v in rec["layout"]:
            if v["kind"] == "anon":
                assert len(v["pieces"]) == 1, (rec["pid"], v["pieces"])


def test_rewrote_parent_writes_old_version_before_forking_then_its_own():
    header, records, result, _ = plan_of(PATTERNS["rewrote"]().images(), "exact")
    assert result.ok
    root = records[0]
    ops = [s["op"] for s in root["steps"]]
    assert ops[0] == "write" and "fork" in ops
    last_fork = max(i for i, op in enumerate(ops) if op == "fork")
    assert "write" in ops[last_fork:], ops


def test_equal_content_is_merged():
    h = History()
    a = h.mmap(h.root, 4)
    h.write_range(h.root, a, 4, "p")
    c = h.fork(h.root)
    h.write(c, a, ("p", 0))  # same bytes as the parent's page: a copy with equal content
    header, _, result, images = plan_of(h.images(), "exact")
    assert result.ok, result.errors
    assert images.nframes == 5
    assert header["stats"]["frames_planned"] == 4
    assert header["stats"]["frames_merged_equal"] == 1


def test_holder_lca_is_not_a_holder():
    b = ImageBuilder()
    shared = b.frame(page_bytes("shared"))
    own = [b.frame(page_bytes(("own", i))) for i in range(3)]
    b.process(1, 0)
    b.process(2, 1)
    b.process(3, 1)
    b.vma(1, 0x100000, [own[0], 0])
    b.vma(2, 0x200000, [shared, own[1]])
    b.vma(3, 0x300000, [own[2], shared])  # same frame at another page: misaligned with 2
    header, records, result, _ = plan_of(b.stream(), "exact")
    assert result.ok, result.errors
    assert header["stats"]["frames_planned"] == 4
    root_writes = [s for s in records[0]["steps"] if s["op"] == "write"]
    assert root_writes, "the root (the LCA) creates the shared frame"


def test_dontfork_and_wipeonfork_vmas_are_private():
    h = History()
    a = h.mmap(h.root, 3, ("dc",))
    b = h.mmap(h.root, 3, ("wf",))
    h.write_range(h.root, a, 3, "dc")
    h.write_range(h.root, b, 3, "wf")
    c = h.fork(h.root)
    h.write(c, b, "child")
    header, records, result, _ = plan_of(h.images(), "exact")
    assert result.ok, result.errors
    assert header["stats"]["frames_duplicated"] == 0
    child = next(r for r in records if r["pid"] == c)
    assert all(p[0] in {r["id"] for r in child["ranges"]}
               for v in child["layout"] for p in v["pieces"]), "the child's pages come from its own ranges"


def test_private_file_vma_uses_a_file_range_with_matching_offsets():
    b = ImageBuilder()
    f1, f2 = b.frame(page_bytes(1)), b.frame(page_bytes(2))
    b.process(1, 0)
    b.process(2, 1)
    b.vma(1, 0x400000, [f1, 0, 0, f2], kind="file", path="/usr/lib/x.so", pgoff=2 * PAGE)
    b.vma(2, 0x500000, [f1, 0, 0, 0], kind="file", path="/usr/lib/x.so", pgoff=2 * PAGE)  # moved
    for strategy in ("exact", "address", "none"):
        header, records, result, _ = plan_of(b.stream(), strategy)
        assert result.ok, (strategy, result.errors)
    header, records, result, _ = plan_of(b.stream(), "exact")
    assert header["stats"]["frames_planned"] == 2
    ranges = {r["id"]: r for rec in records for r in rec["ranges"]}
    for rec in records:
        for v in rec["layout"]:
            for rid, rpage, count, vpage in v["pieces"]:
                r = ranges[rid]
                assert r["backing"] == "file" and r["pgoff"] + rpage * PAGE == v["pgoff"] + vpage * PAGE


def test_siblings_needing_different_versions_get_an_order():
    # C1 needs (a, x), C2 (a, y), C3 (b, x): only some fork orders avoid duplicates
    b = ImageBuilder()
    a, bb, x, y = (b.frame(page_bytes(t)) for t in "abxy")
    own = b.frame(page_bytes("own"))
    b.process(1, 0)
    for pid in (2, 3, 4):
        b.process(pid, 1)
    b.vma(1, 0x100000, [own, 0])
    b.vma(2, 0x100000, [a, x])
    b.vma(3, 0x100000, [a, y])
    b.vma(4, 0x100000, [bb, x])
    header, _, result, _ = plan_of(b.stream(), "exact")
    assert result.ok, result.errors
    assert header["stats"]["frames_duplicated"] == 0
    assert header["stats"]["frames_planned"] == 5


def test_simulator_catches_a_wrong_plan():
    stream = PATTERNS["rewrote"]().images()
    images = read_images(io.BytesIO(stream))
    header, records = make_plan(images, "exact")
    # drop the root's first write: the children lose the old version
    first = next(i for i, s in enumerate(records[0]["steps"]) if s["op"] == "write")
    del records[0]["steps"][first]
    result = simulate(header, records, pages_bodies(images))
    assert not result.ok
    images.close()


histories = st.composite(lambda draw: random_history(draw, st))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_random_histories(history):
    stream = history.images()
    planned = {}
    for strategy in ("exact", "address", "none"):
        header, _, result, images = plan_of(stream, strategy)
        assert result.ok, (strategy, result.errors)
        stats = header["stats"]
        assert stats["frames_planned"] <= stats["frames_in_images"] + stats["frames_duplicated"]
        planned[strategy] = stats["frames_planned"]
        if strategy == "exact":
            assert stats["frames_duplicated"] == 0
            assert stats["frames_planned"] <= stats["frames_in_images"]
    assert planned["exact"] <= planned["address"], planned
    assert planned["none"] == frames_per_process(images)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(sorted(PATTERNS)), st.integers(2, 5), st.integers(10, 24))
def test_pattern_sizes(name, n, pages):
    fn = PATTERNS[name]
    kwargs = {"pages": pages}
    if name in ("same", "moved", "rewrote", "orphans"):
        kwargs["n"] = min(n, pages)
    header, _, result, _ = plan_of(fn(**kwargs).images(), "exact")
    assert result.ok, result.errors
    assert header["stats"]["frames_duplicated"] == 0


def test_no_fork_order_fits_so_a_frame_gets_its_own_slot():
    # C1 (a, x), C2 (a, y), C3 (b, x), C4 (b, y): no order keeps both columns' versions
    # contiguous, so one frame is relocated to an extra range; nothing is duplicated
    b = ImageBuilder()
    a, bb, x, y = (b.frame(page_bytes(t)) for t in "abxy")
    b.process(1, 0)
    b.vma(1, 0x100000, npages=2)
    for pid, frames in ((2, [a, x]), (3, [a, y]), (4, [bb, x]), (5, [bb, y])):
        b.process(pid, 1)
        b.vma(pid, 0x100000, frames)
    header, records, result, _ = plan_of(b.stream(), "exact")
    assert result.ok, result.errors
    assert header["stats"]["frames_duplicated"] == 0
    assert header["stats"]["frames_planned"] == 4
    sizes = sorted(r["size"] for r in records[0]["ranges"])
    # the group range, one extra page for the relocated frame, and the root's own clean
    # range (its VMA has no frames but its group slots were written)
    assert sizes == [PAGE, 2 * PAGE, 2 * PAGE], sizes


@st.composite
def random_frame_maps(draw):
    """Arbitrary (not history-shaped) trees: [(pid, ppid, [(start, kind, [pool index or -1])])].

    Up to two VMAs per process at a few addresses, anon (pool frames 0-3) or private
    file (frames 4-7, frame 4+i at file page i), 3 pairs with equal bytes, no frame
    twice in one process.
    """
    procs = []
    for pid in range(1, draw(st.integers(1, 6)) + 1):
        ppid = draw(st.integers(1, pid - 1)) if pid > 1 else 0
        starts = draw(st.lists(st.sampled_from([0x100000, 0x200000, 0x300000]), min_size=1, max_size=2,
                               unique=True))
        used, vmas = set(), []
        for start in sorted(starts):
            kind = draw(st.sampled_from(["anon", "anon", "file"]))
            if kind == "anon":
                picks = draw(st.lists(st.integers(-1, 3), min_size=2, max_size=4))
                picks = [k if k < 0 or k not in used and picks.index(k) == i else -1 for i, k in enumerate(picks)]
            else:
                # as in a real tree, a frame of a private file mapping stays at its file page
                picks = [4 + i if k and 4 + i not in used else -1
                         for i, k in enumerate(draw(st.lists(st.booleans(), min_size=2, max_size=4)))]
            used.update(k for k in picks if k >= 0)
            vmas.append((start, kind, picks))
        procs.append((pid, ppid, vmas))
    return procs


def frame_maps_stream(procs):
    b = ImageBuilder()
    pool = [b.frame(page_bytes(("pool", k % 5))) for k in range(8)]
    for pid, ppid, vmas in procs:
        b.process(pid, ppid)
        for start, kind, picks in vmas:
            frames = [pool[k] if k >= 0 else 0 for k in picks]
            if kind == "file":
                b.vma(pid, start, frames, kind="file", path="/usr/lib/libsynth.so", pgoff=0)
            else:
                b.vma(pid, start, frames)
    return b.stream()


@settings(max_examples=300, deadline=None)
@given(random_frame_maps())
def test_random_frame_maps(procs):
    stream = frame_maps_stream(procs)
    planned = {}
    for strategy in ("exact", "address", "none"):
        header, _, result, images = plan_of(stream, strategy)
        assert result.ok, (strategy, result.errors)
        planned[strategy] = header["stats"]["frames_planned"]
        if strategy == "exact":
            assert header["stats"]["frames_duplicated"] == 0
    assert planned["exact"] <= planned["address"] <= planned["none"], planned


def test_simulator_counts_lost_sharing():
    # the address strategy loses sharing on a moved VMA; a plan claiming otherwise is caught
    images = read_images(io.BytesIO(PATTERNS["moved"]().images()))
    header, records = make_plan(images, "address")
    assert simulate(header, records, pages_bodies(images)).ok
    lost = header["stats"]["frames_duplicated"]
    header["stats"]["frames_duplicated"] = 0
    result = simulate(header, records, pages_bodies(images))
    assert result.lost_sharing == lost > 0
    assert any("frames_duplicated" in e for e in result.errors)
    images.close()
