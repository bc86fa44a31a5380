"""End to end with real processes: cow-collect | cow-plan | cow-apply, then the restored
tree is checked (workload .check files, cow-mem frames) and killed, pass or fail."""

import json
import os
import signal
import subprocess
import time

import pytest

from stages.linux.memstat import tree_frames
from tests.support.workloads import PATTERNS, RUNNING_STATES, children_of, proc_state, workload  # noqa: F401 (fixture)

from tests.support.commands import run, tool  # noqa: F401
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tests.support.commands import TIMEOUT  # noqa: F401



class Restored:
    """Every tree cow-apply restored in a test; all killed at teardown (init last)."""

    def __init__(self):
        self.reports = []

    def add(self, report):
        self.reports.append(report)
        return report

    def kill_all(self):
        for rep in self.reports:
            pids = [int(p) for p in rep["pids"].values()]
            if rep.get("init_pid"):
                pids.append(rep["init_pid"])
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for pid in pids:  # reap what was re-parented to us (pytest may be a subreaper)
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                if all(proc_state(p) is None or (proc_state(p) == "Z" and not _is_our_child(p)) for p in pids):
                    break
                time.sleep(0.01)


def _is_our_child(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


@pytest.fixture
def restored():
    r = Restored()
    yield r
    r.kill_all()


def collect(root, kill=True):
    return run([tool("cow-collect"), "--tree", str(root)] + (["--kill"] if kill else [])).stdout


def plan(images, strategy=None):
    return run([tool("cow-plan")] + (["--strategy", strategy] if strategy else []), images).stdout


def apply(plan_bytes, tmp_path, restored, *flags):
    report = tmp_path / f"apply-{len(restored.reports)}.json"
    proc = run([tool("cow-apply"), "--report", str(report), *flags], plan_bytes)
    rep = restored.add(json.loads(report.read_text()))
    assert proc.stdout.decode().strip() == str(rep["pids"][str(rep["root"])])
    return rep


def outer(rep, pid):
    return int(rep["pids"][str(pid)])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_workload_restored_exact_keeps_sharing(pattern, workload, restored, tmp_path):
    wl = workload(pattern, 4)
    before = tree_frames(wl.root)["distinct_frames"]
    images = collect(wl.root)
    assert wl.wait_gone(10)
    rep = apply(plan(images), tmp_path, restored)
    assert sorted(int(p) for p in rep["pids"]) == wl.pids
    checks = wl.check()
    assert all(v.startswith("ok ") for v in checks.values()), checks
    after = tree_frames(wl.root)["distinct_frames"]
    assert after <= before, f"{pattern}: {after} frames after restore, {before} before"


def test_a_stopped_process_is_restored_stopped(workload, restored, tmp_path):
    """A process group-stopped (kill -STOP) when dumped with --kill comes back stopped, the
    others running; SIGCONT and it goes on with its memory intact."""
    wl = workload("chain", mib=4)
    (middle,) = children_of(wl.root)
    os.kill(middle, signal.SIGSTOP)
    wait_state(middle, "T")
    argv = [tool("cow-collect"), "--tree", str(wl.root), "--kill"]
    images = subprocess.run(argv, capture_output=True, timeout=30, check=True).stdout  # it hung
    assert wl.wait_gone(10)
    rep = apply(plan(images), tmp_path, restored)
    assert sorted(int(p) for p in rep["pids"]) == wl.pids
    wait_state(outer(rep, middle), "T")
    assert all(proc_state(outer(rep, pid)) in RUNNING_STATES for pid in wl.pids if pid != middle)
    os.kill(outer(rep, middle), signal.SIGCONT)
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def wait_state(pid, state, timeout=10):
    deadline = time.monotonic() + timeout
    while proc_state(pid) != state:
        assert time.monotonic() < deadline, f"process {pid}: state {proc_state(pid)}, not {state}"
        time.sleep(0.005)


@pytest.mark.parametrize("pattern", ["same", "chain"])
def test_strategy_none_costs_more_frames(pattern, workload, restored, tmp_path):
    wl = workload(pattern, 4)
    before = tree_frames(wl.root)["distinct_frames"]
    images = collect(wl.root)
    assert wl.wait_gone(10)
    apply(plan(images, "none"), tmp_path, restored)
    assert all(v.startswith("ok ") for v in wl.check().values())
    after = tree_frames(wl.root)["distinct_frames"]
    assert after > before * 1.5, f"strategy none: {after} frames after, {before} before"


def start(argv):
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/")


@pytest.fixture
def originals():
    procs = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def test_sleep_restored_in_pidns_keeps_sleeping(restored, originals, tmp_path):
    orig = start(["sleep", "1000"])
    originals.append(orig)
    time.sleep(0.3)
    rep = apply(plan(collect(orig.pid, kill=False)), tmp_path, restored, "--pidns")
    pid = outer(rep, orig.pid)
    time.sleep(1.0)
    assert proc_state(pid) == "S"
    with open(f"/proc/{pid}/status") as f:
        nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
    assert nspid == [str(pid), str(orig.pid)]
    with open(f"/proc/{pid}/wchan") as f:
        assert "nanosleep" in f.read()
    # exactly the dumped fds: nothing of cow-apply's (its stdin was the plan) leaked
    fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    assert fds == {0: "/dev/null", 1: "/dev/null", 2: "/dev/null"}
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "sleep"
    assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "sleep"


def counter(path, timeout=5):
    """The number a workload keeps writing at path; `echo n > path` truncates before it
    writes, so an empty read is asked again."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path) as f:
            words = f.read().split()
        if words or time.monotonic() > deadline:
            return int(words[0])
        time.sleep(0.01)


def progress(path, wait=1.5):
    first = counter(path)
    time.sleep(wait)
    return first, counter(path)


PY_SCRIPT = """
import sys, time
data = {i: str(i) * 10 for i in range(50000)}
n = 0
while True:
    n += 1
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{n} {sum(map(len, data.values()))}\\n")
    import os; os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(0.1)
"""


def test_python3_script_restored_in_pidns_keeps_running(restored, originals, tmp_path):
    script = tmp_path / "counter.py"
    script.write_text(PY_SCRIPT)
    out = tmp_path / "counter.out"
    orig = start(["python3", str(script), str(out)])
    originals.append(orig)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    images = collect(orig.pid)  # --kill: only the restored one writes from now on
    orig.wait(timeout=10)
    rep = apply(plan(images), tmp_path, restored, "--pidns")
    first, later = progress(out)
    assert later > first
    assert proc_state(outer(rep, orig.pid)) in RUNNING_STATES  # writes a file: D at times


def test_bash_loop_with_child_restored_in_pidns(restored, originals, tmp_path):
    out = tmp_path / "bash.out"
    orig = start(["bash", "-c", f"n=0; while true; do n=$((n+1)); echo $n > {out}; sleep 0.2; done"])
    originals.append(orig)
    time.sleep(0.5)
    images = collect(orig.pid)
    orig.wait(timeout=10)
    apply(plan(images), tmp_path, restored, "--pidns")
    first, later = progress(out)
    assert later > first


def test_saved_plan_replayed_later_with_pidns(restored, originals, tmp_path):
    orig = start(["sleep", "1000"])
    originals.append(orig)
    time.sleep(0.3)
    saved = tmp_path / "sleep.plan"
    saved.write_bytes(plan(collect(orig.pid)))
    orig.wait(timeout=10)
    time.sleep(0.5)
    for _ in range(2):  # the same file twice: two independent trees
        report = tmp_path / f"replay-{len(restored.reports)}.json"
        run([tool("cow-apply"), "-i", str(saved), "--pidns", "--report", str(report)])
        rep = restored.add(json.loads(report.read_text()))
        assert proc_state(outer(rep, orig.pid)) == "S"


def test_wait_returns_the_root_exit_status(restored, originals, tmp_path):
    orig = start(["sh", "-c", "sleep 1; exit 7"])
    originals.append(orig)
    time.sleep(0.2)
    images = collect(orig.pid)
    orig.wait(timeout=10)
    proc = run([tool("cow-apply"), "--pidns", "--wait"], plan(images), check=False)
    assert proc.returncode == 7, proc.stderr.decode()


def test_truncated_or_corrupted_plan_creates_nothing(tmp_path):
    from stages.stream import StreamWriter, plans

    header = {"kernel": os.uname().release, "arch": "x86_64", "page_size": 4096, "root_pid": 4,
              "vdso": {"layout": [], "sha256": ""}, "strategy": "exact",
              "window": {"base_hint": 0, "size": 4096}, "stats": {}}
    with open(tmp_path / "whole.plan", "wb") as f:
        w = StreamWriter(f, plans.FORMAT, header)
        w.close()
    whole = (tmp_path / "whole.plan").read_bytes()
    for bad in (whole[:-3], whole[:-1] + bytes([whole[-1] ^ 1]), b""):
        proc = run([tool("cow-apply")], bad, check=False)
        assert proc.returncode == 1
        assert proc.stderr.decode().startswith("cow-apply: bad plan stream")


def test_truncated_real_plan_is_refused_and_no_process_appears(originals, tmp_path):
    orig = start(["sleep", "1000"])
    originals.append(orig)
    time.sleep(0.3)
    whole = plan(collect(orig.pid))
    orig.wait(timeout=10)
    for cut in (len(whole) // 2, len(whole) - 1):
        proc = run([tool("cow-apply")], whole[:cut], check=False)
        assert proc.returncode == 1 and b"truncated" in proc.stderr or b"bad plan" in proc.stderr, proc.stderr
        assert not os.path.exists(f"/proc/{orig.pid}")
        # and no pid namespace init of cow-apply's was left behind: nothing we parented
        assert not [c for c in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()
                    if proc_state(int(c)) not in (None, "Z") and int(c) != orig.pid]


def rewrite_plan(plan_bytes, change, change_header=None):
    """The same plan with change(process record) applied to every process record."""
    import io

    from stages.stream import StreamReader, StreamWriter, plans

    reader = StreamReader(io.BytesIO(plan_bytes), expect=plans.FORMAT)
    out = io.BytesIO()
    header = {k: v for k, v in reader.header.items() if k not in ("format", "version")}
    if change_header:
        change_header(header)
    writer = StreamWriter(out, plans.FORMAT, header)
    for rec in reader:
        if rec.kind == "process":
            change(rec.body)
            writer.write("process", rec.body)
        else:
            writer.write_encoded(rec.kind, rec.meta, rec.data)
    writer.close()
    return out.getvalue()


def test_failure_in_the_restorer_kills_the_partial_tree(workload, tmp_path):
    wl = workload("chain", 1)
    images = collect(wl.root)
    assert wl.wait_gone(10)

    def unopenable_fd(proc):
        if proc["pid"] == wl.pids[-1]:  # the last process: the others are already created
            proc["image"]["fds"].append({"fd": 9, "kind": "dir", "path": "/", "flags": os.O_WRONLY})

    proc = run([tool("cow-apply")], rewrite_plan(plan(images), unopenable_fd), check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "restore failed" in err and "OP_OPEN_FD" in err and str(wl.pids[-1]) in err, err
    deadline = time.monotonic() + 10
    while any(proc_state(p) not in (None, "Z") for p in wl.pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(proc_state(p) in (None, "Z") for p in wl.pids), {p: proc_state(p) for p in wl.pids}


def test_restored_process_has_its_dumped_rseq_and_robust_list(restored, originals, tmp_path):
    from stages.linux import ptrace

    orig = start(["sleep", "1000"])
    originals.append(orig)
    time.sleep(0.3)
    plan_bytes = plan(collect(orig.pid))
    orig.wait(timeout=10)
    from stages.stream import StreamReader
    import io

    thread = [r.body for r in StreamReader(io.BytesIO(plan_bytes)) if r.kind == "process"][0]["image"]["threads"][0]
    rep = apply(plan_bytes, tmp_path, restored)
    pid = outer(rep, orig.pid)
    ptrace.seize(pid)
    try:
        ptrace.interrupt(pid)
        ptrace.waitpid(pid)
        addr, size, sig = ptrace.get_rseq_configuration(pid)
        assert (addr, size, sig) == (thread["rseq"]["addr"], thread["rseq"]["len"], thread["rseq"]["sig"])
        assert list(ptrace.get_robust_list(pid)) == list(thread["robust_list"])
    finally:
        ptrace.detach(pid)
    time.sleep(0.2)
    assert proc_state(pid) == "S"


def test_pids_in_use_are_refused_with_a_hint_for_pidns(originals):
    orig = start(["sleep", "1000"])
    originals.append(orig)
    time.sleep(0.3)
    proc = run([tool("cow-apply")], plan(collect(orig.pid, kill=False)), check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("cow-apply: ") and str(orig.pid) in err and "--pidns" in err, err
    assert proc_state(orig.pid) == "S"  # the original is untouched


DEEP_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static int rec(int n) { volatile char buf[1024]; memset((char *)buf, n, sizeof buf); return n ? rec(n - 1) + buf[5] : 0; }
int main(int c, char **v) {
    for (;;) {
        if (access(v[1], F_OK) == 0) {
            FILE *f = fopen(v[2], "w"); fprintf(f, "deep %d\n", rec(4000)); fclose(f); unlink(v[1]);
        }
        usleep(20000);
    }
}
"""


def test_restored_stack_still_grows(restored, originals, tmp_path):
    src, binary = tmp_path / "deep.c", tmp_path / "deep"
    src.write_text(DEEP_C)
    subprocess.run(["gcc", "-O0", "-o", str(binary), str(src)], check=True, timeout=TIMEOUT)
    go, out = tmp_path / "go", tmp_path / "out"
    orig = start([str(binary), str(go), str(out)])
    originals.append(orig)
    time.sleep(0.3)
    images = collect(orig.pid)
    orig.wait(timeout=10)
    rep = apply(plan(images), tmp_path, restored, "--pidns")
    pid = outer(rep, orig.pid)
    go.write_text("")
    deadline = time.monotonic() + 10
    while not out.exists() and proc_state(pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)
    assert out.read_text().startswith("deep "), f"state {proc_state(pid)}"  # 4 MiB of stack, 132 KiB dumped
    assert proc_state(pid) in RUNNING_STATES  # it wakes every 20 ms: R at times


PREFORK = """
import os, time
data = {i: str(i) * 10 for i in range(100000)}
for k in range(3):
    if os.fork() == 0:
        while True:
            n = sum(1 for v in data.values() if v)  # touches every refcount
            time.sleep(0.1)
while True:
    time.sleep(0.1)
"""


def test_python3_prefork_tree_restored_exact_with_no_more_frames(restored, originals, tmp_path):
    from tests.support.workloads import become_subreaper, tree_pids

    become_subreaper()  # the children of the killed original come back to us to be reaped
    script = tmp_path / "prefork.py"
    script.write_text(PREFORK)
    orig = start(["python3", str(script)])
    originals.append(orig)
    deadline = time.monotonic() + 10
    while len(tree_pids(orig.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    pids = tree_pids(orig.pid)
    assert len(pids) == 4
    before = tree_frames(orig.pid)["distinct_frames"]
    images = collect(orig.pid)
    orig.wait(timeout=10)
    for pid in pids[1:]:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    rep = apply(plan(images), tmp_path, restored)
    time.sleep(1.0)
    assert sorted(tree_pids(orig.pid)) == sorted(pids)
    assert all(proc_state(p) in RUNNING_STATES for p in pids)
    after = tree_frames(orig.pid)["distinct_frames"]
    assert after <= before, f"{after} frames after restore, {before} before"
    assert rep["pages_written"] < before  # shared pages were written once, not per process


def test_incompatible_vdso_or_changed_file_is_refused_before_anything_runs(originals):
    orig = start(["sleep", "1000"])
    originals.append(orig)
    time.sleep(0.3)
    good = plan(collect(orig.pid))
    orig.wait(timeout=10)

    def other_vdso(header):
        header["vdso"]["sha256"] = "0" * 64

    def other_inode(proc):
        for vma in proc["layout"]:
            if vma["kind"] == "file":
                vma["ino"] = vma["ino"] + 1
                return

    for bad, words in ((rewrite_plan(good, lambda p: None, other_vdso), "vDSO"),
                       (rewrite_plan(good, other_inode), "different file")):
        proc = run([tool("cow-apply")], bad, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.startswith("cow-apply: ") and words in err, err
        assert not os.path.exists(f"/proc/{orig.pid}")
