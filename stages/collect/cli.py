"""cow-collect: dump a live process tree as an image stream (format cowtree-images).

    cow-collect --tree PID [-o FILE] [--kill | --leave-stopped] [--progress]

Exit codes:
  0   the stream was written completely
  1   failure (no such process, permission, I/O error such as a closed pipe, ...)
  2   refused: the tree holds something cowtree cannot restore yet (each reason is printed)
  64  bad command line
On every non-zero exit the tree is resumed and -o FILE is left as it was: the image is
written under no name and takes FILE's name only once complete.
"""

import argparse
import signal
import sys

from stages.linux import termination
from stages.linux.freeze import FreezeError
from stages.linux.termination import Terminated
from stages.stream import OutputFile, StreamError, is_broken_pipe, os_error_text

from .collector import KILL, LEAVE_STOPPED, RESUME, CollectError, OutputError, run_collect
from .refusals import Refused

EXIT_OK, EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2, 64


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def main(argv=None):
    ap = Parser(
        prog="cow-collect",
        description="Freeze the process tree rooted at PID, write its image stream, then resume it "
        "(or kill it, or leave it stopped). While frozen, each process runs a little code of "
        "cow-collect's (with every signal blocked) that reads its state and hands its pages over "
        "through pipes; it is taken out again before the tree goes on (docs/SECURITY.md).",
        epilog="exit codes: 0 done, 1 failure, 2 refused (not supported yet), 64 bad usage. "
        "On failure the tree is resumed and FILE left as it was (the image takes FILE's name only "
        "once complete).",
    )
    ap.add_argument("--tree", type=int, required=True, metavar="PID", help="root of the tree to dump")
    ap.add_argument("-o", "--output", default="-", metavar="FILE",
                    help="image file (0600; replaced only once the image is complete); default stdout")
    after = ap.add_mutually_exclusive_group()
    after.add_argument("--kill", action="store_true", help="SIGKILL the tree once the stream is complete")
    after.add_argument("--leave-stopped", action="store_true", help="leave the tree stopped (SIGSTOP) when done")
    ap.add_argument("--progress", action="store_true", help="pages, bytes and rate on stderr")
    args = ap.parse_args(argv)
    if args.tree <= 0:
        ap.error(f"bad pid {args.tree}")
    if args.output in (None, "-") and sys.stdout.isatty():
        ap.error("refusing to write an image to a terminal: use -o FILE or a pipe")

    mode = KILL if args.kill else LEAVE_STOPPED if args.leave_stopped else RESUME
    termination.catch()  # a signal resumes the tree on the way out (Ctrl-C too)
    notes = []
    code = EXIT_OK
    try:
        output = OutputFile(args.output)
    except OSError as exc:
        print(f"cow-collect: cannot create {args.output}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        summary = run_collect(args.tree, output, mode, sys.stderr if args.progress else None, notes)
        if args.progress:
            print(
                f"cow-collect: {summary['processes']} processes, {summary['frames']} frames, "
                f"{summary['stored_pages']} pages stored, {summary['stream_bytes']} bytes",
                file=sys.stderr,
            )
    except Refused as exc:
        for line in exc.lines():
            print(f"cow-collect: {line}", file=sys.stderr)
        code = EXIT_REFUSED
    except OutputError as exc:
        kept = f"; {output.path} was left as it was" if output.path else ""
        print(f"cow-collect: {exc}; the tree was resumed{kept}", file=sys.stderr)
        code = EXIT_FAILURE
    except (FreezeError, CollectError, StreamError) as exc:
        print(f"cow-collect: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except Terminated as exc:
        print(f"cow-collect: {exc}; the tree was resumed", file=sys.stderr)
        code = EXIT_FAILURE
    except OSError as exc:
        if is_broken_pipe(exc):
            print("cow-collect: output closed (broken pipe); the tree was resumed", file=sys.stderr)
        else:
            print(f"cow-collect: {os_error_text(exc)}", file=sys.stderr)
        code = EXIT_FAILURE
    termination.dispose(signal.SIG_IGN)  # all is done (nothing to undo); only messages are left
    for note in notes:
        print(f"cow-collect: {note}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
