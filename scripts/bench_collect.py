#!/usr/bin/env python3
"""Collect throughput: cow-collect -o FILE on a C workload tree, N times.

    .venv/bin/python scripts/bench_collect.py [--mib 256] [--pattern same] [--runs 3] [--dir /dev/shm]

Prints the tree's distinct frames (kernel: pagemap PFNs), the image size, image
bytes / (frames x 4096), and per run the wall time of the whole cow-collect
command (process start to exit) and the MiB/s of distinct frames it gives.
The workload is killed at the end, whatever happens.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stages.linux.memstat import tree_frames  # noqa: E402
from stages.stream import StreamReader  # noqa: E402
from tests.support.workloads import PATTERNS, start_workload  # noqa: E402

PAGE = 4096
MIB = 1 << 20


def trailer_summary(path):
    """The images' trailer summary (reads and checks the whole stream)."""
    with open(path, "rb", buffering=1 << 20) as f:
        reader = StreamReader(f, expect="cowtree-images", validate=False)
        for _ in reader:
            pass
        return reader.trailer["summary"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="workload size in MiB (default 256)")
    ap.add_argument("--pattern", default="same", choices=PATTERNS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm", help="where the image file goes (tmpfs by default)")
    args = ap.parse_args(argv)

    collect = [sys.executable, "-m", "stages.collect.cli"]
    with tempfile.TemporaryDirectory(prefix="cowbench-") as tmp:
        wl = start_workload(args.pattern, args.mib, tmp, timeout=300)
        out = os.path.join(args.dir, f"cowbench-{os.getpid()}.cow")
        try:
            frames = tree_frames(wl.root)["distinct_frames"]
            print(f"workload {args.pattern} {args.mib} MiB: {len(wl.pids)} processes, "
                  f"{frames} distinct frames ({frames * PAGE / MIB:.1f} MiB)")
            times = []
            for run in range(1, args.runs + 1):
                t0 = time.monotonic()
                res = subprocess.run(collect + ["--tree", str(wl.root), "-o", out],
                                     cwd=ROOT, capture_output=True)
                secs = time.monotonic() - t0
                if res.returncode != 0:
                    sys.stderr.write(res.stderr.decode())
                    print(f"run {run}: cow-collect exited {res.returncode}")
                    return 1
                times.append(secs)
                print(f"run {run}: {secs:.3f} s, {frames * PAGE / MIB / secs:.1f} MiB/s")
            size = os.path.getsize(out)
            summary = trailer_summary(out)
            if summary["frames"] != frames:
                print(f"MISMATCH: image has {summary['frames']} frames, the kernel {frames}")
            print(f"image: {size} bytes, {summary['frames']} frames, {summary['stored_pages']} pages stored, "
                  f"image/(frames x 4096) = {size / (frames * PAGE):.4f}")
            best = min(times)
            print(f"best {best:.3f} s ({frames * PAGE / MIB / best:.1f} MiB/s), "
                  f"median {sorted(times)[len(times) // 2]:.3f} s")
            alive = wl.check()
            if any(not v.startswith("ok") for v in alive.values()):
                print(f"WORKLOAD DAMAGED: {alive}")
                return 1
        finally:
            if os.path.exists(out):
                os.unlink(out)
            wl.kill_tree()
    return 0


if __name__ == "__main__":
    sys.exit(main())
