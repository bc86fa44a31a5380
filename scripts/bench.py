"""Side-by-side benchmark of the three plan strategies on the sharing patterns.

For every pattern and size: start the C workload (tests/workloads/cowload.c),
measure it with the kernel (distinct PFNs), dump it once with
`cow-collect --kill`, then for each strategy plan it, restore it, check every
process's memory checksum, measure the restored tree and kill it.  Prints
distinct frames after / before, image bytes / (distinct frames x 4 KiB), and
the wall time and throughput (MiB/s of distinct frames) of each stage.

    .venv/bin/python scripts/bench.py                       # all patterns, 256 MiB
    .venv/bin/python scripts/bench.py --mib 256 1024 --patterns same rewrote

With a working CRIU (``criu`` on PATH, /opt/cowtree-criu/criu from
scripts/get-criu.sh, or ``--criu PATH``) each pattern is also started afresh,
dumped with ``criu dump`` and restored with ``criu restore -d``, and checked and
measured the same way: its rows have strategy ``criu``.

Times are wall-clock on a shared machine: compare ratios within one run.  Every timed
command starts after a sync(), so no tool pays for the writeback of an earlier image, and
after touching and freeing WARM_FACTOR x (distinct frames x 4 KiB) of anonymous memory (at
most 60% of MemAvailable).  On the VM this was written on (a virtio-balloon with free page
reporting on the kernel command line: free memory presumably goes back to the host) memory
was slow to use again depending on what ran before: cow-apply's page filling of a 1 GiB tree
took 1.0-1.8 s right after cow-plan and 0.6 s when 3 GiB had been touched and freed just
before; criu restore runs right after criu dump freed its tree, and met no such cost.  Each
command now starts from the same state.
"""

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stages.linux.memstat import tree_frames  # noqa: E402
from tests.support.workloads import PATTERNS, reap, start_workload  # noqa: E402

BIN = os.path.join(ROOT, ".venv", "bin")
STRATEGIES = ("exact", "address", "none")
CRIU_DEFAULTS = ("/opt/cowtree-criu/criu",)
PAGE = 4096
# free memory touched before each timed command, in distinct frames' bytes: CRIU's image of
# the `same` pattern is 4x them (each process's copy), a restore makes at most as many again
WARM_FACTOR = 5


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def warm_free_memory(nbytes):
    """Touch and free nbytes of anonymous memory (at most 60% of MemAvailable), so that the
    free pages the next command gets are backed by the host (see the module's doc)."""
    nbytes = min(nbytes, int(mem_available() * 0.6)) // PAGE * PAGE
    if nbytes > 0:
        mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE).close()


def run(cmd, what, reap_for=None, warm=0):
    """Run cmd, timed.  reap_for: a Workload whose dead processes we reap meanwhile: we are
    their subreaper, and `--kill` (like a restore) wants their pids free, so we must not
    leave them as zombies while blocked in a wait for the command.  warm: bytes of free
    memory to touch first (warm_free_memory)."""
    # the dirty pages of the previous command (images of up to several GiB) are written back
    # first, so that their writeback does not slow this one down: each tool starts alike
    os.sync()
    warm_free_memory(warm)
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        while proc.poll() is None:
            if reap_for is not None:
                for pid in reap_for.known:
                    reap(pid)
            time.sleep(0.002)
        elapsed = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(), err.read().decode())
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res, elapsed


def mibps(frames, seconds):
    return frames * 4096 / (1 << 20) / seconds if seconds > 0 else float("inf")


def bench_one(pattern, mib, workdir):
    wl = start_workload(pattern, mib, workdir)
    rows = []
    try:
        before = tree_frames(wl.root)["distinct_frames"]
        images = os.path.join(workdir, f"{pattern}-{mib}.cow")
        warm = WARM_FACTOR * before * PAGE
        _, t_collect = run([os.path.join(BIN, "cow-collect"), "--tree", str(wl.root), "--kill", "-o", images],
                           "cow-collect", reap_for=wl, warm=warm)
        wl.popen.wait(timeout=30)
        wl.wait_gone(timeout=10)
        image_bytes = os.path.getsize(images)
        for strategy in STRATEGIES:
            plan = os.path.join(workdir, f"{pattern}-{mib}.{strategy}.plan")
            stats_file = plan + ".stats"
            _, t_plan = run([os.path.join(BIN, "cow-plan"), "-i", images, "-o", plan, "--strategy", strategy,
                             "--stats", stats_file], f"cow-plan {strategy}", warm=warm)
            with open(stats_file) as f:
                stats = json.load(f)
            res, t_apply = run([os.path.join(BIN, "cow-apply"), "-i", plan], f"cow-apply {strategy}", warm=warm)
            restored_root = int(res.stdout.split()[-1])
            wl.root = restored_root
            wl.known.update(wl.pids)
            try:
                checks = wl.check(timeout=60)
                bad = [pid for pid, text in checks.items() if not text.startswith("ok")]
                after = tree_frames(restored_root)["distinct_frames"]
            finally:
                wl.kill_tree()
            rows.append({
                "pattern": pattern, "mib": mib, "strategy": strategy, "before": before, "after": after,
                "planned": stats["frames_planned"], "image_bytes": image_bytes,
                "t_collect": t_collect, "t_plan": t_plan, "t_apply": t_apply, "bad": bad,
            })
            os.unlink(plan)
        os.unlink(images)
    finally:
        wl.kill_tree()
    return rows


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def find_criu(explicit):
    """A criu command that passes its own `criu check`, or (None, why not)."""
    candidates = [explicit] if explicit else [shutil.which("criu"), *CRIU_DEFAULTS]
    for path in filter(None, candidates):
        if not os.access(path, os.X_OK):
            continue
        res = subprocess.run([path, "check"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode == 0:
            return path, None
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{path} fails `criu check` ({last})"
    return None, "not found (scripts/get-criu.sh installs one)"


def bench_criu(criu, pattern, mib, workdir):
    """The same tree through CRIU: dump (kills it), restore detached, check, measure."""
    wl = start_workload(pattern, mib, workdir)
    try:
        before = tree_frames(wl.root)["distinct_frames"]
        images = os.path.join(workdir, f"{pattern}-{mib}.criu")
        os.mkdir(images)
        warm = WARM_FACTOR * before * PAGE
        _, t_dump = run([criu, "dump", "-t", str(wl.root), "-D", images, "-o", "dump.log"], "criu dump",
                        reap_for=wl, warm=warm)
        wl.popen.wait(timeout=30)
        wl.wait_gone(timeout=10)
        image_bytes = dir_bytes(images)
        pidfile = os.path.join(workdir, "criu.pid")
        # restore -d: criu exits once the tree runs; the tree is reparented to us (a subreaper)
        _, t_restore = run([criu, "restore", "-d", "-D", images, "-o", "restore.log", "--pidfile", pidfile],
                           "criu restore", warm=warm)
        with open(pidfile) as f:
            wl.root = int(f.read())
        os.unlink(pidfile)
        wl.known.update(wl.pids)
        try:
            checks = wl.check(timeout=60)
            bad = [pid for pid, text in checks.items() if not text.startswith("ok")]
            after = tree_frames(wl.root)["distinct_frames"]
        finally:
            wl.kill_tree()
        shutil.rmtree(images)
        return {"pattern": pattern, "mib": mib, "strategy": "criu", "before": before, "after": after,
                "planned": None, "image_bytes": image_bytes, "t_collect": t_dump, "t_plan": 0.0,
                "t_apply": t_restore, "bad": bad}
    finally:
        wl.kill_tree()


def best_of(runs):
    """One row per (pattern, size, strategy): the least time of each stage, the most frames
    after restore, and every bad check of every run."""
    rows = {}
    for r in runs:
        key = (r["pattern"], r["mib"], r["strategy"])
        if key not in rows:
            rows[key] = dict(r, bad=list(r["bad"]))
            continue
        row = rows[key]
        for t in ("t_collect", "t_plan", "t_apply"):
            row[t] = min(row[t], r[t])
        row["after"] = max(row["after"], r["after"])
        row["bad"].extend(r["bad"])
    return list(rows.values())


def print_rows(rows):
    head = (f"{'pattern':8} {'MiB':>5} {'strategy':8} {'before':>8} {'after':>8} {'after/bef':>9} "
            f"{'img/frames':>10} {'collect s':>9} {'MiB/s':>7} {'plan s':>7} {'apply s':>8} {'MiB/s':>7}  check")
    print(head)
    for r in rows:
        img_ratio = r["image_bytes"] / (r["before"] * 4096)
        print(
            f"{r['pattern']:8} {r['mib']:>5} {r['strategy']:8} {r['before']:>8} {r['after']:>8} "
            f"{r['after'] / r['before']:>9.3f} {img_ratio:>10.4f} {r['t_collect']:>9.2f} "
            f"{mibps(r['before'], r['t_collect']):>7.0f} {r['t_plan']:>7.2f} {r['t_apply']:>8.2f} "
            f"{mibps(r['after'], r['t_apply']):>7.0f}  {'ok' if not r['bad'] else 'BAD ' + str(r['bad'])}"
        )
    by = {(r["pattern"], r["mib"], r["strategy"]): r for r in rows}
    print()
    for (pattern, mib, strategy), r in sorted(by.items()):
        if strategy != "exact":
            continue
        parts = []
        for other in ("address", "none", "criu"):
            o = by.get((pattern, mib, other))
            if o:
                parts.append(f"{other}/exact frames after = {o['after'] / max(1, r['after']):.2f}")
        print(f"{pattern} {mib} MiB: " + ", ".join(parts))
        c = by.get((pattern, mib, "criu"))
        if c:
            print(f"{'':>{len(pattern) + len(str(mib)) + 6}}criu dump / cow-collect time = "
                  f"{c['t_collect'] / r['t_collect']:.2f}, criu restore / cow-apply (exact) time = "
                  f"{c['t_apply'] / r['t_apply']:.2f}, "
                  f"criu image / cowtree image = {c['image_bytes'] / r['image_bytes']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, nargs="+", default=[256], help="region sizes (default 256)")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--criu", metavar="PATH", help="the criu command to compare with (default: see above)")
    ap.add_argument("--no-criu", action="store_true", help="skip the CRIU comparison")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run everything N times; times are the best of N, frames and checks from every run")
    args = ap.parse_args()
    criu = None
    if args.no_criu:
        print("criu: comparison skipped (--no-criu)")
    else:
        criu, why = find_criu(args.criu)
        print(f"criu: using {criu}" if criu else f"criu: {why}: CRIU comparison skipped")
    workdir = tempfile.mkdtemp(prefix="cowtree-bench-")
    runs = []
    try:
        for _ in range(args.repeat):
            for mib in args.mib:
                for pattern in args.patterns:
                    runs.extend(bench_one(pattern, mib, workdir))
                    if criu:
                        runs.append(bench_criu(criu, pattern, mib, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = best_of(runs)
    if args.repeat > 1:
        print(f"times: best of {args.repeat} runs; frames: the worst run")
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["bad"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
