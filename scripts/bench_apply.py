#!/usr/bin/env python3
"""Apply speed: one dump per pattern, then cow-apply (and criu restore) of it, N times, interleaved.

    .venv/bin/python scripts/bench_apply.py [--mib 256] [--patterns same rewrote orphans] [--runs 3]
        [--other DIR] [--no-criu]

For every pattern: start the C workload, dump it once with ``cow-collect --kill`` and plan it
(exact), and, with a working CRIU, start it afresh and ``criu dump`` it once.  Then, N times in
turn: ``cow-apply -i PLAN`` (and, with ``--other DIR``, the cow-apply of another source tree
DIR, e.g. an export of main, run with this venv's python), ``criu restore -d``; each restored
tree is checked (every process's own memory checksum) and killed.  Prints every run's wall time
(process start to exit) and cow-apply's phases (--report), then the median of each command and
criu restore / cow-apply.  Times are wall-clock on a shared machine: compare within one run.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.bench import find_criu, run  # noqa: E402
from tests.support.workloads import PATTERNS, start_workload  # noqa: E402

BIN = os.path.join(ROOT, ".venv", "bin")


def cow_apply(source, plan, workdir):
    """cow-apply from the source tree `source` (this venv's python); (root pid, seconds, phases)."""
    report = os.path.join(workdir, "apply-report.json")
    env = dict(os.environ, PYTHONPATH=source)
    cmd = [os.path.join(BIN, "python"), "-c", "import sys; from stages.apply.cli import main; sys.exit(main())",
           "-i", plan, "--report", report]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, cwd=source)
    secs = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"cow-apply ({source}) failed: {res.stderr.strip()}")
    with open(report) as f:
        phases = json.load(f)["phases"]
    return int(res.stdout.split()[-1]), secs, phases


def criu_restore(criu, images, workdir):
    pidfile = os.path.join(workdir, "criu.pid")
    _, secs = run([criu, "restore", "-d", "-D", images, "-o", "restore.log", "--pidfile", pidfile], "criu restore")
    with open(pidfile) as f:
        root = int(f.read())
    os.unlink(pidfile)
    return root, secs, {}


def checked(wl, root):
    """Check and kill the restored tree whose root is `root`; raises if a process is bad."""
    wl.root = root
    wl.known.update(wl.pids)
    try:
        bad = {pid: t for pid, t in wl.check(timeout=60).items() if not t.startswith("ok")}
    finally:
        wl.kill_tree()
    if bad:
        raise RuntimeError(f"{wl.pattern}: restored tree is bad: {bad}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--patterns", nargs="+", default=["same", "rewrote", "orphans"], choices=PATTERNS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--other", metavar="DIR", help="another source tree whose cow-apply runs in turn (as 'other')")
    ap.add_argument("--no-criu", action="store_true")
    ap.add_argument("--dir", default=None, help="where dumps and plans go (default: a temp dir)")
    args = ap.parse_args(argv)
    criu = None if args.no_criu else find_criu(None)[0]
    commands = [("this", ROOT)] + ([("other", os.path.abspath(args.other))] if args.other else [])
    workdir = tempfile.mkdtemp(prefix="cowtree-bench-apply-", dir=args.dir)
    summary = []
    try:
        for pattern in args.patterns:
            wl = start_workload(pattern, args.mib, workdir, timeout=300)
            images = os.path.join(workdir, f"{pattern}.cow")
            plan = os.path.join(workdir, f"{pattern}.plan")
            try:
                run([os.path.join(BIN, "cow-collect"), "--tree", str(wl.root), "--kill", "-o", images],
                    "cow-collect", reap_for=wl)
                wl.popen.wait(timeout=30)
                wl.wait_gone(timeout=10)
                run([os.path.join(BIN, "cow-plan"), "-i", images, "-o", plan], "cow-plan")
                os.unlink(images)
            except BaseException:
                wl.kill_tree()
                raise
            cwl = criu_dir = None
            if criu:
                cwl = start_workload(pattern, args.mib, workdir, timeout=300)
                criu_dir = os.path.join(workdir, f"{pattern}.criu")
                os.mkdir(criu_dir)
                try:
                    run([criu, "dump", "-t", str(cwl.root), "-D", criu_dir, "-o", "dump.log"], "criu dump",
                        reap_for=cwl)
                    cwl.popen.wait(timeout=30)
                    cwl.wait_gone(timeout=10)
                except BaseException:
                    cwl.kill_tree()
                    raise
            times = {}
            for i in range(args.runs):
                for name, source in commands:
                    root, secs, phases = cow_apply(source, plan, workdir)
                    checked(wl, root)
                    times.setdefault(name, []).append(secs)
                    ph = " ".join(f"{k}={v:.3f}" for k, v in phases.items())
                    print(f"{pattern} {args.mib} MiB run {i + 1} cow-apply {name:5}: {secs:6.3f} s  ({ph})",
                          flush=True)
                if criu:
                    root, secs, _ = criu_restore(criu, criu_dir, workdir)
                    checked(cwl, root)
                    times.setdefault("criu", []).append(secs)
                    print(f"{pattern} {args.mib} MiB run {i + 1} criu restore    : {secs:6.3f} s", flush=True)
            os.unlink(plan)
            if criu_dir:
                shutil.rmtree(criu_dir)
            summary.append((pattern, {k: statistics.median(v) for k, v in times.items()}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    for pattern, med in summary:
        parts = [f"{k} {v:.3f} s" for k, v in med.items()]
        if "criu" in med:
            parts += [f"criu/{k} = {med['criu'] / med[k]:.2f}" for k, _ in commands]
        print(f"{pattern} {args.mib} MiB, medians: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
