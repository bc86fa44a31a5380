"""cow-mem: a live process tree's memory as the kernel sees it.

    cow-mem PID [--json]

Distinct frames = distinct PFNs behind the present anonymous private pages of
every process below PID (pagemap; the zero page and file pages excluded): what
the tree really occupies, each page shared copy-on-write counted once.  Shared
memory (MAP_SHARED anonymous, memfd, tmpfs files) is counted per object: the pages
it holds, once however many processes map it; all frames = private + shared.  Anon
pages = the same pages counted per process.  Pss_Anon from smaps_rollup.

Exit codes: 0 success, 1 failure (no such process, no permission).
"""

import argparse
import json
import sys

from stages.linux.memstat import tree_frames
from stages.stream import silence_broken_pipe
from stages.tools.show import CONTROL_ESCAPES


def shown_name(comm):
    """A process name as text to print: bytes that are not UTF-8 as \\xNN (JSON readers reject
    the lone surrogates they were read as), control characters escaped (it is a terminal)."""
    text = comm.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.translate(CONTROL_ESCAPES)


def render_table(m, out):
    out.write(f"{'pid':>8} {'ppid':>8} {'anon pages':>11} {'Pss_Anon kB':>12}  comm\n")
    for p in m["processes"]:
        out.write(f"{p['pid']:>8} {p['ppid']:>8} {p['anon_pages']:>11} {p['pss_anon_kb']:>12}  {p['comm']}\n")
    out.write(
        f"{len(m['processes'])} processes: {m['distinct_frames']} distinct frames "
        f"({m['distinct_frames'] * 4096 / (1 << 20):.1f} MiB), {m['anon_pages']} anon pages, "
        f"Pss_Anon {m['pss_anon_kb']} kB\n"
    )
    if m.get("shared_objects"):
        out.write(f"shared memory: {m['shared_objects']} objects holding {m['shared_frames']} frames; "
                  f"{m['all_frames']} frames in all\n")


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="cow-mem",
        description="A live process tree's memory as the kernel sees it: distinct frames (PFNs) "
        "behind the present anonymous private pages of every process below PID, each page shared "
        "copy-on-write counted once; anon pages per process; summed Pss_Anon; shared memory objects "
        "(MAP_SHARED anonymous, memfd, tmpfs) counted by the pages each holds, once per object.",
        epilog="exit codes: 0 done, 1 failure (no such process, no permission).",
    )
    ap.add_argument("pid", type=int, help="root of the tree")
    ap.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    args = ap.parse_args(argv)
    try:
        m = tree_frames(args.pid)
    except OSError as exc:
        # memstat's own errors name the process already; the kernel's say only what failed
        print(f"cow-mem: process {args.pid}: {exc.strerror}" if exc.strerror else f"cow-mem: {exc}", file=sys.stderr)
        return 1
    for p in m["processes"]:
        p["comm"] = shown_name(p["comm"])
    try:
        if args.json:
            json.dump(m, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            render_table(m, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # a reader such as head has seen enough: not an error
        silence_broken_pipe(sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
