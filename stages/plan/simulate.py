"""The plan simulator: executes a plan over abstract memory, as docs/FORMAT.md says
("What a plan means"), and checks the result against the images.

Memory is a map range id -> list of physical pages (None = untouched: zero for an
anon range, the file's page for a file range).  A fork copies the references, a
write makes a new physical page, a drop unmaps, the layout moves pages to VMAs.
Checked: every page of every VMA holds its image frame's bytes (content identity
through ``same``, and the SHA-256 hashes of older streams); pages without a frame
read untouched memory of the right backing; every physical page written is used;
how many image frames lost their sharing (must equal ``frames_duplicated``); and
the stats.
"""

from stages.stream import unpack_u32

from .model import PAGE, PLANNABLE_KINDS


class Result:
    def __init__(self):
        self.errors = []
        self.writes = 0
        self.physical_used = 0
        self.lost_sharing = 0
        self.frames_in_images = 0

    @property
    def ok(self):
        return not self.errors

    def error(self, msg):
        if len(self.errors) < 50:
            self.errors.append(msg)


def content_classes(pages_bodies):
    """frame id -> representative of its equal-content class (``same``, and the SHA-256
    hashes of older streams; crcs are not merged on)."""
    cls = {}
    by_hash = {}
    for body in pages_bodies:
        same = unpack_u32(body["same"])
        hashes = body.get("hashes")
        for i in range(body["count"]):
            f = body["first"] + i
            c = cls.get(same[i], same[i]) if same[i] else f
            if hashes is not None:
                c = by_hash.setdefault(bytes(hashes[16 * i:16 * i + 16]), c)
            cls[f] = c
    return cls


def simulate(header, processes, pages_bodies):
    res = Result()
    cls = content_classes(pages_bodies)
    content = []  # physical page -> frame whose bytes it holds
    starts = {}  # pid -> mapped {rid: [phys | None]} when forked
    info = {}  # rid -> range record
    frame_phys = {}
    used = set()
    root = header["root_pid"]
    for proc in processes:
        pid = proc["pid"]
        if pid == root and proc["ppid"] == 0:
            mapped = {}
        elif pid in starts:
            mapped = starts.pop(pid)
        else:
            res.error(f"process {pid}: never forked by its parent {proc['ppid']}")
            continue
        for r in proc["ranges"]:
            info[r["id"]] = r
            mapped[r["id"]] = [None] * (r["size"] // PAGE)
        for n, st in enumerate(proc["steps"]):
            where = f"process {pid} step {n}"
            op = st["op"]
            if op == "write":
                pages = mapped.get(st["range"])
                if pages is None:
                    res.error(f"{where}: write to range {st['range']}, not mapped")
                    continue
                pairs = unpack_u32(st["pages"])
                for k in range(0, len(pairs), 2):
                    page, frame = pairs[k], pairs[k + 1]
                    if page >= len(pages) or frame not in cls:
                        res.error(f"{where}: page {page} / frame {frame} out of range")
                        continue
                    pages[page] = len(content)
                    content.append(frame)
            elif op == "fork":
                starts[st["pid"]] = {rid: list(pages) for rid, pages in mapped.items()}
            elif op == "drop":
                if mapped.pop(st["range"], None) is None:
                    res.error(f"{where}: drop of range {st['range']}, not mapped")
        _take_layout(res, pid, proc["layout"], mapped, info, cls, content, frame_phys, used)
    if starts:
        res.error(f"forked but without a process record: {sorted(starts)}")
    res.writes = len(content)
    res.physical_used = len(used)
    res.frames_in_images = len(frame_phys)
    res.lost_sharing = sum(len(s) - 1 for s in frame_phys.values())
    stats = header["stats"]
    if res.writes != res.physical_used:
        res.error(f"{res.writes - res.physical_used} written pages are used by no VMA")
    for name, value in (("frames_planned", res.physical_used), ("frames_duplicated", res.lost_sharing),
                        ("frames_in_images", res.frames_in_images)):
        if stats.get(name) != value:
            res.error(f"stats: {name} is {stats.get(name)}, the simulation gives {value}")
    if res.physical_used > res.frames_in_images + res.lost_sharing:
        res.error("more physical pages than frames in the images plus duplicates")
    return res


def _take_layout(res, pid, layout, mapped, info, cls, content, frame_phys, used):
    for v in layout:
        where = f"process {pid}: vma [{v['start']:#x}-{v['end']:#x})"
        npages = (v["end"] - v["start"]) // PAGE
        ids = unpack_u32(v["frames"]) if v["frames"] is not None else None
        plannable = not v["shared"] and v["kind"] in PLANNABLE_KINDS
        pieces = v["pieces"]
        if not pieces:
            if plannable and ids is not None and any(ids):
                res.error(f"{where}: has frames but no pieces")
            continue
        if not plannable:
            res.error(f"{where}: a {v['kind']} VMA has pieces")
            continue
        cursor = 0
        for rid, rpage, count, vpage in pieces:
            if vpage != cursor:
                res.error(f"{where}: pieces leave a gap or overlap at page {cursor}")
                break
            pages = mapped.get(rid)
            if pages is None or rpage + count > len(pages):
                res.error(f"{where}: piece from range {rid} not mapped or too short")
                break
            rng = info[rid]
            for k in range(count):
                i, phys = vpage + k, pages[rpage + k]
                f = ids[i] if ids is not None and i < len(ids) else 0
                if f:
                    if phys is None:
                        res.error(f"{where} page {i}: frame {f} missing (untouched staging page)")
                    elif cls.get(content[phys]) != cls.get(f):
                        res.error(f"{where} page {i}: holds frame {content[phys]}, expected {f}")
                    else:
                        frame_phys.setdefault(f, set()).add(phys)
                        used.add(phys)
                else:
                    if phys is not None:
                        res.error(f"{where} page {i}: should be untouched, holds frame {content[phys]}")
                    elif v["kind"] == "file" and v["path"] is not None:
                        if rng["backing"] != "file" or rng.get("path") != v["path"] or \
                                rng.get("pgoff", 0) + (rpage + k) * PAGE != v["pgoff"] + i * PAGE:
                            res.error(f"{where} page {i}: file page read from the wrong backing/offset")
                    elif rng["backing"] != "anon":
                        res.error(f"{where} page {i}: anonymous page read from a file range")
            cursor += count
        if cursor != npages:
            res.error(f"{where}: pieces cover {cursor} of {npages} pages")
