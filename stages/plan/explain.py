"""``cow-plan --explain``: a table per process of where its pages come from."""

from stages.stream import unpack_u32

from .model import PAGE


def explain(header, processes):
    stats = header["stats"]
    lines = [
        f"strategy {header['strategy']}: {stats['frames_planned']} frames planned for "
        f"{stats['frames_in_images']} in the images ({stats['frames_duplicated']} duplicated, "
        f"{stats['frames_merged_equal']} merged by equal content), {stats['processes']} processes, "
        f"{stats['moves']} moves; window {header['window']['size']:#x} bytes at {header['window']['base_hint']:#x}",
    ]
    starts = {}
    creator = {}  # rid -> pid
    creator_base = {}  # rid -> address of the range's page 0 in its creator's layout
    frame_phys = {}
    holders = {}
    phys = 0
    per_proc = []
    for proc in processes:
        pid = proc["pid"]
        mapped = starts.pop(pid, {})
        for r in proc["ranges"]:
            mapped[r["id"]] = [None] * (r["size"] // PAGE)
            creator[r["id"]] = pid
        for st in proc["steps"]:
            if st["op"] == "write":
                pairs = unpack_u32(st["pages"])
                pages = mapped[st["range"]]
                for k in range(0, len(pairs), 2):
                    phys += 1
                    pages[pairs[k]] = (phys, pid)
            elif st["op"] == "fork":
                starts[st["pid"]] = {rid: list(p) for rid, p in mapped.items()}
            elif st["op"] == "drop":
                mapped.pop(st["range"], None)
        own = untouched = 0
        inherited = {}
        moved = []
        with_pieces = 0
        for v in proc["layout"]:
            if not v["pieces"]:
                continue
            with_pieces += 1
            ids = unpack_u32(v["frames"]) if v["frames"] is not None else None
            is_moved = False
            for rid, rpage, count, vpage in v["pieces"]:
                base = v["start"] + (vpage - rpage) * PAGE
                if creator[rid] == pid:
                    creator_base.setdefault(rid, base)
                elif creator_base.get(rid, base) != base:
                    is_moved = True
                for k in range(count):
                    cell = mapped[rid][rpage + k]
                    if cell is None:
                        untouched += 1
                        continue
                    if cell[1] == pid:
                        own += 1
                    else:
                        inherited[cell[1]] = inherited.get(cell[1], 0) + 1
                    f = ids[vpage + k] if ids is not None else 0
                    if f:
                        frame_phys.setdefault(f, set()).add(cell[0])
                        holders.setdefault(f, []).append(pid)
            if is_moved:
                moved.append(f"[{v['start']:#x}-{v['end']:#x})")
        per_proc.append((proc, with_pieces, own, inherited, untouched, moved))
    dup = {}
    for f, s in frame_phys.items():
        if len(s) > 1:
            for pid in holders[f]:
                dup[pid] = dup.get(pid, 0) + 1
    lines.append("")
    lines.append(f"{'pid':>7} {'ppid':>7} {'vmas':>5} {'pieces':>6} {'private':>8} {'inherited':>9} "
                 f"{'untouched':>9} {'dup':>5}  inherited from / moved VMAs")
    for proc, with_pieces, own, inherited, untouched, moved in per_proc:
        pid = proc["pid"]
        npieces = sum(len(v["pieces"]) for v in proc["layout"])
        src = ", ".join(f"{p}: {n}" for p, n in sorted(inherited.items()))
        lines.append(
            f"{pid:>7} {proc['ppid']:>7} {len(proc['layout']):>5} {npieces:>6} {own:>8} "
            f"{sum(inherited.values()):>9} {untouched:>9} {dup.get(pid, 0):>5}  "
            f"{('from ' + src) if src else '-'}{('; moved ' + ' '.join(moved)) if moved else ''}"
        )
    return "\n".join(lines) + "\n"
