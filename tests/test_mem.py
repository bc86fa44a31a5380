"""cow-mem and its measurement function, on real trees."""

import contextlib
import json
import os
import subprocess
import sys

from stages.linux.memstat import tree_frames
from tests.support.workloads import workload  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES_PER_MIB = 256


def cow_mem(*args):
    return subprocess.run([sys.executable, "-m", "stages.tools.mem", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_shared_pages_count_once(workload):
    wl = workload("same", mib=8)
    m = tree_frames(wl.root)
    assert sorted(p["pid"] for p in m["processes"]) == sorted(wl.pids)
    region = 8 * PAGES_PER_MIB
    # four processes map the region; each child rewrote 3 pages
    assert m["anon_pages"] >= 4 * region
    assert region + 9 <= m["distinct_frames"] < region + 9 + 4 * 64  # plus a little libc/stack per process
    # Pss splits shared pages between their holders: its sum is close to the distinct frames
    assert abs(m["pss_anon_kb"] / 4 - m["distinct_frames"]) < 0.05 * m["distinct_frames"]


def test_rewrote_doubles_the_frames(workload):
    wl = workload("rewrote", mib=8)
    m = tree_frames(wl.root)
    region = 8 * PAGES_PER_MIB
    assert 2 * region <= m["distinct_frames"] < 2 * region + 3 * 64


def test_cli_table_and_json(workload):
    wl = workload("chain", mib=4)
    res = cow_mem(wl.root, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["root"] == wl.root and len(doc["processes"]) == 4
    assert doc["distinct_frames"] == tree_frames(wl.root)["distinct_frames"]
    table = cow_mem(wl.root)
    assert table.returncode == 0
    assert f"4 processes: {doc['distinct_frames']} distinct frames" in table.stdout
    for pid in wl.pids:
        assert f" {pid} " in table.stdout


def test_cli_no_such_process():
    res = cow_mem(4194303)
    assert res.returncode == 1 and "process 4194303" in res.stderr


@contextlib.contextmanager
def python_process(code):
    """python3 running code, which prints "ready" once set up; killed when the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            close_fds=True)
    try:
        assert proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


RESERVER = """
import mmap, sys, time
# 1 TiB reserved, never touched (PROT_NONE, MAP_NORESERVE: as sanitizers and sandboxes do), 4 MiB written
r = mmap.mmap(-1, 1 << 40, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, prot=0)
d = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
d.write(bytes(range(256)) * (4 << 12))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_reservation_of_a_tebibyte_is_measured_in_little_memory():
    # the pagemap of a VMA used to be read in one pread: 2 GiB of entries for this one
    with python_process(RESERVER) as holder:
        # cow-mem's own peak memory, printed on stderr after its output
        code = ("import resource, sys; from stages.tools.mem import main; rc = main(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
        res = subprocess.run([sys.executable, "-c", code, "--json", str(holder.pid)], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        out, peak_kib = res.stdout, int(res.stderr.split()[-1])
        assert peak_kib < 200 * 1024, peak_kib  # not the 2 GiB of entries (4 GiB peak before)
        m = json.loads(out)
        assert m["distinct_frames"] >= 1024  # the 4 MiB written


NAMED = """
import ctypes, time
ctypes.CDLL(None).prctl(15, b"n\\xfe\\x1b[2J", 0, 0, 0)  # PR_SET_NAME: not UTF-8, and an escape sequence
print("ready", flush=True)
time.sleep(600)
"""


def test_a_name_that_is_not_utf8_is_shown_escaped():
    with python_process(NAMED) as named:
        res = cow_mem(named.pid, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["processes"][0]["comm"] == "n\\xfe\\x1b[2J"  # no lone surrogate
        res = cow_mem(named.pid)
        assert res.returncode == 0 and "  n\\xfe\\x1b[2J\n" in res.stdout, res.stdout
