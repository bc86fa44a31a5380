"""Round trip: collect -> plan -> apply -> collect again gives the same images.

Compared: the tree (ppid, pgid, sid, comm), sigactions and signal masks, every VMA
(address, prot, backing), which pages are frames, the bytes of every page, and
the sharing: two pages that were one frame are one frame again.  What must
change is not compared: pids' host numbering (same here), registers, the rseq
area's cpu fields (the kernel rewrites them whenever a thread migrates), and
frame numbering where equal-content pages were merged by the plan.
"""

import json

import pytest

from tests.support.images import Images, rseq_pages, without_rseq
from tests.support.workloads import workload  # noqa: F401 (fixture)
from tests.test_apply_e2e import apply, collect, plan, restored  # noqa: F401 (fixture)

PAGE = 4096
VMA_FIELDS = ("start", "end", "prot", "shared", "pgoff", "kind", "path")


def page_views(images):
    """{(pid, address): (frame id, bytes)} for every frame page of the tree."""
    masks = rseq_pages(images)
    out = {}
    for pid, vmas in images.vmas.items():
        for v in vmas:
            for i, fid in enumerate(v["ids"] or ()):
                if fid:
                    addr = v["start"] + i * PAGE
                    out[(pid, addr)] = (fid, without_rseq(images.content[fid], masks.get(pid, {}).get(addr)))
    return out


@pytest.mark.parametrize("pattern", ["same", "moved", "chain", "split", "rewrote"])
def test_collect_plan_apply_collect_gives_the_same_images(pattern, workload, restored, tmp_path):
    wl = workload(pattern, 2)
    first_path = tmp_path / "first.cow"
    first_path.write_bytes(collect(wl.root))
    assert wl.wait_gone(10)
    plan_bytes = plan(first_path.read_bytes())
    if pattern == "rewrote":  # from a plan file (pages used in place)
        (tmp_path / "plan.cow").write_bytes(plan_bytes)
        rep = apply(b"", tmp_path, restored, "-i", str(tmp_path / "plan.cow"))
        # the parent's own version of the pages it shares with its children: dropped, made anew
        assert rep["fill"]["pages_dropped"] > 0
    else:
        rep = apply(plan_bytes, tmp_path, restored)
    assert rep["fill"]["userfaultfd_processes"] > 0
    second_path = tmp_path / "second.cow"
    second_path.write_bytes(collect(int(rep["pids"][str(rep["root"])]), kill=False))
    first, second = Images(str(first_path)), Images(str(second_path))

    tree = lambda im: [(p["pid"], p["ppid"] if p["pid"] != im.header["root_pid"] else None,
                        p["pgid"], p["sid"], p["comm"], p["sigactions"],
                        [t["sigmask"] for t in p["threads"]]) for p in im.processes]
    assert tree(second) == tree(first)
    for pid in first.pids:
        assert [[v[k] for k in VMA_FIELDS] for v in second.vmas[pid]] == \
               [[v[k] for k in VMA_FIELDS] for v in first.vmas[pid]], f"process {pid}: VMAs differ"

    a, b = page_views(first), page_views(second)
    assert set(b) == set(a), f"frame pages differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert a[key][1] == b[key][1], f"process {key[0]}: page {key[1]:#x} has other bytes"
    # sharing: pages that were one frame are one frame again
    second_of = {}
    for key, (fid, _) in a.items():
        second_of.setdefault(fid, set()).add(b[key][0])
    split = {fid: ids for fid, ids in second_of.items() if len(ids) > 1}
    assert not split, f"frames no longer shared after restore: {list(split.items())[:5]}"
    assert second.trailer["summary"]["frames"] <= first.trailer["summary"]["frames"]
    print(json.dumps({"frames_first": first.trailer["summary"]["frames"],
                      "frames_second": second.trailer["summary"]["frames"]}))
