"""cow-apply: bring a planned process tree back to life.

    cow-apply [-i FILE] [--pidns] [--wait] [--report FILE]

Reads a plan (pipe or saved file) to its end and checks it before any process
exists; then creates the tree with the original pids, fills its memory and
hands each process to the native restorer.  Default: print the root pid and
exit, the tree keeps running.  --wait: stay as the reaper and exit with the
root's status.  Exit 1 (with `cow-apply: <reason>`) on any failure; a tree
that failed half-way is killed.
"""

import argparse
import os
import resource
import signal
import sys
import time

from stages.linux import procfs, termination
from stages.linux.termination import Terminated
from stages.stream import OutputFile, StreamError, open_input, os_error_text

from .check import Refusal, check_plan
from .restore import ApplyError, Restore
from .spool import spool_plan

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 64


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class Progress:
    """Pages written into staging, on stderr, at most five times a second."""

    def __init__(self, total_pages):
        self.total = total_pages
        self.start = self.last = time.monotonic()

    def __call__(self, pages, final=False):
        now = time.monotonic()
        if not final and now - self.last < 0.2:
            return
        self.last = now
        mib = pages * 4096 / (1 << 20)
        rate = mib / max(now - self.start, 1e-6)
        of = f"/{self.total}" if self.total else ""
        print(f"cow-apply: {pages}{of} pages, {mib:.1f} MiB, {rate:.0f} MiB/s", file=sys.stderr, flush=True)

    def done(self, pages):
        self(pages, final=True)


def fail(reason):
    print(f"cow-apply: {reason}", file=sys.stderr)
    return EXIT_FAILURE


def kill_leftovers(timeout=5.0):
    """After a failed restore, SIGKILL and reap every child cow-apply still has.

    cow-apply creates no process but the tree's, and it is the tree's child subreaper, so
    any child left is part of the partial tree: e.g. an agent forked just before a SIGTERM,
    whose pid Restore had not recorded yet (its parent was killed, it came to us).  It would
    otherwise block on its command pipe forever.  Returns how many were killed.
    """
    killed = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = procfs.children("self")
        if not kids:
            break
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
            try:
                os.waitpid(pid, 0x40000000)  # __WALL
            except ChildProcessError:
                pass
    return killed


def main(argv=None):
    ap = Parser(
        prog="cow-apply",
        description="Restore the process tree described by a plan (cow-plan's output) with its "
        "original pids and thread ids, memory, sharing and state. The whole plan is read and checked before any "
        "process is created. Prints the restored root's pid and leaves the tree running.",
        epilog="exit codes: 0 restored (with --wait: the root's exit status), 1 refused or failed "
        "(a partly created tree is killed), 64 bad usage.",
    )
    ap.add_argument("-i", "--input", default="-", metavar="FILE", help="plan file; default stdin.  A regular file is checked whole, then its pages are "
                    "used in place (no copy): do not change it while cow-apply runs")
    ap.add_argument("--pidns", action="store_true", help="restore into a fresh pid namespace (same pid numbers inside)")
    ap.add_argument("--wait", action="store_true", help="stay until the root exits; exit with its status")
    ap.add_argument("--report", metavar="FILE", help="write a JSON report (pids, thread ids, times, bytes) to FILE "
                    "once the tree runs, before its pid is printed; FILE is opened first, so a path that cannot be "
                    "written is refused before any process exists (a later write error only warns: the tree runs on)")
    ap.add_argument("--progress", action="store_true",
                    help="pages, bytes and rate on stderr while memory is written (default when stderr is a terminal)")
    args = ap.parse_args(argv)
    if args.input in (None, "-") and sys.stdin.isatty():
        ap.error("refusing to read a plan from a terminal: use -i FILE or a pipe")
    termination.catch()  # a signal kills a half-made tree on the way out (Ctrl-C too)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two pipes per process

    t0 = time.monotonic()
    try:
        report_out = OutputFile(args.report) if args.report else None
    except OSError as exc:
        return fail(f"cannot write the report: {os_error_text(exc)}: nothing was created")
    try:
        with open_input(args.input) as f:
            plan = spool_plan(f)
    except (StreamError, OSError, Terminated) as exc:
        if report_out:
            report_out.abandon()
        if isinstance(exc, StreamError):
            return fail(f"bad plan stream: {exc}")
        if isinstance(exc, OSError):
            return fail(f"cannot read the plan: {os_error_text(exc)}")
        return fail(f"{exc} while reading the plan: nothing was created")
    t_read = time.monotonic() - t0
    restored = False
    try:
        t1 = time.monotonic()
        try:
            check_plan(plan, pidns=args.pidns)
        except Refusal as exc:
            return fail(str(exc))
        except Terminated as exc:
            return fail(f"{exc} while checking the plan: nothing was created")
        t_check = time.monotonic() - t1
        progress = None
        if args.progress or sys.stderr.isatty():
            progress = Progress(plan.header["stats"].get("bytes_to_write", 0) // 4096)
        restore = Restore(plan, pidns=args.pidns, log=lambda m: print(f"cow-apply: {m}", file=sys.stderr),
                          progress=progress)
        try:
            restore.run()
        except (ApplyError, OSError, MemoryError, Terminated) as exc:
            termination.dispose(signal.SIG_IGN)  # the killing below is not to be cut short
            stray = kill_leftovers()
            if stray:
                print(f"cow-apply: killed {stray} process(es) of the partial tree that the restore "
                      "had not recorded", file=sys.stderr)
            return fail(f"restore failed, every created process was killed: {exc}")
        restored = True
        termination.dispose(signal.SIG_DFL)  # the tree is complete: nothing to undo now
        if progress:
            progress.done(restore.pages_written)
        if report_out:
            write_report(report_out, restore, t0, t_read, t_check)
        print(restore.root_outer_pid, flush=True)
        if args.wait:
            return restore.wait_root()
        return EXIT_OK
    finally:
        if report_out and not restored:
            report_out.abandon()
        plan.close()


def write_report(out, restore, t0, t_read, t_check):
    """The --report JSON, into out (an OutputFile); a failure only warns: the tree runs."""
    import json  # here: only --report needs it (its import is ~2 ms of every start)

    report = restore.report()
    report["phases"] = dict(read=round(t_read, 6), check=round(t_check, 6), **report["phases"])
    report["wall"] = round(time.monotonic() - t0, 6)
    try:
        out.file.write((json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
        out.commit()
    except OSError as exc:
        out.abandon()
        print(f"cow-apply: warning: the tree runs, but the report could not be written: {os_error_text(exc)}",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
