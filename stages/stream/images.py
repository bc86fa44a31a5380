"""Record schemas of the image stream (cow-collect -> cow-plan).

Order: header, one ``process`` per process (parents before children), one
``vmas`` per process (same order), ``pages`` runs covering frame ids 1..N in
ascending order, trailer.  docs/FORMAT.md describes every field.
"""

from .schema import Any, Bin, Bool, Int, ListOf, Map, Nullable, Str, Tuple, UInt

FORMAT = "cowtree-images"
# 1: first format.  2: record crc over data first, per-page crcs instead of hashes (equality
# in `same`, proven by collect), optional thread, state, fd and shmem fields.
# Any change of the bytes a reader must understand bumps it (docs/FORMAT.md, Versions).
VERSION = 2

VMA_KINDS = {"anon", "file", "heap", "stack", "vdso", "vvar", "vvar_vclock", "vsyscall", "special"}

PID = Int(1, (1 << 22))
ADDR = UInt()

VDSO = Map(
    {
        # [[name, start, end], ...] of [vvar], [vvar_vclock], [vdso] as mapped in the root
        "layout": ListOf(Tuple(Str(), ADDR, ADDR), max_len=8),
        "sha256": Str(max_len=64),
    },
    {"symbols": ListOf(Tuple(Str(), ADDR), max_len=256)},
)


def header_fields(fmt):
    """The header fields every cowtree stream has (the plan adds its own)."""
    return {
        "format": Str(choices={fmt}),
        "version": Int(1),
        "kernel": Str(),
        "arch": Str(),
        "page_size": Int(4096, 4096),
        "root_pid": PID,
        "vdso": VDSO,
    }


HEADER = Map(header_fields(FORMAT), {"tool": Str(), "created": Str()})

# sched_getscheduler (policy, SCHED_RESET_ON_FORK included) and sched_priority; CPUs allowed
SCHED = Tuple(UInt(), Int(0, 99))
AFFINITY = ListOf(Int(0, 1 << 16), max_len=1 << 16)

THREAD = Map(
    {
        "tid": PID,
        "regs": Bin(max_len=4096),  # struct user_regs_struct (NT_PRSTATUS)
        "xstate": Bin(max_len=1 << 16),  # NT_X86_XSTATE
        "sigmask": UInt(),
    },
    {
        "fpregs": Bin(max_len=4096),
        "extra": Map({}, {}),
        # the rseq registration (PTRACE_GET_RSEQ_CONFIGURATION); absent when none
        "rseq": Map({"addr": ADDR, "len": UInt(), "sig": UInt()}),
        # set_robust_list (head, len) and set_tid_address (clear_child_tid) values
        "robust_list": Tuple(ADDR, UInt()),
        "tid_address": ADDR,
        "sigaltstack": Tuple(ADDR, UInt(), UInt()),  # ss_sp, ss_flags, ss_size
        "pending": ListOf(Bin(max_len=128), max_len=1 << 16),  # the thread's own queue: raw siginfo
        # the thread's own name and nice value (/proc/PID/task/TID/comm and stat)
        "comm": Str(max_len=64),
        "nice": Int(-20, 19),
        # a thread other than the main one: its own scheduler policy and CPU affinity (the
        # main thread's are the process's, in its state)
        "sched": SCHED,
        "affinity": AFFINITY,
    },
)

SIGACTION = Tuple(UInt(), UInt(), UInt(), UInt())  # handler, flags, restorer, mask

FD = Map(
    {"fd": Int(0, 1 << 20), "kind": Str(), "path": Nullable(Str()), "flags": UInt()},
    {"pos": UInt(), "mode": UInt(), "dev": Nullable(Str()), "ino": UInt(), "size": UInt(), "cloexec": Bool(),
     # kind "pipe" (and "fifo"): the pipe's id in these images, and the id of the open file description
     # (fds of any process with the same desc share one, and with it O_NONBLOCK)
     "pipe": Int(1, (1 << 32) - 1), "desc": Int(1, (1 << 32) - 1),
     # a memfd or a deleted tmpfs file: the id of its shared memory object (a ``shmem`` record)
     "shmem": Int(1, (1 << 32) - 1),
     # file locks held through this fd (fdinfo "lock:"): [kind, type, start, end (nil = EOF)]
     "locks": ListOf(Tuple(Str(choices=("flock", "posix", "ofdlck")), Str(choices=("read", "write")),
                           UInt(), Nullable(UInt())), max_len=1 << 16)},
)

# A pipe of the tree, in the first process (stream order) holding it: capacity (F_GETPIPE_SZ)
# and the bytes written to it and not read yet at the dump.
# A FIFO (named pipe) has the path it was opened by (its fds are of kind "fifo").
PIPE = Map({"id": Int(1, (1 << 32) - 1), "size": Int(4096, 1 << 31), "data": Bin(max_len=1 << 31)},
           {"path": Str()})

# Per-process state beyond memory (all optional: older images have none of it).
STATE = Map(
    {},
    {
        "uids": Tuple(UInt(), UInt(), UInt(), UInt()),  # real, effective, saved, fs
        "gids": Tuple(UInt(), UInt(), UInt(), UInt()),
        "groups": ListOf(UInt(), max_len=65536),  # supplementary
        "rlimits": ListOf(Tuple(UInt(), UInt()), max_len=64),  # [soft, hard] by RLIMIT_* number
        "nice": Int(-20, 19),
        "personality": UInt(),
        "no_new_privs": Bool(),
        "subreaper": Bool(),  # PR_SET_CHILD_SUBREAPER
        "pdeathsig": Int(0, 64),  # PR_SET_PDEATHSIG
        "dumpable": Int(0, 2),  # PR_GET_DUMPABLE
        # capability sets as /proc/PID/status shows them (bit N = capability N)
        "caps": Map({}, {name: UInt() for name in ("effective", "permitted", "inheritable", "bounding", "ambient")}),
        "securebits": Int(0, 0xFF),  # PR_GET_SECUREBITS
        "oom_score_adj": Int(-1000, 1000),
        "stopped": Bool(),  # group-stopped (state T) when frozen
        "sched": SCHED,
        "affinity": AFFINITY,  # CPUs the process may run on
        # ITIMER_REAL, _VIRTUAL, _PROF: [interval sec, interval usec, value sec, value usec]
        "itimers": ListOf(Tuple(Int(), Int(), Int(), Int()), max_len=3),
        "pending": ListOf(Bin(max_len=128), max_len=1 << 16),  # shared queue: raw siginfo, queue order
        # timer_create timers: id, clock, sigevent (signo, sival, notify: SIGEV_SIGNAL 0, _NONE 1,
        # _THREAD_ID 4 = the process's own thread) and timer_gettime [interval s, ns, value s, ns]
        "posix_timers": ListOf(Map({"id": Int(0, (1 << 31) - 1), "clock": Int(0, 15), "signo": Int(0, 64),
                                    "sival": UInt(), "notify": Int(0, 4),
                                    "value": Tuple(Int(), Int(), Int(), Int())}), max_len=1 << 16),
    },
)

MM = Map(
    {
        name: ADDR
        for name in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
            "start_stack", "arg_start", "arg_end", "env_start", "env_end",
        )
    },
    {"exe_file": Nullable(Str())},
)

PROCESS = Map(
    {
        "pid": PID,
        "ppid": Int(0, 1 << 22),
        "pgid": Int(0, 1 << 22),
        "sid": Int(0, 1 << 22),
        "comm": Str(max_len=64),
        "exe": Nullable(Str()),
        "threads": ListOf(THREAD, max_len=1 << 15),
        "mm": MM,
        "auxv": Bin(multiple=16, max_len=1 << 16),
        "sigactions": ListOf(SIGACTION, max_len=64),
        "fds": ListOf(FD, max_len=1 << 20),
    },
    {
        "cwd": Str(),
        "root": Str(),
        "umask": UInt(),
        "pipes": ListOf(PIPE, max_len=1 << 20),
        "state": STATE,
        "extra": Any(),
    },
)

VMA = Map(
    {
        "start": ADDR,
        "end": ADDR,
        "prot": Int(0, 7),
        "shared": Bool(),
        "pgoff": UInt(),  # byte offset into the file (0 for anonymous)
        "kind": Str(choices=VMA_KINDS),
        "path": Nullable(Str()),
        "vmflags": ListOf(Str(max_len=4), max_len=64),
        # one uint32 frame id per page, 0 = nothing to restore; nil when no page is a frame
        "frames": Nullable(Bin(multiple=4)),
    },
    # file VMAs: the file's identity at dump time (size and mtime in ns), checked by apply
    {"dev": Nullable(Str()), "ino": UInt(), "size": UInt(), "mtime": UInt(),
     # MAP_SHARED anonymous, memfd or deleted tmpfs file mapping: the id of its object (pgoff is
     # then the offset into that object)
     "shmem": Int(1, (1 << 32) - 1)},
)

VMAS = Map({"pid": PID, "vmas": ListOf(VMA, max_len=1 << 20)})

# A run of frames first..first+count-1.  same[i] (uint32): 0 = this frame's bytes
# are the next page of ``data``; otherwise an earlier frame id with equal bytes.
# crcs (uint32): the CRC-32 (zlib) of every frame's bytes.  Older streams have hashes instead:
# the first 16 bytes of the SHA-256 of every frame's bytes.
PAGES = Map({"first": Int(1, (1 << 32) - 1), "count": Int(1, 1 << 16), "same": Bin(multiple=4)},
            {"crcs": Bin(multiple=4), "hashes": Bin(multiple=16)})

# A shared memory object (MAP_SHARED anonymous memory, a memfd, or a tmpfs file deleted while
# mapped or open), once for the whole tree: kind "anon", "memfd" (name = the memfd's name) or
# "tmpfile" (name = its path before deletion), size in bytes (npages pages), and some of
# the pages it holds: ``pages`` = packed uint32 page indexes (ascending), their bytes in
# ``data`` in that order.  An object may take several records (same id, kind, size); pages
# not in any record are holes (zero, not allocated).  A memfd's ``seals`` (F_GET_SEALS):
# 1 = F_SEAL_SEAL (made without MFD_ALLOW_SEALING), 0 = sealing allowed, none set.
SHMEM = Map(
    {"id": Int(1, (1 << 32) - 1), "kind": Str(choices={"anon", "memfd", "tmpfile"}), "size": UInt(),
     "npages": UInt(), "pages": Bin(multiple=4)},
    {"name": Str(max_len=4096), "seals": Int(0, 1)},
)

BODIES = {"header": HEADER, "process": PROCESS, "vmas": VMAS, "pages": PAGES, "shmem": SHMEM}
# Records appear in non-decreasing phase order.
PHASES = {"header": 0, "process": 1, "vmas": 2, "pages": 3, "shmem": 4}
DATA_KINDS = {"pages", "shmem"}
