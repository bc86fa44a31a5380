"""Shared memory objects through cow-plan (synthetic images): passed through unchanged, the
VMAs that map them keep their object and get no pieces, and bad records are refused."""

import io

import pytest

from stages.plan.cli import make_plan, write_plan
from stages.plan.model import PAGE, PlanError, read_images
from stages.plan.simulate import simulate
from stages.stream import StreamReader, pack_u32
from tests.support.synthetic import ImageBuilder, page_bytes

SHARED_AT = 0x7000_0000_0000


def tree(shmem_pages=(0, 2), pgoff=0, oid=1, data=None):
    b = ImageBuilder()
    b.process(100, 0)
    b.process(101, 100)
    f = [b.frame(page_bytes(i)) for i in range(1, 5)]
    for pid in (100, 101):
        b.vma(pid, 0x10000, frames=f)
        b.vma(pid, SHARED_AT, npages=4, shared=True, path="/dev/zero (deleted)", pgoff=pgoff, shmem=oid)
    pages = list(shmem_pages)
    payload = data if data is not None else b"".join(page_bytes(100 + p) for p in pages)
    b.shmem.append(({"id": 1, "kind": "anon", "size": 4 * PAGE, "npages": 4, "pages": pack_u32(pages)}, payload))
    return b.stream()


def plan_of(stream):
    images = read_images(io.BytesIO(stream))
    try:
        header, records = make_plan(images)
        out = io.BytesIO()
        write_plan(out, images, header, records)
        return images, header, records, out.getvalue()
    finally:
        images.close()


def test_objects_pass_through_the_plan():
    images, header, records, plan = plan_of(tree())
    assert header["stats"]["shmem_objects"] == 1 and header["stats"]["shmem_pages"] == 2
    for rec in records:
        shared = [v for v in rec["layout"] if v.get("shmem")]
        assert len(shared) == 1 and shared[0]["pieces"] == [] and shared[0]["start"] == SHARED_AT
    assert simulate(header, records, images.pages_bodies).ok
    reader = StreamReader(io.BytesIO(plan))
    recs = [r for r in reader if r.kind == "shmem"]
    assert len(recs) == 1
    assert recs[0].data == page_bytes(100) + page_bytes(102)
    assert recs[0].body["pages"] == pack_u32([0, 2])


def test_images_without_shared_memory_have_no_shmem_stats():
    b = ImageBuilder()
    b.process(100, 0)
    b.vma(100, 0x10000, frames=[b.frame(page_bytes(1))])
    images = read_images(io.BytesIO(b.stream()))
    try:
        header, _ = make_plan(images)
    finally:
        images.close()
    assert "shmem_objects" not in header["stats"]


@pytest.mark.parametrize("kw, message", [
    ({"oid": 2}, "shared memory object 2 is not in the images"),
    ({"shmem_pages": (2, 1)}, "out of order"),
    ({"shmem_pages": (0, 4)}, "beyond its 4 pages"),
    ({"data": b"x" * PAGE}, "data bytes for 2 pages"),
    ({"pgoff": 100}, "not page aligned"),
])
def test_bad_shared_memory_is_refused(kw, message):
    with pytest.raises(PlanError, match=message):
        plan_of(tree(**kw))


def test_apply_refuses_a_plan_without_the_objects_its_vmas_map():
    from types import SimpleNamespace

    from stages.apply import check

    _, _, records, _ = plan_of(tree())
    with pytest.raises(check.Refusal, match="shared memory object 1 is not in the plan"):
        check.check_shared(SimpleNamespace(processes=records, shared={}))
    check.check_shared(SimpleNamespace(processes=records, shared={1: {}}))
