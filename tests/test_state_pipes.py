"""Pipes between processes of the tree: collected with their unread bytes, restored as the
same pipes shared by the same processes at the same fd numbers, with their flags, capacity
and open file descriptions (tests/workloads/pipewl.c checks from inside)."""

import fcntl
import json
import os
import signal
import struct
import subprocess
import tempfile
import time

import pytest

from stages._native import lib
from tests.support.workloads import Trees, become_subreaper, build, proc_state, reap, wait_file, wait_killed

from tests.support.commands import run, tool  # noqa: F401
SYS_KCMP, KCMP_FILE = 312, 0
FIONREAD = 0x541B



def _ours(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError):
        return False


@pytest.fixture
def trees():
    become_subreaper()  # the workers of a killed root come back to us to be reaped
    t = Trees()
    yield t
    # a restored process's zombie whose parent is not us is done with too
    assert t.kill_all(gone=lambda pid: reap(pid) or proc_state(pid) == "Z" and not _ours(pid)), \
        {p: proc_state(p) for p in t.pids}


def start_pipewl(trees, tmp_path):
    outdir = tempfile.mkdtemp(prefix="pipewl-", dir=str(tmp_path))
    popen = subprocess.Popen([build("pipewl"), outdir], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, close_fds=True, cwd="/", start_new_session=True)
    trees.popens.append(popen)
    wait_file(os.path.join(outdir, "ready"), pid=popen.pid)
    with open(os.path.join(outdir, "ready")) as f:
        pids = [int(x) for x in f.read().split()]
    trees.pids.update(pids)
    return outdir, popen, pids


def fd_structure(pids):
    """Per process (in the given order): fd -> (flags, pipe number, description number), with
    pipes and descriptions numbered by first appearance: equal for a faithful restore."""
    pipes, descs, out = {}, [], []
    for pid in pids:
        table = {}
        for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            fd = int(name)
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int([line.split()[1] for line in f if line.startswith("flags:")][0], 8)
            if not link.startswith("pipe:"):
                table[fd] = (flags, link, None)
                continue
            pipe = pipes.setdefault(link, len(pipes) + 1)
            desc = next((i for i, (p, f) in enumerate(descs)
                         if lib.cow_syscall6(SYS_KCMP, p, pid, KCMP_FILE, f, fd, 0) == 0), None)
            if desc is None:
                descs.append((pid, fd))
                desc = len(descs) - 1
            table[fd] = (flags, pipe, desc)
        out.append(table)
    return out


def unread(pid, fd):
    """Bytes waiting in the pipe at fd of pid (a reader of ours only looks)."""
    r = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(r, FIONREAD, b"\0\0\0\0"))[0]
    finally:
        os.close(r)


def run_checks(outdir, ns_pids, outer_pids):
    """Workers first (they answer over the pipes), then the root; {pid: text}."""
    results = {}
    for group in (range(1, len(ns_pids)), [0]):
        for i in group:
            os.kill(outer_pids[i], signal.SIGUSR1)
        for i in group:
            path = os.path.join(outdir, f"{ns_pids[i]}.check")
            wait_file(path, pid=outer_pids[i])
            time.sleep(0.01)
            with open(path) as f:
                results[ns_pids[i]] = f.read().strip()
    return results


@pytest.mark.parametrize("pidns", [False, True], ids=["same-pids", "pidns"])
def test_pipes_restored_shared_with_unread_data_and_flags(trees, tmp_path, pidns):
    outdir, popen, pids = start_pipewl(trees, tmp_path)
    before = fd_structure(pids)
    assert unread(pids[1], 10) == 24  # three jobs wait in the shared pipe
    images = run([tool("cow-collect"), "--tree", str(pids[0])] + ([] if pidns else ["--kill"])).stdout
    shown = run([tool("cow-show")], images).stdout.decode()
    assert "pipe 3: capacity 262144, 200000 bytes unread" in shown, shown
    assert "pipe 1: capacity 65536, 24 bytes unread b'J:00001\\nJ:00002\\n'" in shown, shown
    if not pidns:
        wait_killed(popen, pids)
    plan = run([tool("cow-plan")], images).stdout
    report = tmp_path / "apply.json"
    run([tool("cow-apply"), "--report", str(report)] + (["--pidns"] if pidns else []), plan)
    rep = json.loads(report.read_text())
    outer = [int(rep["pids"][str(p)]) for p in pids]
    trees.pids.update(outer + ([rep["init_pid"]] if rep.get("init_pid") else []))
    after = fd_structure(outer)
    assert after == before  # same fds, same flags, same sharing of pipes and descriptions
    checks = run_checks(outdir, pids, outer)
    assert checks == {p: "ok" for p in pids}, checks
    assert unread(outer[1], 10) == 8  # each worker took one job: one is left
    assert all(proc_state(p) == "S" for p in outer)


def test_pipe_shared_with_a_process_outside_the_tree_is_refused(trees, tmp_path):
    # the test holds the read end of the root's stdout
    p = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, close_fds=True)
    trees.popens.append(p)
    try:
        time.sleep(0.1)
        res = run([tool("cow-collect"), "--tree", str(p.pid), "-o", str(tmp_path / "x.cow")], check=False)
        assert res.returncode == 2
        line = (f"cow-collect: process {p.pid}: fd 1 is a pipe shared with a process outside the tree "
                f"(process {os.getpid()}): not supported")
        assert line in res.stderr.decode().splitlines(), res.stderr.decode()
        assert not (tmp_path / "x.cow").exists()
        assert proc_state(p.pid) == "S"
    finally:
        p.stdout.close()


PREFORK_PIPES = """
import os, sys, time
data = {i: str(i) * 10 for i in range(20000)}
workers = []
resp_r, resp_w = os.pipe()
for k in range(3):
    req_r, req_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(req_w); os.close(resp_r)
        for prev_w in [w for _, w in workers]:
            os.close(prev_w)
        while True:
            line = b""
            while not line.endswith(b"\\n"):
                c = os.read(req_r, 1)
                if not c:
                    os._exit(0)
                line += c
            key = int(line)
            os.write(resp_w, f"{os.getpid()} {key} {data[key]}\\n".encode())
    os.close(req_r)
    workers.append((pid, req_w))
os.close(resp_w)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(" ".join(f"{p}:{w}" for p, w in workers) + f" {resp_r}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""


def _read_line(fd, timeout=5):
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        assert time.monotonic() < deadline, data
        try:
            chunk = os.read(fd, 1)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        assert chunk, "EOF"
        data += chunk
    return data.decode()


def test_python_prefork_workers_serve_over_pipes_after_restore(trees, tmp_path):
    """A python3 pre-fork server: the parent holds one request pipe per worker and the read
    end of a shared response pipe; an answer written before the dump is still unread after
    restore, and every restored worker serves new requests over the restored pipes (the test
    talks to them through /proc/PID/fd, after the dump: a holder outside the tree is refused)."""
    script, info = tmp_path / "prefork.py", tmp_path / "info"
    script.write_text(PREFORK_PIPES)
    popen = subprocess.Popen(["python3", str(script), str(info)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                             cwd="/", start_new_session=True)
    trees.popens.append(popen)
    wait_file(str(info), pid=popen.pid)
    *pairs, resp_fd = info.read_text().split()
    workers = [tuple(map(int, p.split(":"))) for p in pairs]
    root = popen.pid
    trees.pids.update([root] + [w for w, _ in workers])

    req = os.open(f"/proc/{root}/fd/{workers[0][1]}", os.O_WRONLY)
    os.write(req, b"7\n")
    os.close(req)
    deadline = time.monotonic() + 5
    while unread(root, int(resp_fd)) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    images = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
    wait_killed(popen, [w for w, _ in workers])
    run([tool("cow-apply")], run([tool("cow-plan")], images).stdout)

    resp = os.open(f"/proc/{root}/fd/{resp_fd}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert _read_line(resp) == f"{workers[0][0]} 7 {'7' * 10}\n"  # written before the dump
        for n, (wpid, wfd) in enumerate(workers):
            req = os.open(f"/proc/{root}/fd/{wfd}", os.O_WRONLY)
            os.write(req, f"{100 + n}\n".encode())
            os.close(req)
            assert _read_line(resp) == f"{wpid} {100 + n} {str(100 + n) * 10}\n"
    finally:
        os.close(resp)
    assert all(proc_state(p) == "S" for p in [root] + [w for w, _ in workers])
