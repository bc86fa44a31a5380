"""cow-plan's memory grows with frames and VMAs, not with mapped pages: a tree of 64
processes sharing one region is planned with a few bytes per mapped page (a frame id is 4),
and a process with thousands of VMAs with compact objects per VMA, not dicts."""

import io
import tracemalloc

from stages.plan.cli import make_plan, write_plan
from stages.plan.model import read_images
from tests.support.synthetic import ImageBuilder, page_bytes

PROCS, PAGES = 64, 4096


def wide_tree():
    b = ImageBuilder()
    b.process(1000, 0)
    base = [b.frame(page_bytes(("root", i))) for i in range(PAGES)]
    b.vma(1000, 0x10000000, base)
    for k in range(1, PROCS):
        b.process(1000 + k, 1000)
        frames = list(base)
        frames[k] = b.frame(page_bytes(("child", k)))  # one page of its own
        b.vma(1000 + k, 0x10000000 if k % 2 else 0x40000000, frames)  # half moved with mremap
    return b.stream(run=1024)


def test_planning_a_wide_tree_costs_bytes_not_objects_per_mapped_page():
    images = read_images(io.BytesIO(wide_tree()))
    tracemalloc.start()
    try:
        header, _ = make_plan(images)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        images.close()
    assert header["stats"]["frames_duplicated"] == 0
    # a tuple or dict entry per mapped page alone would be 50-100 bytes per page
    per_page = peak / (PROCS * PAGES)
    print(f"{per_page:.1f} bytes per mapped page")  # for -s
    assert per_page < 32, f"{per_page:.1f} bytes per mapped page"


VMAS = 5000


def many_vmas():
    """One process with VMAS one-page anonymous VMAs (neighbours differ in prot, as the
    manyvmas workload makes them), each with a frame of its own."""
    b = ImageBuilder()
    b.process(1000, 0)
    for i in range(VMAS):
        b.vma(1000, 0x10000000 + 2 * i * 4096, [b.frame(page_bytes(("vma", i)))], prot=3 if i % 2 else 1)
    return b.stream(run=64)


class _Sink:
    def write(self, data):
        return len(data)

    def flush(self):
        pass


def test_planning_many_vmas_costs_compact_objects_per_vma():
    """Read, plan and write a process with thousands of VMAs (each its own range, write
    step and layout entry): VMA bodies, ranges, steps and pieces are compact objects
    (stages.stream.compact, flat tuples, arrays), not dicts and lists.  The peak is about
    1,200 bytes per VMA (a frame's hash and id included); it was 2,800 with a dict each."""
    blob = many_vmas()
    tracemalloc.start()
    try:
        images = read_images(io.BytesIO(blob))
        header, records = make_plan(images)
        write_plan(_Sink(), images, header, records)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        images.close()
    assert header["stats"]["frames_planned"] == VMAS
    assert len(records[0]["layout"]) == VMAS
    per_vma = peak / VMAS
    print(f"{per_vma:.0f} bytes per VMA")  # for -s
    assert per_vma < 1600, f"{per_vma:.0f} bytes per VMA"
