"""Record schemas of the plan stream (cow-plan -> cow-apply).

Order: header, one ``process`` per process in creation order (a parent before
its children), the ``pages`` runs of the images passed through unchanged,
trailer.  docs/FORMAT.md describes every field; the meaning of steps is checked
by stages.plan.validate.
"""

from . import images
from .schema import Bin, Int, ListOf, Map, MapOf, Nullable, Str, Tuple, UInt

FORMAT = "cowtree-plan"
# 1: first format.  2: record crc over data first, SHA-256/128 frame hashes, the plan carries version 2 images' fields.
# Any change of the bytes a reader must understand bumps it (docs/FORMAT.md, Versions).
VERSION = 2

STRATEGIES = {"exact", "address", "none"}

HEADER = Map(
    {
        **images.header_fields(FORMAT),
        "strategy": Str(choices=STRATEGIES),
        # every staging range lies in [base, base + size); base_hint is the
        # plan's preferred base, disjoint from every target VMA
        "window": Map({"base_hint": UInt(), "size": UInt()}),
        "stats": MapOf(Str(max_len=64), Int()),
    },
    {"tool": Str(), "images": Map({}, {"kernel": Str(), "created": Str()})},
)

RANGE = Map(
    {
        "id": Int(1, (1 << 32) - 1),
        "offset": UInt(),  # bytes from the window base, page aligned
        "size": Int(4096),
        "backing": Str(choices={"anon", "file"}),
    },
    # a file range is a private mapping of path at pgoff (bytes)
    {"path": Nullable(Str()), "pgoff": UInt(), "dev": Nullable(Str()), "ino": UInt()},
)

STEP = Map(
    {"op": Str(choices={"write", "fork", "drop"})},
    {
        "range": Int(1, (1 << 32) - 1),
        # write: packed uint32 pairs (page index in range, frame id)
        "pages": Bin(multiple=8),
        "pid": images.PID,  # fork: the child to create
    },
)

# pieces: [range id, first page in range, page count, first page in the VMA]
PIECE = Tuple(Int(1, (1 << 32) - 1), UInt(), Int(1), UInt())

LAYOUT_VMA = Map(
    dict(images.VMA.required, pieces=ListOf(PIECE)),
    dict(images.VMA.optional),
)

PROCESS = Map(
    {
        "pid": images.PID,
        "ppid": Int(0, 1 << 22),  # parent in the restored tree (0: created by cow-apply)
        "image": images.PROCESS,  # the process record of the images, unchanged
        "ranges": ListOf(RANGE),  # staging ranges this process maps when it starts
        "steps": ListOf(STEP),
        "layout": ListOf(LAYOUT_VMA),
    },
    {"stats": MapOf(Str(max_len=64), Int())},
)

# the images' shmem records, unchanged, after the pages
BODIES = {"header": HEADER, "process": PROCESS, "pages": images.PAGES, "shmem": images.SHMEM}
PHASES = {"header": 0, "process": 1, "pages": 2, "shmem": 3}
DATA_KINDS = {"pages", "shmem"}
