"""The two comparison strategies: ``none`` (no sharing) and ``address`` (the reference tool's).

none: every process creates a range per VMA and writes all its frames.
address: a VMA with the same start and end (and backing) in the parent is inherited
from the parent's range; the child writes only the pages whose frame (or content)
differs from the parent's page there.  Every process writes before it forks, so a
child sees its parent's final pages, as with the reference tool.
"""

from .layout import Draft, expand


def _own_range(draft, pid, v):
    rid = draft.new_range(pid, v.npages, v, v.body["pgoff"])
    draft.sources[pid][v.index] = (rid, 0, v.npages, 0)
    return rid


def plan_none(images):
    draft = Draft(images)
    for pid in images.pids:
        for child in images.children[pid]:
            draft.fork(pid, child)
        for v in images.vmas[pid]:
            if not v.plannable:
                continue
            rid = _own_range(draft, pid, v)
            if v.ids is not None:
                for i, f in enumerate(v.ids):
                    if f:
                        draft.write(pid, rid, i, f)
    return draft


def _same_vma(a, b):
    ka, kb = a.body, b.body
    return (a.start == b.start and a.end == b.end and a.inheritable and b.inheritable
            and ka["kind"] == kb["kind"] and ka["path"] == kb["path"] and ka["pgoff"] == kb["pgoff"])


def plan_address(images):
    draft = Draft(images)
    cls = images.content_class()
    for pid in images.pids:
        parent = images.parent[pid]
        by_start = {v.start: v for v in images.vmas[parent]} if parent else {}
        for v in images.vmas[pid]:
            if not v.plannable:
                continue
            pv = by_start.get(v.start)
            if pv is None or not _same_vma(pv, v) or draft.sources[parent][pv.index] is None:
                rid = _own_range(draft, pid, v)
                if v.ids is not None:
                    for i, f in enumerate(v.ids):
                        if f:
                            draft.write(pid, rid, i, f)
                continue
            pieces = draft.sources[parent][pv.index]
            draft.sources[pid][v.index] = pieces  # a tuple: shared, never changed
            if v.ids is None:
                continue
            src = expand(pieces)
            pids = pv.ids
            for i, f in enumerate(v.ids):
                if not f:
                    continue
                p = pids[i] if pids is not None else 0
                if p and (p == f or cls[p] == cls[f]):
                    continue
                draft.write(pid, src[i][0], src[i][1], f)
        for child in images.children[pid]:
            draft.fork(pid, child)
    return draft
