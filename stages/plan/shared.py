"""Shared memory objects in the plan: checked, counted and passed through unchanged.

MAP_SHARED anonymous memory and memfds are not frames: every process that maps one
object maps the same object, so there is nothing to plan between processes.  apply
creates each object once, fills it with the pages of its ``shmem`` records, and every
VMA with ``shmem`` = id maps it at its ``pgoff`` (the plan gives such a VMA no pieces).
This module checks the records against each other and against the VMAs and fds that
refer to them, and keeps their bytes in a spool for the plan stream.
"""

from stages.stream import unpack_u32

from .records import RecordSpool

PAGE = 4096


class SharedError(ValueError):
    pass


class SharedObjects:
    def __init__(self):
        self.objects = {}  # id -> {"kind", "size", "npages", "name", "pages": count}
        self.last_page = {}  # id -> the last page index seen (records ascend)
        self.spool = RecordSpool()

    def __len__(self):
        return len(self.objects)

    @property
    def pages(self):
        return sum(o["pages"] for o in self.objects.values())

    def add(self, rec):
        """One shmem record of the images (checked, then spooled)."""
        body, where = rec.body, f"shmem record {rec.seq}"
        oid = body["id"]
        desc = {"kind": body["kind"], "size": body["size"], "npages": body["npages"], "name": body.get("name")}
        if body["npages"] != (body["size"] + PAGE - 1) // PAGE:
            raise SharedError(f"{where}: object {oid} has {body['npages']} pages for {body['size']} bytes")
        if oid in self.objects:
            have = {k: self.objects[oid][k] for k in desc}
            if have != desc:
                raise SharedError(f"{where}: object {oid} is described differently than before")
        elif oid != len(self.objects) + 1:
            raise SharedError(f"{where}: object {oid} out of order (expected {len(self.objects) + 1})")
        else:
            self.objects[oid] = dict(desc, pages=0)
        pages = unpack_u32(body["pages"], f"{where} pages")
        last = self.last_page.get(oid, -1)
        for p in pages:
            if p <= last or p >= body["npages"]:
                raise SharedError(f"{where}: object {oid}: page {p} out of order or beyond its {body['npages']} pages")
            last = p
        self.last_page[oid] = last
        if len(rec.data) != len(pages) * PAGE:
            raise SharedError(f"{where}: {len(rec.data)} data bytes for {len(pages)} pages")
        self.objects[oid]["pages"] += len(pages)
        self.spool.add(rec)

    def check_references(self, vmas_by_pid, processes):
        """Every VMA and fd naming an object names one that exists; a VMA that maps an object
        is MAP_SHARED and lies within it."""
        for pid, vmas in vmas_by_pid.items():
            for v in vmas:
                oid = v.body.get("shmem")
                if oid is None:
                    continue
                where = f"process {pid}: vma {v.index} [{v.start:#x}-{v.end:#x})"
                obj = self.objects.get(oid)
                if obj is None:
                    raise SharedError(f"{where}: shared memory object {oid} is not in the images")
                if not v.body["shared"] or v.ids is not None and any(v.ids):
                    raise SharedError(f"{where}: maps shared memory object {oid} but is private or has frames")
                if v.body["pgoff"] % PAGE:
                    raise SharedError(f"{where}: offset {v.body['pgoff']} into object {oid} is not page aligned")
        for proc in processes:
            for fd in proc["fds"]:
                oid = fd.get("shmem")
                if oid is not None and oid not in self.objects:
                    raise SharedError(f"process {proc['pid']}: fd {fd['fd']}: shared memory object {oid} "
                                      "is not in the images")

    def records(self):
        """(meta, data) of every spooled shmem record, in stream order."""
        return self.spool.records()

    def stats(self):
        """Plan header statistics (only when the images have shared memory)."""
        if not self.objects:
            return {}
        return {"shmem_objects": len(self.objects), "shmem_pages": self.pages}

    def close(self):
        self.spool.close()
