"""cow-apply's page writes (stages/apply/fill.py) into real agent processes: new pages by
userfaultfd, pages a process has by process_vm_writev or dropped and made anew; contents and
copy-on-write sharing checked from outside (process_vm_readv, pagemap PFNs)."""

import array
import mmap
import os
import signal

import pytest

from stages.apply import agent as A
from stages.apply.fill import MIN_DROP_RUN, Filler
from stages.linux import pagemap
from stages.stream import pack_u32
from tests.test_apply_tree import free_pid
from tests.support.workloads import read_mem

PAGE = 4096
BASE = 0x500000000000
NPAGES = 64
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED = 0x02, 0x20, 0x10


class Spool:
    """What Filler needs of a Plan: the mapped spool and frame id -> offset."""

    def __init__(self, nframes, path):
        with open(path, "wb") as f:
            for frame in range(1, nframes + 1):
                f.write(frame.to_bytes(4, "little") * (PAGE // 4))
        self.fd = os.open(path, os.O_RDONLY)
        self.map = mmap.mmap(self.fd, nframes * PAGE, prot=mmap.PROT_READ)
        self.frame_offsets = array.array("Q", [0] + [(f - 1) * PAGE for f in range(1, nframes + 1)])

    def close(self):
        self.map.close()
        os.close(self.fd)


def read_page(pid, page):
    """Through /proc/PID/mem: process_vm_readv pins the page, and pinning a page shared
    copy-on-write unshares it (the reader would break the sharing it looks at)."""
    return read_mem(pid, BASE + page * PAGE, PAGE)


def frame_of(pid, page):
    data = read_page(pid, page)
    assert data == data[:4] * (PAGE // 4), f"page {page} of {pid} is not one frame's bytes"
    return int.from_bytes(data[:4], "little")


def pfns(pid, pages):
    fd = pagemap.open_pagemap(pid)
    try:
        entries = pagemap.read_entries(fd, BASE, BASE + NPAGES * PAGE)
    finally:
        os.close(fd)
    return [entries[p] & pagemap.PFN_MASK if entries[p] & pagemap.PRESENT else None for p in pages]


@pytest.fixture
def agents():
    made = []
    yield made
    for ag, ch in made:
        try:
            os.kill(ag.pid, signal.SIGKILL)
        except OSError:
            pass
    for ag, ch in made:
        try:
            os.waitpid(ag.pid, 0)
        except ChildProcessError:
            pass
        ch.close()


@pytest.mark.parametrize("use_uffd", [True, False], ids=["userfaultfd", "process_vm_writev"])
def test_fill_new_pages_then_overwrite_after_fork_keeps_the_parents_and_the_sharing(tmp_path, agents, use_uffd):
    spool = Spool(200, tmp_path / "spool")
    ranges = {1: {"id": 1, "offset": 0, "size": NPAGES * PAGE, "backing": "anon"}}
    filler = Filler(ranges, spool, BASE, use_uffd=use_uffd)
    parent_ch, child_ch = A.Channel(), A.Channel()
    try:
        parent = A.Agent(A.spawn(parent_ch), parent_ch)
        agents.append((parent, parent_ch))
        parent.mmap(BASE, NPAGES * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        filler.mapped(1, 1)
        # new pages: 0..47 (frames 1..48, one run), and 50, 52 (scattered)
        filler.write(parent, 1, 1, pack_u32([x for p in range(48) for x in (p, p + 1)] + [50, 100, 52, 101]))
        filler.forked(1, 2)
        child = A.Agent(parent.fork(free_pid(), child_ch), child_ch)
        agents.append((child, child_ch))
        # the child rewrites a long run it shares (0..MIN_DROP_RUN+3), two single shared
        # pages (30, 50) and one page it does not have (60)
        long_run = list(range(MIN_DROP_RUN + 4))
        steps = [(p, 150 + p) for p in long_run] + [(30, 180), (50, 181), (60, 182)]
        filler.write(child, 2, 1, pack_u32([x for p, f in steps for x in (p, f)]))
        # the parent writes a page after the fork (still new to it, not present in the child)
        filler.write(parent, 1, 1, pack_u32([55, 190]))
        stats = filler.stats()
        filler.done(2)
        filler.done(1)
        assert filler.uffd == {}
        assert stats["userfaultfd_processes"] == (2 if use_uffd else 0)
        if use_uffd:
            assert stats["pages_dropped"] == len(long_run)
            assert stats["pages_overwritten"] == 2  # pages 30 and 50
        else:
            assert stats["pages_dropped"] == 0 and stats["pages_overwritten"] == stats["pages_written"]
        assert stats["pages_written"] == 50 + len(steps) + 1

        want_parent = {p: p + 1 for p in range(48)}
        want_parent.update({50: 100, 52: 101, 55: 190})
        want_child = {p: p + 1 for p in range(48)}
        want_child.update({50: 100, 52: 101})
        want_child.update(dict(steps))
        for p, f in want_parent.items():
            assert frame_of(parent.pid, p) == f, ("parent", p)
        for p, f in want_child.items():
            assert frame_of(child.pid, p) == f, ("child", p)
        # pages nobody wrote are still missing, so they read as zeros
        assert read_page(child.pid, 49) == bytes(PAGE)
        # sharing: what the child did not write is the parent's very page; what it wrote is its own
        untouched = [p for p in want_child if p not in dict(steps)]
        assert pfns(child.pid, untouched) == pfns(parent.pid, untouched)
        written = sorted(dict(steps))
        mine, theirs = pfns(child.pid, written), pfns(parent.pid, written)
        assert all(m is not None for m in mine)
        assert all(m != t for m, t in zip(mine, theirs))
        assert len(set(mine)) == len(mine)
    finally:
        filler.close_all()
        spool.close()


def test_a_write_out_of_the_range_or_of_an_unknown_frame_is_refused(tmp_path, agents):
    spool = Spool(4, tmp_path / "spool")
    ranges = {1: {"id": 1, "offset": 0, "size": 8 * PAGE, "backing": "anon"}}
    filler = Filler(ranges, spool, BASE)
    ch = A.Channel()
    try:
        ag = A.Agent(A.spawn(ch), ch)
        agents.append((ag, ch))
        ag.mmap(BASE, 8 * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        filler.mapped(1, 1)
        for pairs in ([8, 1], [0, 5], [0, 0]):
            with pytest.raises(OSError, match="Numerical result out of range"):
                filler.write(ag, 1, 1, pack_u32(pairs))
    finally:
        filler.close_all()
        spool.close()
