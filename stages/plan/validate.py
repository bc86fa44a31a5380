"""Semantic checks of a plan: everything cow-apply must verify before creating any process.

The stream layer has already checked types and field names; this checks meaning:
the tree, the window, ranges, steps and layouts.  It needs no page bytes, only the
set of frame ids the plan's pages records hold.

    from stages.plan.validate import validate_plan, PlanInvalid
    validate_plan(header, process_records, frame_ids)   # raises PlanInvalid
"""

from stages.stream import unpack_u32

from .model import PAGE, PLANNABLE_KINDS

# Nothing cowtree restores is bigger than the x86-64 user address space.
ADDRESS_LIMIT = 1 << 47
MAX_WRITES = 1 << 32


class PlanInvalid(ValueError):
    """The plan is not executable; the message names the process and the field."""


def validate_plan(header, processes, frame_ids):
    errors = []

    def bad(msg):
        errors.append(msg)
        if len(errors) >= 20:
            raise PlanInvalid("; ".join(errors))

    window = header["window"]
    base, wsize = window["base_hint"], window["size"]
    if base % PAGE or wsize % PAGE or wsize <= 0:
        bad(f"header.window: base_hint {base:#x} / size {wsize:#x} not page aligned or empty")
    if base + wsize > ADDRESS_LIMIT:
        bad(f"header.window: [{base:#x}, {base + wsize:#x}) is beyond the user address space")
    if errors:
        raise PlanInvalid("; ".join(errors))

    _check_tree(header, processes, bad)
    if errors:
        raise PlanInvalid("; ".join(errors))

    ranges = {}
    for proc in processes:
        pid = proc["pid"]
        for n, r in enumerate(proc["ranges"]):
            where = f"process {pid}: ranges[{n}] (id {r['id']})"
            if r["id"] in ranges:
                bad(f"{where}: range id used twice")
                continue
            if r["offset"] % PAGE or r["size"] % PAGE:
                bad(f"{where}: offset/size not page aligned")
            if r["offset"] + r["size"] > wsize:
                bad(f"{where}: [{r['offset']:#x}, +{r['size']:#x}) is outside the window of {wsize:#x} bytes")
            if r["backing"] == "file" and not r.get("path"):
                bad(f"{where}: file backing without a path")
            if r["backing"] == "file" and r.get("pgoff", 0) % PAGE:
                bad(f"{where}: pgoff not page aligned")
            ranges[r["id"]] = r
    # ranges by offset (the ranges themselves sorted: no tuple per range, 20,000 in one process)
    spans = sorted(ranges.values(), key=lambda r: r["offset"])
    for a, b in zip(spans, spans[1:]):
        if b["offset"] < a["offset"] + a["size"]:
            owner = {r["id"]: proc["pid"] for proc in processes for r in proc["ranges"]}
            bad(f"process {owner[b['id']]}: range {b['id']} overlaps range {a['id']} of process "
                f"{owner[a['id']]} in the window")
    spans = None

    mapped_at_start = {}
    writes = 0
    for proc in processes:
        pid = proc["pid"]
        mapped = set(mapped_at_start.pop(pid, ()))
        mapped.update(r["id"] for r in proc["ranges"])
        for n, st in enumerate(proc["steps"]):
            where = f"process {pid}: steps[{n}] ({st['op']})"
            op = st["op"]
            if op in ("write", "drop"):
                rid = st.get("range")
                if rid not in mapped:
                    bad(f"{where}: range {rid} is not mapped here")
                    continue
            if op == "write":
                if "pages" not in st:
                    bad(f"{where}: no pages")
                    continue
                pairs = unpack_u32(st["pages"])
                npages = ranges[rid]["size"] // PAGE
                writes += len(pairs) // 2
                if writes > MAX_WRITES:
                    bad(f"{where}: more than {MAX_WRITES} page writes in the plan")
                for k in range(0, len(pairs), 2):
                    if pairs[k] >= npages:
                        bad(f"{where}: page {pairs[k]} outside range {rid} of {npages} pages")
                        break
                    if pairs[k + 1] not in frame_ids:
                        bad(f"{where}: frame {pairs[k + 1]} is not in the plan's pages")
                        break
            elif op == "fork":
                mapped_at_start[st.get("pid")] = frozenset(mapped)
            elif op == "drop":
                mapped.discard(rid)
        _check_layout(pid, proc["layout"], mapped, ranges, base, wsize, bad)
    if errors:
        raise PlanInvalid("; ".join(errors))


def _check_tree(header, processes, bad):
    if not processes:
        bad("the plan has no process")
    seen = {}
    forks = {}
    for n, proc in enumerate(processes):
        pid, ppid = proc["pid"], proc["ppid"]
        if pid <= 0 or pid in seen:
            bad(f"process record {n}: pid {pid} is not positive or not unique")
        seen[pid] = proc
        if proc["image"].get("pid") != pid:
            bad(f"process {pid}: image.pid is {proc['image'].get('pid')}")
        if n == 0:
            if ppid != 0 or pid != header["root_pid"]:
                bad(f"process {pid}: the first process must be the root {header['root_pid']} with ppid 0")
        elif ppid not in seen or ppid == pid:
            bad(f"process {pid}: ppid {ppid} is not an earlier process")
        for k, st in enumerate(proc["steps"]):
            if st["op"] == "fork":
                child = st.get("pid")
                if child is None:
                    bad(f"process {pid}: steps[{k}] fork without a pid")
                forks.setdefault(child, []).append(pid)
    for pid, proc in seen.items():
        if pid == header["root_pid"]:
            if pid in forks:
                bad(f"process {pid}: the root is forked by {forks[pid]}")
            continue
        if forks.get(pid) != [proc["ppid"]]:
            bad(f"process {pid}: must be forked exactly once by its parent {proc['ppid']} (forked by {forks.get(pid, [])})")
    for child in forks:
        if child not in seen:
            bad(f"process {forks[child][0]}: forks {child}, which has no process record")


def _check_layout(pid, layout, mapped, ranges, base, wsize, bad):
    prev_end = 0
    taken = {}  # range id -> [(first page, count, piece)]: mremap moves pages out, so once each
    for n, v in enumerate(layout):
        where = f"process {pid}: layout[{n}] [{v['start']:#x}-{v['end']:#x})"
        start, end = v["start"], v["end"]
        if start % PAGE or end % PAGE or end <= start:
            bad(f"{where}: not page aligned or empty")
            continue
        if start < prev_end:
            bad(f"{where}: not sorted or overlaps the previous VMA")
        prev_end = end
        if end > ADDRESS_LIMIT and (v["kind"] != "vsyscall" or end - start > PAGE):
            bad(f"{where}: beyond the user address space ({ADDRESS_LIMIT:#x})")
            continue
        if start < base + wsize and base < end:
            bad(f"{where}: overlaps the staging window at base_hint {base:#x}")
        npages = (end - start) // PAGE
        if v["frames"] is not None and len(v["frames"]) != 4 * npages:
            bad(f"{where}: frames has {len(v['frames']) // 4} entries for {npages} pages")
        if not v["pieces"]:
            continue
        if v["shared"] or v["kind"] not in PLANNABLE_KINDS:
            bad(f"{where}: pieces on a {v['kind']}{' shared' if v['shared'] else ''} VMA")
            continue
        cursor = 0
        for k, (rid, rpage, count, vpage) in enumerate(v["pieces"]):
            pw = f"{where}: pieces[{k}]"
            if vpage != cursor:
                bad(f"{pw}: starts at VMA page {vpage}, expected {cursor} (gap or overlap)")
                cursor = None
                break
            if rid not in mapped:
                bad(f"{pw}: range {rid} is not mapped when the layout is taken")
                cursor = None
                break
            r = ranges[rid]
            if rpage + count > r["size"] // PAGE:
                bad(f"{pw}: pages {rpage}..{rpage + count} outside range {rid}")
                cursor = None
                break
            if v["kind"] == "file" and v["path"] is not None:
                if r["backing"] != "file" or r.get("path") != v["path"] or \
                        r.get("pgoff", 0) + rpage * PAGE != v["pgoff"] + vpage * PAGE:
                    bad(f"{pw}: file VMA piece from range {rid} with another file or offset")
            elif r["backing"] != "anon":
                bad(f"{pw}: anonymous VMA piece from file range {rid}")
            taken.setdefault(rid, []).append((rpage, count, pw))
            cursor += count
        if cursor is not None and cursor != npages:
            bad(f"{where}: pieces cover {cursor} of {npages} pages")
    for rid, uses in taken.items():
        uses.sort()
        for (p1, c1, w1), (p2, _, w2) in zip(uses, uses[1:]):
            if p2 < p1 + c1:
                bad(f"{w2}: range {rid} page {p2} is also taken by {w1}")
