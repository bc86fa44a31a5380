"""Shared memory across the tree (issue 6): MAP_SHARED anonymous memory inherited over fork
(a parent and four children), a memfd shared by two processes and held as an fd, a /dev/shm
file mapped MAP_SHARED by two processes, python's multiprocessing Array and Lock.

Each is dumped, the tree killed, planned and restored; then, from outside: every process
still counts in its own slot of the shared region and the others see those counts; a
write through one process's mapping (/proc/PID/mem) is seen in every other's; the
restored objects hold as many frames as before, and the private frames are what the plan
made (at most as many as before: it merges some frames of equal bytes)."""

import json
import os
import struct
import subprocess
import sys
import time

import pytest

from stages._native import lib
from stages.linux import memstat
from tests.support.commands import run, tool
from tests.support.workloads import (RUNNING_STATES, Trees, become_subreaper, build, proc_state, read_mem, wait_file,
                                     wait_killed, write_mem)

PAGE = 4096
SYS_KCMP, KCMP_FILE = 312, 0
SLOTS = 8  # counters at the start of the region, one u64 per process

# tests/workloads/shmwl.c: a 64-page region, counters in page 0, pages 1..39 = their number,
# 40..63 untouched; 256 private pages shared COW, 4 rewritten per child.


@pytest.fixture
def tree():
    become_subreaper()
    t = Trees()
    yield t
    t.kill_all()


def start(tree, tmp_path, mode, children):
    ready = str(tmp_path / "ready")
    popen = subprocess.Popen([build("shmwl"), mode, str(tmp_path), str(children)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             close_fds=True, start_new_session=True)
    tree.popens.append(popen)
    wait_file(ready)
    fields = [int(x) for x in open(ready).read().split()]
    pids = fields[: children + 1]
    tree.pids.update(pids)
    return popen, pids, (fields[children + 1] if len(fields) > children + 1 else None)


def region_of(pid, path_part, npages=64):
    """(start, end, dev, ino, path, pgoff) of pid's MAP_SHARED mapping of npages pages whose path
    contains path_part."""
    for line in open(f"/proc/{pid}/maps"):
        parts = line.split(None, 5)
        if parts[1][3] == "s" and len(parts) > 5 and path_part in parts[5]:
            a, b = (int(x, 16) for x in parts[0].split("-"))
            if b - a == npages * PAGE:
                return a, b, parts[3], int(parts[4]), parts[5].strip(), int(parts[2], 16)
    raise AssertionError(f"process {pid}: no shared mapping of {path_part}")


def counters(pid, addr):
    return struct.unpack(f"<{SLOTS}Q", read_mem(pid, addr, 8 * SLOTS))


def check_shared_and_counting(pids, path_part, nprocs):
    """Every process maps one object (same dev:ino); every process's counter moves, as seen
    through the first process's mapping; a write through one mapping is seen in all."""
    regions = [region_of(p, path_part) for p in pids]
    assert len({(r[2], r[3]) for r in regions}) == 1, regions
    first = counters(pids[0], regions[0][0])
    time.sleep(0.3)
    later = counters(pids[0], regions[0][0])
    assert all(later[k] > first[k] for k in range(nprocs)), (first, later)
    # a write through the last process's mapping shows in every process (page 63: a hole)
    marker = os.urandom(16)
    write_mem(pids[-1], regions[-1][0] + 63 * PAGE, marker)
    for p, r in zip(pids, regions):
        assert read_mem(p, r[0] + 63 * PAGE, 16) == marker, p
    for p, r in zip(pids, regions):
        for page in (1, 17, 39):
            assert read_mem(p, r[0] + page * PAGE, PAGE) == bytes([page]) * PAGE
        assert read_mem(p, r[0] + 40 * PAGE, PAGE) == bytes(PAGE)
    return regions


def dump_kill_restore(tree, popen, pids, tmp_path, pidns=False, plan_file=False):
    """Dump; kill the original (with pidns: leave it running, restore beside it); plan; apply
    (plan_file: from a plan file, whose pages cow-apply uses in place; else from a pipe)."""
    images = run([tool("cow-collect"), "--tree", str(pids[0])] + ([] if pidns else ["--kill"])).stdout
    if not pidns:
        wait_killed(popen, pids)
    stats = tmp_path / "stats.json"
    plan = run([tool("cow-plan"), "--check", "--stats", str(stats)], images).stdout
    report = tmp_path / "apply.json"
    args = [tool("cow-apply"), "--report", str(report)] + (["--pidns"] if pidns else [])
    if plan_file:
        (tmp_path / "plan.cow").write_bytes(plan)
        run(args + ["-i", str(tmp_path / "plan.cow")])
    else:
        run(args, plan)
    rep = json.loads(report.read_text())
    outer = [int(rep["pids"][str(p)]) for p in pids]
    tree.pids.update(outer + ([rep["init_pid"]] if rep.get("init_pid") else []))
    stats = json.loads(stats.read_text())
    # cow-apply created each object once and wrote its pages once, whatever the processes
    assert (rep["shmem_objects"], rep["shmem_pages_written"]) == (stats.get("shmem_objects", 0),
                                                                  stats.get("shmem_pages", 0))
    return images, outer, stats


def frames(pid):
    m = memstat.tree_frames(pid)
    return m["distinct_frames"], m["shared_objects"], m["shared_frames"]


def check_frames(before, after, stats):
    """Shared: the same objects holding the same number of frames.  Private: what the plan
    made (it merges some frames of equal bytes), at most as many as before (a few stack
    pages may have been copied again since the release)."""
    assert after[1:] == before[1:], (before, after)
    assert stats["frames_in_images"] == before[0]
    assert stats["frames_planned"] <= after[0] <= before[0], (before, after, stats)


@pytest.mark.parametrize("pidns", [False, True], ids=["same-pids", "pidns"])
def test_shared_anonymous_region_of_parent_and_four_children(tree, tmp_path, pidns):
    popen, pids, _ = start(tree, tmp_path, "anon", 4)
    check_shared_and_counting(pids, "/dev/zero", 5)
    before = frames(pids[0])
    # two objects: the counters, 39 pattern pages, page 40 (read from outside), the marker;
    # and the second region's 8 pages (2 of them no longer mapped: still held by the object)
    assert before[1:] == (2, 50), before
    # --pidns: the plan from a file (its shmem pages used in place), else from a pipe
    images, outer, stats = dump_kill_restore(tree, popen, pids, tmp_path, pidns, plan_file=pidns)
    shown = run([tool("cow-show")], images).stdout.decode()
    assert "shared memory 1: anon, 262144 bytes, 42 pages dumped" in shown, shown
    assert "shared memory 2: anon, 32768 bytes, 8 pages dumped" in shown, shown
    assert (outer == pids) != pidns
    regions = check_shared_and_counting(outer, "/dev/zero (deleted)", 5)
    if pidns:  # the original runs on with its own object
        assert {region_of(p, "/dev/zero")[3] for p in pids} != {r[3] for r in regions}
    seconds = [region_of(p, "/dev/zero", 6) for p in outer]
    assert len({r[3] for r in seconds}) == 1 and all(r[5] == 2 * PAGE for r in seconds), seconds
    for p, r in zip(outer, seconds):
        assert read_mem(p, r[0], PAGE) == bytes([0x42]) * PAGE  # object page 2
        assert read_mem(p, r[0] + 5 * PAGE, PAGE) == bytes([0x47]) * PAGE
    assert regions[0][4] == "/dev/zero (deleted)"
    check_frames(before, frames(outer[0]), stats)
    assert all(proc_state(p) in RUNNING_STATES for p in outer)
    table = run([tool("cow-mem"), str(outer[0])]).stdout.decode()
    assert "shared memory: 2 objects holding 50 frames;" in table, table
    if not pidns:  # dumped again, the restored tree has the same objects with the same pages
        again = run([tool("cow-show")], run([tool("cow-collect"), "--tree", str(outer[0])]).stdout).stdout.decode()
        assert [ln for ln in again.splitlines() if ln.startswith("shared memory")] == \
            [ln for ln in shown.splitlines() if ln.startswith("shared memory")]


def test_memfd_shared_by_two_processes_and_held_as_fd(tree, tmp_path):
    popen, pids, fd = start(tree, tmp_path, "memfd", 1)
    check_shared_and_counting(pids, "/memfd:cowtree-test", 2)
    before = frames(pids[0])
    assert before[1:] == (1, 42), before
    _, outer, stats = dump_kill_restore(tree, popen, pids, tmp_path)
    regions = check_shared_and_counting(outer, "/memfd:cowtree-test", 2)
    for p, r in zip(outer, regions):
        st = os.stat(f"/proc/{p}/fd/{fd}")
        assert os.readlink(f"/proc/{p}/fd/{fd}") == "/memfd:cowtree-test (deleted)"
        assert st.st_ino == r[3]  # the fd is the mapped object
        with open(f"/proc/{p}/fdinfo/{fd}") as f:
            assert f.readline().split() == ["pos:", "1234"]
    # the child inherited the fd: one open file description, as before the dump
    assert lib.cow_syscall6(SYS_KCMP, outer[0], outer[1], KCMP_FILE, fd, fd, 0) == 0
    check_frames(before, frames(outer[0]), stats)


def test_dev_shm_file_mapped_by_two_processes(tree, tmp_path):
    path = f"/dev/shm/cowtree-test-{os.getpid()}"
    try:
        popen, pids, _ = start(tree, tmp_path, path, 1)
        check_shared_and_counting(pids, path, 2)
        before = frames(pids[0])
        images, outer, stats = dump_kill_restore(tree, popen, pids, tmp_path)
        shown = run([tool("cow-show")], images).stdout.decode()
        assert "shared memory" not in shown  # the file holds the data: nothing dumped
        regions = check_shared_and_counting(outer, path, 2)
        assert regions[0][3] == os.stat(path).st_ino
        assert before[1:] == (1, 42), before
        check_frames(before, frames(outer[0]), stats)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


MULTIPROCESSING = r"""
import multiprocessing as mp, os, sys, time
out = sys.argv[1]
ctx = mp.get_context("fork")
counts = ctx.Array("q", 3)  # a heap arena: a deleted file in /dev/shm, mapped and kept open
def work(i):
    while True:
        with counts.get_lock():  # a POSIX semaphore: a deleted /dev/shm/sem.* file, mapped
            counts[i] += 1
        time.sleep(0.002)
children = [ctx.Process(target=work, args=(i,), daemon=True) for i in (1, 2)]
for c in children:
    c.start()
open(out + ".pids.tmp", "w").write(" ".join(str(p) for p in [os.getpid()] + [c.pid for c in children]))
os.rename(out + ".pids.tmp", out + ".pids")
while True:
    with counts.get_lock():
        counts[0] += 1
        line = " ".join(map(str, counts[:]))
    with open(out + ".tmp", "w") as f:
        f.write(line)
    os.rename(out + ".tmp", out)  # what the parent sees of every counter
    time.sleep(0.01)
"""


def test_python_multiprocessing_shared_array_and_lock(tree, tmp_path):
    out = str(tmp_path / "counts")
    popen = subprocess.Popen([sys.executable, "-c", MULTIPROCESSING, out], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                             start_new_session=True)
    tree.popens.append(popen)
    wait_file(out + ".pids")
    pids = [int(x) for x in open(out + ".pids").read().split()]
    tree.pids.update(pids)

    def seen():
        return [int(x) for x in open(out).read().split()]

    time.sleep(0.2)
    before = frames(pids[0])
    assert before[1] == 2, before  # the arena and the semaphore
    first = seen()
    images, outer, stats = dump_kill_restore(tree, popen, pids, tmp_path)
    shown = run([tool("cow-show")], images).stdout.decode()
    assert "shared memory 2: deleted tmpfs file /dev/shm/pym-" in shown, shown  # the arena
    assert "shared memory 1: deleted tmpfs file /dev/shm/sem." in shown, shown  # the lock
    assert outer == pids
    at_restore = seen()
    time.sleep(0.5)
    later = seen()
    # the parent sees every child's counter move on after the restore
    assert all(b > a for a, b in zip(at_restore, later)), (first, at_restore, later)
    assert frames(outer[0])[1:] == before[1:]

