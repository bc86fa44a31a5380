"""cowtree demo: checkpoint and restore a python3 pre-fork server, and show the memory it keeps.

Starts scripts/workloads/prefork_server.py (a parent with a dataset, forked
workers serving requests), asks every worker a question, measures the tree
with cow-mem, checkpoints it with `cow-collect --kill`, plans it three ways,
restores the exact plan with cow-apply, asks the same questions again, checks
every worker's dataset checksum and measures again.  Everything it started is
killed at the end, pass or fail.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
PR_SET_CHILD_SUBREAPER = 36
SERVER = os.path.join(ROOT, "scripts", "workloads", "prefork_server.py")


class DemoError(Exception):
    pass


def tool(name):
    return os.path.join(BIN, name)


def run(cmd, what, reap=(), **kw):
    """Run cmd, timed.  reap: pids we reap meanwhile (our dead children and orphans): cow-collect
    --kill waits until the pids of the tree it killed are free, which needs their parent, us."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, **kw)
    if reap:
        while proc.poll() is None:
            for pid in reap:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            time.sleep(0.002)
    out, err = proc.communicate()
    elapsed = time.monotonic() - start
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if res.returncode != 0:
        raise DemoError(f"{what} failed (exit {res.returncode}):\n{res.stderr.strip()}")
    return res, elapsed


def wait_for(path, timeout, what):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ask(directory, pid, text, timeout=30):
    resp = os.path.join(directory, f"resp-{pid}")
    if os.path.exists(resp):
        os.unlink(resp)
    tmp = os.path.join(directory, f".req-{pid}")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(directory, f"req-{pid}"))
    wait_for(resp, timeout, f"worker {pid} to answer {text!r}")
    with open(resp) as f:
        return f.read().strip()


def tree_memory(root):
    res, _ = run([tool("cow-mem"), str(root), "--json"], "cow-mem")
    return json.loads(res.stdout)


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        reap_all(pids, timeout=10)  # ours as the subreaper: the original and the restored tree
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)


def become_subreaper():
    """Workers orphaned by `cow-collect --kill` become our children, so we can reap them and
    free their pids for the restore (pid 1 does not reap orphans in every container)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_all(pids, timeout):
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"processes {pids} are still there after cow-collect --kill")
        time.sleep(0.01)


def mib(frames):
    return frames * 4096 / (1 << 20)


def demo(args, workdir):
    started = []
    become_subreaper()
    try:
        print(f"starting a python3 pre-fork server: {args.mib} MiB dataset, {args.workers} workers")
        server = subprocess.Popen(
            [sys.executable, SERVER, "--mib", str(args.mib), "--workers", str(args.workers), "--dir", workdir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(server.pid)
        wait_for(os.path.join(workdir, "ready"), 120, "the server to start")
        with open(os.path.join(workdir, "ready")) as f:
            pids = [int(x) for x in f.read().split()]
        started[:] = pids
        root, workers = pids[0], pids[1:]
        questions = {w: f"{4096 * (i + 1)} 65536" for i, w in enumerate(workers)}
        before = {w: ask(workdir, w, q) for w, q in questions.items()}
        for w in workers:
            print(f"  worker {w} answers: {before[w]}")
        mem_before = tree_memory(root)

        images = os.path.join(workdir, "images.cow")
        _, t_collect = run([tool("cow-collect"), "--tree", str(root), "--kill", "-o", images], "cow-collect",
                           reap=pids)
        reap_all(pids, timeout=10)
        print(f"checkpointed {len(pids)} processes with cow-collect --kill in {t_collect:.2f} s")

        plans, stats, t_plan = {}, {}, {}
        for strategy in ("exact", "address", "none"):
            plans[strategy] = os.path.join(workdir, f"plan.{strategy}")
            stats_file = os.path.join(workdir, f"stats.{strategy}.json")
            _, t_plan[strategy] = run(
                [tool("cow-plan"), "-i", images, "-o", plans[strategy], "--strategy", strategy,
                 "--stats", stats_file], f"cow-plan --strategy {strategy}",
            )
            with open(stats_file) as f:
                stats[strategy] = json.load(f)

        res, t_apply = run([tool("cow-apply"), "-i", plans["exact"]], "cow-apply")
        print(f"restored with cow-apply in {t_apply:.2f} s: root pid {res.stdout.strip()}")
        for w in workers:
            wait_for(f"/proc/{w}", 10, f"worker {w} to exist")
        mem_restored = tree_memory(root)
        after = {}
        for w, q in questions.items():
            after[w] = ask(workdir, w, q)
            check = ask(workdir, w, "check", timeout=60)
            print(f"  worker {w} answers: {after[w]}   dataset check: {check.split()[0]}")
            if not check.startswith("ok"):
                raise DemoError(f"worker {w}: dataset checksum differs after restore")
            if after[w].split()[1:] != before[w].split()[1:]:
                raise DemoError(f"worker {w}: answer differs after restore")
        mem_served = tree_memory(root)

        def row(label, frames):
            print(f"{label:40}{frames:>10}{mib(frames):>10.1f}")

        print()
        print(f"{'distinct frames (4 KiB pages)':40}{'frames':>10}{'MiB':>10}")
        row("before the dump (kernel: cow-mem)", mem_before["distinct_frames"])
        row("in the images", stats["exact"]["frames_in_images"])
        for strategy in ("exact", "address", "none"):
            row(f"plan --strategy {strategy} creates", stats[strategy]["frames_planned"])
        row("after restore, exact (kernel: cow-mem)", mem_restored["distinct_frames"])
        row("  ... once the workers served again", mem_served["distinct_frames"])
        print(f"{'image file':40}{'':>10}{os.path.getsize(images) / (1 << 20):>10.1f}")
        print()
        print(f"time: collect {t_collect:.2f} s, plan {t_plan['exact']:.2f} s, apply {t_apply:.2f} s")
        ratio = mem_restored["distinct_frames"] / max(1, mem_before["distinct_frames"])
        print(f"frames after restore / before the dump: {ratio:.3f}")
        print("(pages with equal bytes are shared again after the restore; python's reference")
        print(" counting copies some of them again as soon as the workers touch their objects)")
        return 0
    finally:
        kill_pids(started)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="dataset size (default 256)")
    ap.add_argument("--workers", type=int, default=4, help="number of workers (default 4)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (images, plans)")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="cowtree-demo-")
    try:
        return demo(args, workdir)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
