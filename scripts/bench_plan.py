#!/usr/bin/env python3
"""Time cow-plan on synthetic trees: 16 processes x N pages, for a few N.

    .venv/bin/python scripts/bench_plan.py [--pages 16384,32768,65536] [--procs 16] [--strategy exact] [--repeat N]

Each child shares the root's region, rewrites one page in 64 and (every other
child) has moved the region with mremap.  Prints the time of each phase (reading
and spooling the images, planning, writing the plan with the page data) and of
the whole cow-plan command, per million mapped pages: a linear planner shows flat
columns.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stages.plan.cli import main as cow_plan, make_plan, write_plan  # noqa: E402
from stages.plan.model import read_images  # noqa: E402
from tests.support.synthetic import ImageBuilder, page_bytes  # noqa: E402

PAGE = 4096


def build(path, procs, pages):
    b = ImageBuilder()
    root = 1000
    b.process(root, 0)
    base = [b.frame(page_bytes(("root", i))) for i in range(pages)]
    b.vma(root, 0x10000000, base)
    for k in range(1, procs):
        pid = root + k
        b.process(pid, root)
        frames = list(base)
        for i in range(k % 64, pages, 64):
            frames[i] = b.frame(page_bytes((pid, i)))
        start = 0x10000000 if k % 2 else 0x20000000 + k * pages * PAGE * 2
        b.vma(pid, start, frames)
    with open(path, "wb") as f:
        b.write(f, run=1024)
    return len(b.contents)


def phases(images_path, out_path, strategy):
    """Seconds spent reading (and spooling pages), planning, and writing the plan."""
    t0 = time.perf_counter()
    with open(images_path, "rb") as f:
        images = read_images(f)
    t1 = time.perf_counter()
    header, records = make_plan(images, strategy)
    t2 = time.perf_counter()
    with open(out_path, "wb") as f:
        write_plan(f, images, header, records)
    t3 = time.perf_counter()
    images.close()
    return t1 - t0, t2 - t1, t3 - t2, header["stats"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", default="16384,32768,65536")
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--strategy", default="exact")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each size N times and print the fastest of each column (shared, noisy machines)")
    args = ap.parse_args()
    print(f"{'procs':>5} {'pages/proc':>10} {'mapped':>9} {'frames':>8} {'planned':>8} {'dup':>4} "
          f"{'read s':>7} {'plan s':>7} {'write s':>7} {'cli s':>7} {'plan s/Mpage':>12} {'cli s/Mpage':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for pages in (int(x) for x in args.pages.split(",")):
            images = os.path.join(tmp, "images.cow")
            frames = build(images, args.procs, pages)
            out = os.path.join(tmp, "plan.cow")
            runs = []
            for _ in range(max(1, args.repeat)):
                read_s, plan_s, write_s, stats = phases(images, out, args.strategy)
                t0 = time.perf_counter()
                code = cow_plan(["-i", images, "-o", out, "--strategy", args.strategy])
                cli_s = time.perf_counter() - t0
                if code:
                    sys.exit(f"cow-plan failed with {code}")
                runs.append((read_s, plan_s, write_s, cli_s))
            # the fastest run of each phase: the least disturbed by other load
            read_s, plan_s, write_s, cli_s = (min(col) for col in zip(*runs))
            mega = args.procs * pages / 1e6
            print(f"{args.procs:>5} {pages:>10} {args.procs * pages:>9} {frames:>8} {stats['frames_planned']:>8} "
                  f"{stats['frames_duplicated']:>4} {read_s:>7.2f} {plan_s:>7.2f} {write_s:>7.2f} {cli_s:>7.2f} "
                  f"{plan_s / mega:>12.2f} {cli_s / mega:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
