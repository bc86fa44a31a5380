#!/usr/bin/env python3
"""Collect speed: cow-collect of one running tree per pattern, N times, paired with criu dump.

    .venv/bin/python scripts/bench_collect.py [--mib 256] [--patterns same rewrote] [--runs 5]
        [--dir DIR] [--criu PATH | --no-criu]

For every pattern: start the C workload once and measure it (distinct frames, kernel PFNs).
Then, N times in turn, on that same tree (it runs on between runs): ``cow-collect -o FILE``
and, with a working CRIU, ``criu dump --leave-running -D DIR``.  Each command starts like
bench.py's (after a sync() and after touching and freeing some memory), and its image is
deleted before the next.  Prints every run's wall time (process start to exit), the image
sizes and image bytes / (distinct frames x 4 KiB), then per pattern the medians, the median
of the per-run ratios criu dump / cow-collect (a run's two commands ran back to back, so the
machine's state was alike for both), and their least and greatest.  Finally the tree's own
memory checksums are checked (both tools left it running) and the tree is killed.

Pairing on one live tree keeps tree start-up out of the loop; the tree is resumed, not
killed, by both, so neither time includes the teardown of its memory (bench.py's
``--kill`` comparison does).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.bench import WARM_FACTOR, dir_bytes, find_criu, run  # noqa: E402
from stages.linux.memstat import tree_frames  # noqa: E402
from stages.stream import StreamReader  # noqa: E402
from tests.support.workloads import PATTERNS, start_workload  # noqa: E402

BIN = os.path.join(ROOT, ".venv", "bin")
PAGE = 4096
MIB = 1 << 20


def trailer_summary(path):
    """The images' trailer summary (reads and checks the whole stream)."""
    with open(path, "rb", buffering=1 << 20) as f:
        reader = StreamReader(f, expect="cowtree-images", validate=False)
        for _ in reader:
            pass
        return reader.trailer["summary"]


def bench_pattern(pattern, args, criu, workdir):
    """(medians {command: s}, ratios [criu/cow per run]); raises when something is wrong."""
    wl = start_workload(pattern, args.mib, workdir, timeout=300)
    try:
        frames = tree_frames(wl.root)["distinct_frames"]
        warm = WARM_FACTOR * frames * PAGE
        print(f"{pattern} {args.mib} MiB: {len(wl.pids)} processes, {frames} distinct frames "
              f"({frames * PAGE / MIB:.1f} MiB)", flush=True)
        image = os.path.join(workdir, f"{pattern}.cow")
        criu_dir = os.path.join(workdir, f"{pattern}.criu")
        times = {"cow-collect": [], "criu dump": []}
        ratios = []
        for i in range(1, args.runs + 1):
            _, t_cow = run([os.path.join(BIN, "cow-collect"), "--tree", str(wl.root), "-o", image],
                           "cow-collect", warm=warm)
            cow_bytes = os.path.getsize(image)
            if i == 1:
                summary = trailer_summary(image)
                if summary["frames"] != frames:
                    raise RuntimeError(f"{pattern}: the image has {summary['frames']} frames, the kernel {frames}")
            os.unlink(image)
            times["cow-collect"].append(t_cow)
            line = f"  run {i}: cow-collect {t_cow:6.3f} s ({frames * PAGE / MIB / t_cow:6.0f} MiB/s)"
            if criu:
                os.mkdir(criu_dir)
                _, t_criu = run([criu, "dump", "--leave-running", "-t", str(wl.root), "-D", criu_dir,
                                 "-o", "dump.log"], "criu dump", warm=warm)
                criu_bytes = dir_bytes(criu_dir)
                shutil.rmtree(criu_dir)
                times["criu dump"].append(t_criu)
                ratios.append(t_criu / t_cow)
                line += f", criu dump {t_criu:6.3f} s, criu/cow-collect {t_criu / t_cow:5.2f}"
            print(line, flush=True)
        print(f"  images: cow-collect {cow_bytes} bytes ({cow_bytes / (frames * PAGE):.4f} x frames)"
              + (f", criu {criu_bytes} bytes ({criu_bytes / (frames * PAGE):.4f} x frames)" if criu else ""))
        bad = {pid: text for pid, text in wl.check(timeout=60).items() if not text.startswith("ok")}
        if bad:
            raise RuntimeError(f"{pattern}: the tree's memory changed after the dumps: {bad}")
        return {k: statistics.median(v) for k, v in times.items() if v}, ratios
    finally:
        wl.kill_tree()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="workload size in MiB (default 256)")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where images go (default: a temp dir under $TMPDIR)")
    ap.add_argument("--criu", metavar="PATH", help="the criu command to compare with (default: as bench.py)")
    ap.add_argument("--no-criu", action="store_true", help="time cow-collect only")
    args = ap.parse_args(argv)
    criu = None
    if not args.no_criu:
        criu, why = find_criu(args.criu)
        print(f"criu: using {criu}" if criu else f"criu: skipped, {why}")
    workdir = tempfile.mkdtemp(prefix="cowtree-bench-collect-", dir=args.dir)
    results = []
    try:
        for pattern in args.patterns:
            results.append((pattern, *bench_pattern(pattern, args, criu, workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    for pattern, medians, ratios in results:
        parts = [f"{k} {v:.3f} s" for k, v in medians.items()]
        if ratios:
            parts.append(f"criu/cow-collect per run: median {statistics.median(ratios):.2f} "
                         f"(least {min(ratios):.2f}, greatest {max(ratios):.2f})")
        print(f"{pattern} {args.mib} MiB, medians: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
