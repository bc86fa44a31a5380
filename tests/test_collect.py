"""cow-collect on real process trees (tests/workloads/cowload.c), checked against the kernel."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from stages.collect.pages import PAGER_MIN_PAGES
from stages.linux.memory import ProcessMemory
from stages.linux.memstat import tree_frames
from tests.support.images import PAGE, Images, rseq_pages, without_rseq
from tests.support.workloads import (PATTERNS, RUNNING_STATES, Trees, become_subreaper, children_of,  # noqa: F401
                                     proc_state, workload)

COLLECT = [sys.executable, "-m", "stages.collect.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collect(root, *args, out=None, timeout=60):
    argv = COLLECT + ["--tree", str(root)] + (["-o", str(out)] if out else []) + list(args)
    return subprocess.run(argv, capture_output=True, timeout=timeout, cwd=ROOT)


def traced_by(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])


def region_vma(images, pid):
    """The VMA of pid that holds the workload region: its largest anonymous VMA with frames."""
    anon = [v for v in images.vmas[pid] if v["kind"] == "anon" and v["ids"]]
    return max(anon, key=lambda v: v["end"] - v["start"])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_collect_pattern(workload, tmp_path, pattern):
    wl = workload(pattern, mib=4)
    before = tree_frames(wl.root)
    out = tmp_path / "images.cow"
    # left stopped, so that memory can be compared with the image: a running process's
    # rseq area is rewritten by the kernel whenever it moves to another CPU
    res = collect(wl.root, "--leave-stopped", out=out)
    assert res.returncode == 0, res.stderr.decode()
    after = tree_frames(wl.root)
    img = Images(out)

    # the tree as dumped: every process, parents first
    assert sorted(img.pids) == sorted(wl.pids)
    assert img.pids[0] == wl.root
    seen = set()
    for p in img.processes:
        assert p["pid"] == wl.root or p["ppid"] in seen
        seen.add(p["pid"])
        assert len(p["sigactions"]) == 64
        assert p["sigactions"][signal.SIGUSR1 - 1][0] != 0 and p["sigactions"][signal.SIGTERM - 1][0] != 0
        (t,) = p["threads"]
        assert t["tid"] == p["pid"] and len(t["regs"]) == 27 * 8 and t["xstate"]
        assert t["rseq"]["addr"] and t["tid_address"] and t["robust_list"][0]
        assert p["mm"]["start_code"] < p["mm"]["end_code"] and p["mm"]["brk"] >= p["mm"]["start_brk"]
        assert len(p["auxv"]) % 16 == 0 and p["auxv"]
        assert [fd["fd"] for fd in p["fds"]] == [0, 1, 2]
        assert all(fd["kind"] == "chr" and fd["path"] == "/dev/null" for fd in p["fds"])

    # frames: exactly the kernel's distinct anonymous PFNs, ids dense 1..N
    ids = img.frame_ids()
    n = img.trailer["summary"]["frames"]
    assert ids == set(range(1, n + 1))
    assert n == before["distinct_frames"] == after["distinct_frames"]
    firsts = [f for f, _ in img.pages_records]
    assert firsts == list(range(1, n + 1, 256)) and sum(c for _, c in img.pages_records) == n

    # each distinct content once: the stream is the stored pages plus a little metadata
    size = os.path.getsize(out)
    assert img.stored == img.trailer["summary"]["stored_pages"] <= n
    assert img.stored * PAGE <= size <= img.stored * PAGE * 1.03 + 128 * 1024
    # (a frame holding an rseq area may be kept apart from an equal one: its cpu fields are
    # rewritten by the kernel while collect reads the tree, so it is never merged into)
    rseq = rseq_pages(img)
    rseq_frames = {v["ids"][(a - v["start"]) // PAGE] for p in img.processes for v in img.vmas[p["pid"]]
                   for a in rseq.get(p["pid"], {}) if v["ids"] and v["start"] <= a < v["end"]}
    contents = [img.content[f] for f in img.stored_ids if f not in rseq_frames]
    assert len(set(contents)) == len(contents)
    assert len(set(img.content[f] for f in ids)) <= img.stored

    # frame bytes are what the (stopped) processes hold, stack included (but the rseq cpu
    # fields, which the kernel rewrites when cow-collect's pager runs in the process)
    assert set(wl.states().values()) == {"T"}
    for p in img.processes:
        with ProcessMemory(p["pid"]) as mem:
            for v in img.vmas[p["pid"]]:
                if not v["ids"]:
                    continue
                live = mem.read(v["start"], v["end"] - v["start"])
                for i, fid in enumerate(v["ids"]):
                    if fid:
                        at = rseq.get(p["pid"], {}).get(v["start"] + i * PAGE)
                        assert without_rseq(live[i * PAGE:(i + 1) * PAGE], at) == without_rseq(img.content[fid], at), \
                            (p["pid"], hex(v["start"]), i)
    assert all(img.crc_ok(f) for f in ids)

    # and the tree runs on with its memory intact
    for pid in wl.pids:
        os.kill(pid, signal.SIGCONT)
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_default_resumes_the_tree(workload, tmp_path):
    wl = workload("orphans", mib=4)
    res = collect(wl.root, out=tmp_path / "images.cow")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stderr == b""
    assert all(traced_by(pid) == 0 for pid in wl.pids)
    assert all(state in RUNNING_STATES for state in wl.states().values())
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_same_children_share_all_but_their_rewrites(workload, tmp_path):
    wl = workload("same", mib=4)
    out = tmp_path / "images.cow"
    assert collect(wl.root, out=out).returncode == 0
    img = Images(out)
    root_ids = region_vma(img, wl.root)["ids"]
    for pid in img.pids[1:]:
        ids = region_vma(img, pid)["ids"]
        assert len(ids) == len(root_ids)
        differ = [i for i, (a, b) in enumerate(zip(root_ids, ids)) if a != b]
        # 3 rewritten pages, plus at most the 3 glibc pages that share the VMA with the region
        assert 3 <= len(differ) <= 6, differ


def test_moved_region_keeps_its_frames(workload, tmp_path):
    wl = workload("moved", mib=4)
    out = tmp_path / "images.cow"
    assert collect(wl.root, out=out).returncode == 0
    img = Images(out)
    root_vma = region_vma(img, wl.root)
    root_frames = set(root_vma["ids"]) - {0}
    # the mover: its 1024-page region VMA is somewhere else
    moved = [(pid, v) for pid in img.pids[1:] for v in img.vmas[pid]
             if v["kind"] == "anon" and v["end"] - v["start"] == 1024 * PAGE and v["start"] != root_vma["start"]]
    assert len(moved) == 1
    pid, vma = moved[0]
    shared = [f for f in vma["ids"] if f in root_frames]
    assert len(shared) == 1024 - 2  # all but the two pages the mover rewrote


def test_output_file_is_private(workload, tmp_path):
    wl = workload("same", mib=1)
    out = tmp_path / "images.cow"
    assert collect(wl.root, out=out).returncode == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_stdout_and_progress(workload, tmp_path):
    wl = workload("chain", mib=4)
    res = collect(wl.root, "--progress")
    assert res.returncode == 0, res.stderr.decode()
    (tmp_path / "x.cow").write_bytes(res.stdout)
    img = Images(tmp_path / "x.cow")
    assert img.trailer["summary"]["frames"] == tree_frames(wl.root)["distinct_frames"]
    err = res.stderr.decode()
    assert f"pages {img.trailer['summary']['frames']}/{img.trailer['summary']['frames']}" in err
    assert "MiB/s" in err


def test_kill_removes_the_tree_after_the_stream(workload, tmp_path):
    wl = workload("orphans", mib=4)
    out = tmp_path / "images.cow"
    res = collect(wl.root, "--kill", out=out)
    assert res.returncode == 0, res.stderr.decode()
    img = Images(out)  # complete and valid
    assert sorted(img.pids) == sorted(wl.pids)
    # when cow-collect returns every process is dead: gone, or a zombie waiting for its parent
    assert all(proc_state(pid) in (None, "Z") for pid in wl.pids)
    # this test is the root's parent and reaps nothing meanwhile: told, with the parent
    assert f"process {wl.root} is dead but not yet reaped by its parent {os.getpid()}" in res.stderr.decode()
    assert wl.wait_gone(timeout=5)


REAPER = """
import os, subprocess, sys
child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
child.wait()  # reaps it the moment it dies
print("reaped", flush=True)
sys.stdin.read()
"""


def test_kill_waits_for_a_parent_that_reaps(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", REAPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        child = int(parent.stdout.readline())
        res = collect(child, "--kill", out=tmp_path / "images.cow")
        assert res.returncode == 0, res.stderr.decode()
        assert res.stderr == b""  # reaped while cow-collect waited: no note
        assert parent.stdout.readline() == "reaped\n"
        assert proc_state(child) is None
    finally:
        parent.kill()
        parent.wait()


def test_leave_stopped(workload, tmp_path):
    wl = workload("split", mib=4)
    res = collect(wl.root, "--leave-stopped", out=tmp_path / "images.cow")
    assert res.returncode == 0, res.stderr.decode()
    assert set(wl.states().values()) == {"T"}
    assert all(traced_by(pid) == 0 for pid in wl.pids)
    for pid in wl.pids:
        os.kill(pid, signal.SIGCONT)
    assert all(v.startswith("ok ") for v in wl.check().values())


def wait_states(pids, states, timeout=10):
    """Wait until every pid is in one of states (a detached or continued process takes a
    moment to get there)."""
    deadline = time.monotonic() + timeout
    while any(proc_state(pid) not in states for pid in pids):
        assert time.monotonic() < deadline, {pid: proc_state(pid) for pid in pids}
        time.sleep(0.005)


def stop(pids):
    """SIGSTOP each pid and wait until it is in group-stop (state T)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    wait_states(pids, ("T",))


def stopped_in(images):
    return {p["pid"] for p in images.processes if p.get("state", {}).get("stopped")}


def own_frames(images, pid):
    """How many frames are first seen in pid (stream order): the pages its pager would give."""
    seen = set()
    for p in images.processes:
        ids = {i for v in images.vmas[p["pid"]] if v["ids"] for i in v["ids"]} - {0}
        if p["pid"] == pid:
            return len(ids - seen)
        seen |= ids


@pytest.fixture
def trees():
    become_subreaper()
    t = Trees()
    yield t
    assert t.kill_all()


def test_a_stopped_sleep_is_collected_and_stays_stopped(trees, tmp_path):
    """kill -STOP then cow-collect: done (it hung with the tree frozen), still stopped after."""
    p = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    trees.popens.append(p)
    stop([p.pid])
    out = tmp_path / "images.cow"
    res = collect(p.pid, out=out, timeout=30)
    assert res.returncode == 0, res.stderr.decode()
    wait_states([p.pid], ("T",))
    assert traced_by(p.pid) == 0
    assert stopped_in(Images(out)) == {p.pid}
    os.kill(p.pid, signal.SIGCONT)
    wait_states([p.pid], RUNNING_STATES)


def test_stopped_processes_are_collected_and_stay_stopped(workload, tmp_path):
    """A middle process (8 MiB, half its own: read by a pager) and a leaf (a few pages of its
    own: no pager) group-stopped: collected in full, still stopped and untraced afterwards;
    the others run on."""
    wl = workload("chain", mib=8)
    (middle,) = children_of(wl.root)
    leaf = children_of(middle)[0]
    stop([middle, leaf])
    out = tmp_path / "images.cow"
    res = collect(wl.root, out=out, timeout=30)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stderr == b""  # no process read without its pager
    img = Images(out)
    assert sorted(img.pids) == wl.pids
    assert stopped_in(img) == {middle, leaf}
    assert own_frames(img, middle) >= PAGER_MIN_PAGES > own_frames(img, leaf)
    wait_states([middle, leaf], ("T",))
    assert all(proc_state(pid) in RUNNING_STATES for pid in wl.pids if pid not in (middle, leaf)), wl.states()
    assert all(traced_by(pid) == 0 for pid in wl.pids)
    for pid in (middle, leaf):
        os.kill(pid, signal.SIGCONT)
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_leave_stopped_then_collect_again(workload, tmp_path):
    """The tree --leave-stopped leaves (state T) collected again, twice: it stays stopped."""
    wl = workload("same", mib=4)
    res = collect(wl.root, "--leave-stopped", out=tmp_path / "a.cow", timeout=30)
    assert res.returncode == 0, res.stderr.decode()
    wait_states(wl.pids, ("T",))
    assert stopped_in(Images(tmp_path / "a.cow")) == set()  # running when it was dumped
    for name, args in (("b.cow", ()), ("c.cow", ("--leave-stopped",))):
        res = collect(wl.root, *args, out=tmp_path / name, timeout=30)
        assert res.returncode == 0, res.stderr.decode()
        wait_states(wl.pids, ("T",))
        assert all(traced_by(pid) == 0 for pid in wl.pids)
        assert stopped_in(Images(tmp_path / name)) == set(wl.pids)
    for pid in wl.pids:
        os.kill(pid, signal.SIGCONT)
    assert set(wl.check().values()) == {f"ok {s}" for s in wl.sums().values()}


def test_collect_twice_gives_the_same_frames(workload, tmp_path):
    wl = workload("rewrote", mib=4)
    for name in ("a.cow", "b.cow"):
        assert collect(wl.root, out=tmp_path / name).returncode == 0
    a, b = Images(tmp_path / "a.cow"), Images(tmp_path / "b.cow")
    for pid in wl.pids:
        assert [v["ids"] for v in a.vmas[pid] if v["kind"] != "stack"] == \
               [v["ids"] for v in b.vmas[pid] if v["kind"] != "stack"]


def test_broken_pipe_resumes_the_tree(workload):
    wl = workload("same", mib=16)
    proc = subprocess.Popen(COLLECT + ["--tree", str(wl.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # the reader goes away before the stream is written
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"broken pipe" in err
    assert all(traced_by(pid) == 0 for pid in wl.pids)
    assert all(v.startswith("ok ") for v in wl.check().values())


def test_bad_pid(tmp_path):
    out = tmp_path / "x.cow"
    res = collect(4194303, out=out)
    assert res.returncode == 1
    assert b"process 4194303" in res.stderr
    assert not out.exists()


def test_usage_error_exit_code():
    res = subprocess.run(COLLECT + ["--tree", "1", "--kill", "--leave-stopped"], capture_output=True, cwd=ROOT)
    assert res.returncode == 64


def test_a_tree_holding_cow_collect_is_refused(tmp_path):
    # the shell is the root, cow-collect its child: freezing it would freeze ourselves
    out = tmp_path / "x.cow"
    res = subprocess.run(["sh", "-c", f'{" ".join(COLLECT)} --tree $$ -o {out}; echo "rc=$?"'],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "rc=1" in res.stdout
    assert "contains this process" in res.stderr
    assert not out.exists()


def test_frame_runs_split_at_record_boundaries():
    from stages.collect.frames import FrameTable
    table = FrameTable(zero_pfn=0)
    table.runs = [[1, 0, 0x1000, 300], [301, 1, 0x900000, 5], [306, 0, 0x200000, 1]]
    table.count = 306
    assert table.runs_between(1, 256) == [(0, 0x1000, 256)]
    assert table.runs_between(257, 50) == [(0, 0x1000 + 256 * PAGE, 44), (1, 0x900000, 5), (0, 0x200000, 1)]
    assert table.runs_between(303, 2) == [(1, 0x900000 + 2 * PAGE, 2)]
    assert table.runs_between(306, 1) == [(0, 0x200000, 1)]
