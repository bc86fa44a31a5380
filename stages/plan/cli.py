"""cow-plan: read an image stream, write a plan stream.

    cow-plan [-i FILE] [-o FILE] [--strategy exact|address|none] [--check] [--stats FILE] [--explain]

Exit codes: 0 done, 1 bad input or an image the plan cannot handle, 3 --check failed.
"""

import argparse
import sys

from stages.stream import (OutputFile, StreamError, StreamWriter, is_broken_pipe, open_input, os_error_text,
                           silence_broken_pipe)

from .exact import plan_exact
from .explain import explain
from .layout import build
from .model import PlanError, read_images
from .simple import plan_address, plan_none
from .simulate import simulate
from .validate import PlanInvalid, validate_plan

STRATEGIES = {"exact": plan_exact, "address": plan_address, "none": plan_none}


def make_plan(images, strategy="exact"):
    """(plan header, process records) for images read with model.read_images."""
    draft = STRATEGIES[strategy](images)
    header, records = build(draft, strategy)
    header["stats"].update(images.shared.stats())
    validate_plan(header, records, range(1, images.nframes + 1))
    return header, records


def pages_bodies(images):
    """What the simulator needs of the pages records: ids and ``same`` (and older streams' hashes)."""
    return images.pages_bodies


def write_plan(out, images, header, records):
    writer = StreamWriter(out, "cowtree-plan", header)
    for rec in records:
        writer.write("process", rec)
    for meta, data in images.pages_records():
        writer.write_encoded("pages", meta, data)
    for meta, data in images.shared.records():
        writer.write_encoded("shmem", meta, data)
    writer.close({"processes": len(records), "frames_planned": header["stats"]["frames_planned"]})


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="cow-plan",
        description="Plan the restore of an image stream (cow-collect's output): which process creates "
        "each page, the order of writes and forks, and where every VMA moves from. Pure and "
        "deterministic: the same images give the same plan, byte for byte.",
        epilog="exit codes: 0 plan written, 1 bad or unsupported images, or an output that cannot be "
        "written (no plan file is left), 3 --check found the plan wrong, 130 interrupted, 2 bad usage.",
    )
    ap.add_argument("-i", "--input", help="image stream (default stdin)")
    ap.add_argument("-o", "--output", help="plan stream (default stdout); a file is replaced only once the plan "
                    "is complete, so -o may name the input")
    ap.add_argument(
        "--strategy", choices=sorted(STRATEGIES), default="exact",
        help="exact (default): every page the tree shared stays shared, wherever it moved; "
        "address: share only VMAs at the same start and end as the parent (the reference tool's "
        "behaviour); none: every process writes all its pages (no sharing)",
    )
    ap.add_argument("--check", action="store_true", help="simulate the plan; exit 3 if it is wrong")
    ap.add_argument("--stats", metavar="FILE", help="write the plan statistics as JSON (in place before the plan is)")
    ap.add_argument("--explain", action="store_true",
                    help="per-process table (stderr, or stdout with -o)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    images = stats_out = None
    committed = False
    try:
        # opened first: a --stats path that cannot be written is refused before any work
        stats_out = OutputFile(args.stats) if args.stats else None
        with open_input(args.input) as f:
            images = read_images(f)
        header, records = make_plan(images, args.strategy)
        if args.check:
            res = simulate(header, records, pages_bodies(images))
            if not res.ok:
                print("cow-plan: --check: the plan does not reproduce the images:", file=sys.stderr)
                for e in res.errors:
                    print(f"  {e}", file=sys.stderr)
                return 3
        out = OutputFile(args.output)
        try:
            write_plan(out.file, images, header, records)
            if stats_out:
                import json  # here: only --stats needs it (its import is ~2 ms of every start)

                stats_out.file.write((json.dumps(header["stats"], indent=1, sort_keys=True) + "\n").encode())
                stats_out.commit()  # before the plan's: exit 1 must mean no plan was left
        except BaseException:
            out.abandon()
            raise
        out.commit()
        committed = True
        if args.explain:
            _explain(header, records, sys.stdout if args.output not in (None, "-") else sys.stderr)
        if args.check:
            print(f"cow-plan: --check: ok ({header['stats']['frames_planned']} frames planned, "
                  f"{header['stats']['frames_duplicated']} duplicated)", file=sys.stderr)
        return 0
    except (StreamError, PlanError, PlanInvalid, ValueError) as exc:
        print(f"cow-plan: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cow-plan: interrupted" + ("" if committed else ": no plan was written"), file=sys.stderr)
        return 130
    except OSError as exc:
        if is_broken_pipe(exc):
            return 1
        print(f"cow-plan: {os_error_text(exc)}", file=sys.stderr)
        return 1
    finally:
        if stats_out:
            stats_out.abandon()  # nothing, once committed
        if images is not None:
            images.close()


def _explain(header, records, stream):
    """The --explain table, after the plan is in place: a reader that stops early (head) is
    not a failure of the plan."""
    try:
        stream.write(explain(header, records))
        stream.flush()
    except BrokenPipeError:
        silence_broken_pipe(stream)


if __name__ == "__main__":
    sys.exit(main())
