#!/usr/bin/env python3
"""Load: a wide tree sharing one region, and a process with many VMAs, through
cow-collect -o | cow-plan -i -o | cow-apply -i, one stage at a time.

    .venv/bin/python scripts/bench_load.py [--procs 64] [--mib 256] [--vmas 20000] [--dir /dev/shm]

Per stage: wall time and peak RSS (ru_maxrss of that command, from wait4 in a small
launcher: see LAUNCHER), and the stream size it wrote.  Then the restored tree is checked (every process re-checksums its
memory), its distinct frames compared with the original's, and everything is killed.
tests/test_load.py runs the same code small.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stages.linux.memstat import tree_frames  # noqa: E402
from tests.support.workloads import (  # noqa: E402
    Workload, become_subreaper, build, proc_state, reap, tree_pids)

BIN = os.path.dirname(sys.executable)


def start(name, args, tmpdir, timeout=300):
    """Start tests/workloads/NAME.c with args + [OUTDIR] (cowload protocol); wait until ready."""
    binary = build(name)
    outdir = tempfile.mkdtemp(prefix=f"{name}-", dir=str(tmpdir))
    become_subreaper()
    popen = subprocess.Popen([binary, *map(str, args), outdir], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, cwd="/",
                             start_new_session=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    wl = Workload(name, 0, outdir, popen)
    try:
        return wl.wait_ready(timeout)
    except BaseException:
        wl.kill_tree()
        raise


# Runs one stage and writes "maxrss_kib status wall_s" to the file argv[1].  It is a small
# interpreter (-S, no imports): a process's peak RSS (ru_maxrss) includes the memory of the
# process it was forked from, up to its exec, so a stage started straight from this script
# would report at least this script's own peak RSS (40 MiB and more here).
LAUNCHER = """
import os, sys, time
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {status} {time.monotonic() - t0}")
"""


def stage(argv, timeout=600):
    """Run one stage; (wall seconds, peak RSS in KiB, stderr).  Raises on failure."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as usage:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, usage.name, *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{argv[0]}: more than {timeout}s")
        got = usage.read().split()
        if proc.returncode != 0 or len(got) != 3:
            raise RuntimeError(f"{os.path.basename(argv[0])}: the launcher failed ({proc.returncode})")
        maxrss, status, wall = int(got[0]), int(got[1]), float(got[2])
        returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    if returncode != 0:
        raise RuntimeError(f"{os.path.basename(argv[0])} exited {returncode}: {text[-2000:]}")
    return wall, maxrss, text


class Restored:
    """The pids of a restored tree (from cow-apply's report); kill() ends them all."""

    def __init__(self, report):
        self.pids = [int(p) for p in report["pids"].values()]

    def kill(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while not all(reap(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.01)


def pipeline(wl, workdir, restored):
    """collect --kill, plan, apply of the workload wl; returns figures.  The restored tree's
    pids are appended to ``restored`` (a list of Restored) as soon as they are known."""
    images, plan, report = (os.path.join(workdir, n) for n in ("images.cow", "plan.cow", "apply.json"))
    before = tree_frames(wl.root)
    figures = {"processes": len(wl.pids), "frames_before": before["distinct_frames"]}
    t, rss, _ = stage([os.path.join(BIN, "cow-collect"), "--tree", str(wl.root), "--kill", "-o", images])
    figures["collect"] = {"s": round(t, 3), "maxrss_kib": rss, "bytes": os.path.getsize(images)}
    if not wl.wait_gone(30):
        raise RuntimeError("the original tree did not go away after cow-collect --kill")
    t, rss, _ = stage([os.path.join(BIN, "cow-plan"), "-i", images, "-o", plan])
    figures["plan"] = {"s": round(t, 3), "maxrss_kib": rss, "bytes": os.path.getsize(plan)}
    try:
        t, rss, _ = stage([os.path.join(BIN, "cow-apply"), "-i", plan, "--report", report])
    finally:
        if os.path.exists(report):
            with open(report) as f:
                rep = json.load(f)
            restored.append(Restored(rep))
    figures["apply"] = {"s": round(t, 3), "maxrss_kib": rss, "pages_written": rep["pages_written"]}
    checks = wl.check(timeout=60)
    figures["checks_ok"] = sum(v.startswith("ok ") for v in checks.values())
    figures["frames_after"] = tree_frames(wl.root)["distinct_frames"]
    figures["restored_pids"] = sorted(tree_pids(wl.root)) == sorted(wl.pids)
    return figures


def vma_count(pid):
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=64)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--vmas", type=int, default=20000)
    ap.add_argument("--dir", default="/dev/shm", help="where the streams go")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cowload-bench-", dir=args.dir) as tmp:
        for name, wl_args in (("fanout", (args.procs, args.mib)), ("manyvmas", (args.vmas,))):
            work = os.path.join(tmp, name)
            os.mkdir(work)
            wl = start(name, wl_args, tmp)
            restored = []
            try:
                vmas_before = vma_count(wl.root)
                fig = pipeline(wl, work, restored)
                fig["vmas_root_before"] = vmas_before
                fig["vmas_root_after"] = vma_count(wl.root)
                results[f"{name} {' x '.join(map(str, wl_args))}"] = fig
            finally:
                for r in restored:
                    r.kill()
                wl.kill_tree()
            for f in os.listdir(work):
                os.unlink(os.path.join(work, f))
    for name, fig in results.items():
        print(f"{name}: {fig['processes']} processes, frames {fig['frames_before']} -> {fig['frames_after']}, "
              f"checks ok {fig['checks_ok']}/{fig['processes']}, VMAs of the root {fig['vmas_root_before']} -> "
              f"{fig['vmas_root_after']}")
        for st in ("collect", "plan", "apply"):
            s = fig[st]
            extra = f", {s['bytes'] / (1 << 20):.1f} MiB written" if "bytes" in s else ""
            print(f"  {st:8} {s['s']:8.2f} s   peak RSS {s['maxrss_kib'] / 1024:8.1f} MiB{extra}")
        ratio = fig["plan"]["maxrss_kib"] * 1024 / fig["collect"]["bytes"]
        # the goal: cow-plan keeps no page bytes, so its peak RSS stays well below the image
        print(f"  cow-plan peak RSS / image size = {ratio:.2f} ({'ok' if ratio < 0.5 else 'ABOVE the goal of 0.5'})")
    print(json.dumps(results, indent=1, sort_keys=True))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"(this script: peak RSS {own / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()
