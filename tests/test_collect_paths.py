"""Files with odd names, mapped and held open by a real process: collected with the names
they have (maps writes a newline in a name as \\012 and pads its column with spaces), and
deleted only when they are.  A live file whose name ends in " (deleted)" is a file like
any other: mapped privately it is dumped, mapped MAP_SHARED from tmpfs its data stays in
it (not in an unnamed copy), and after cow-plan | cow-apply the restored process maps and
holds the very same files."""

import json
import os
import subprocess
import sys

import pytest

from tests.support.commands import run, tool
from tests.support.images import Images
from tests.support.workloads import Trees, become_subreaper, read_mem, wait_file, wait_killed, write_mem

PAGE = 4096

# argv: OUT, then JSON [[how, path], ...]; how: "private" or "shared" (a 2-page mapping;
# the fd is closed), or "fd" or "dir" (held open: a file or FIFO, a directory).  OUT: JSON {pid, maps: [[path, addr]], fds: [[path, fd]]}
WORKLOAD = r"""
import ctypes, json, mmap, os, signal, sys
out, specs = sys.argv[1], json.loads(sys.argv[2])
keep, maps, fds = [], [], []
for how, path in specs:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY if how == "dir" else os.O_RDWR)
    if how in ("fd", "dir"):
        fds.append([path, fd])
        continue
    m = mmap.mmap(fd, 2 * 4096, flags=mmap.MAP_SHARED if how == "shared" else mmap.MAP_PRIVATE)
    os.close(fd)
    v = ctypes.c_char.from_buffer(m)
    maps.append([path, ctypes.addressof(v)])
    del v
    keep.append(m)
with open(out + ".tmp", "w") as f:
    json.dump({"pid": os.getpid(), "maps": maps, "fds": fds}, f)
os.rename(out + ".tmp", out)
while True:
    signal.pause()
"""

# the names: each is a real, live file
ODD = {
    "escaped or padded": ["nl\nname", "trail ", "two  spaces  ", " lead", "cr\rname", "tab\tname", "back\\012slash"],
    "named deleted": ["live (deleted)", "twice (deleted) (deleted)"],
}


@pytest.fixture
def trees():
    become_subreaper()
    t = Trees()
    yield t
    t.kill_all()


def start(trees, tmp_path, specs):
    out = str(tmp_path / "workload.json")
    popen = subprocess.Popen([sys.executable, "-c", WORKLOAD, out, json.dumps(specs)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                             start_new_session=True)
    trees.popens.append(popen)
    wait_file(out, popen.pid)
    with open(out) as f:
        info = json.load(f)
    trees.pids.add(info["pid"])
    return popen, info


def make_files(where, names):
    """Each name a 2-page file of bytes of its own; {path: contents}."""
    out = {}
    for i, name in enumerate(names):
        path = os.path.join(where, name)
        data = bytes([65 + i]) * PAGE + os.urandom(PAGE)
        with open(path, "wb") as f:
            f.write(data)
        out[path] = data
    return out


def collect(root, out, *args):
    return subprocess.run([tool("cow-collect"), "--tree", str(root), "-o", str(out)] + list(args),
                          capture_output=True, timeout=60)


def restore(image, tmp_path, trees):
    plan = run([tool("cow-plan")], image.read_bytes()).stdout
    report = tmp_path / "apply.json"
    run([tool("cow-apply"), "--report", str(report)], plan)
    outer = [int(p) for p in json.loads(report.read_text())["pids"].values()]
    trees.pids.update(outer)
    return outer


def assert_holds(pid, info, files):
    """pid maps each file at its address (the file's bytes there, map_files names it) and
    holds each fd on it."""
    for path, addr in info["maps"]:
        assert os.readlink(f"/proc/{pid}/map_files/{addr:x}-{addr + 2 * PAGE:x}") == path
        assert read_mem(pid, addr, 2 * PAGE) == files[path], path
    for path, fd in info["fds"]:
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == path


@pytest.mark.parametrize("names", list(ODD))
def test_odd_names_are_collected_and_restored_as_they_are(names, trees, tmp_path):
    where = tmp_path / "files"
    where.mkdir()
    files = make_files(str(where), ODD[names])
    specs = [[how, path] for path in files for how in ("private", "fd")]
    # a directory and a FIFO of the same name, held open (both reopened by path)
    for i, name in enumerate(ODD[names]):
        os.mkdir(where / f"dir{i}{name}")
        os.mkfifo(where / f"fifo{i}{name}")
        specs += [["dir", str(where / f"dir{i}{name}")], ["fd", str(where / f"fifo{i}{name}")]]
    popen, info = start(trees, tmp_path, specs)
    pid = info["pid"]
    image = tmp_path / "images.cow"
    res = collect(pid, image, "--kill")
    assert res.returncode == 0, res.stderr.decode()
    wait_killed(popen, [pid])
    images = Images(str(image))
    paths = {v["path"] for v in images.vmas[pid] if v["kind"] == "file"}
    assert set(files) <= paths, sorted(paths)
    held = {fd["fd"]: fd["path"] for fd in images.processes[0]["fds"]}
    assert all(held[fd] == path for path, fd in info["fds"]), held
    # cow-show keeps one line per thing: control characters of a name escaped
    shown = run([tool("cow-show"), str(image)]).stdout.decode()
    for path in files:
        escaped = path.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
        assert any(line.endswith(escaped) or f" {escaped} " in line for line in shown.splitlines()), escaped
    assert "\r" not in shown and "\t" not in shown
    assert restore(image, tmp_path, trees) == [pid]
    assert_holds(pid, info, files)


def test_a_live_tmpfs_file_named_deleted_mapped_shared_stays_that_file(trees, tmp_path):
    """Not a deleted tmpfs file: nothing of it goes into the image, and after the restore
    a write through the mapping reaches the file."""
    path = f"/dev/shm/cowtree-{os.getpid()}-odd (deleted)"
    try:
        files = make_files("/dev/shm", [os.path.basename(path)])
        popen, info = start(trees, tmp_path, [["shared", path], ["fd", path]])
        pid = info["pid"]
        image = tmp_path / "images.cow"
        res = collect(pid, image, "--kill")
        assert res.returncode == 0, res.stderr.decode()
        wait_killed(popen, [pid])
        shown = run([tool("cow-show")], image.read_bytes()).stdout.decode()
        assert "shared memory" not in shown, shown
        assert restore(image, tmp_path, trees) == [pid]
        assert_holds(pid, info, files)
        (_, addr), = info["maps"]
        write_mem(pid, addr + 100, b"written after the restore")
        with open(path, "rb") as f:
            assert f.read()[100:125] == b"written after the restore"
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_a_name_unlinked_while_another_link_remains_is_deleted(trees, tmp_path):
    """The link count is 1, but the name maps and the fd show leads nowhere: refused."""
    where = tmp_path / "files"
    where.mkdir()
    files = make_files(str(where), ["gone"])
    path, = files
    os.link(path, str(where / "other"))
    popen, info = start(trees, tmp_path, [["private", path], ["fd", path]])
    os.unlink(path)
    pid = info["pid"]
    res = collect(pid, tmp_path / "images.cow")
    err = res.stderr.decode()
    assert res.returncode == 2, err
    (_, addr), = info["maps"]
    (_, fd), = info["fds"]
    assert f"mapping of a deleted file at {addr:#x}-{addr + 2 * PAGE:#x} ({path} (deleted))" in err, err
    assert f"fd {fd} is a deleted file ({path} (deleted))" in err, err


NON_UTF8 = (
    # map the file named by argv[1] MAP_SHARED, say so, and wait until killed
    "import mmap, os, signal, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "m = mmap.mmap(fd, 4096)\n"
    "print('mapped', flush=True)\n"
    "signal.pause()\n"
)


def test_a_process_outside_the_tree_with_a_name_not_in_utf8(trees, tmp_path):
    """Shared memory in the tree: collect reads every other process's maps, whose names
    need not be UTF-8."""
    shm = tmp_path / "shm"
    shm.mkdir()
    name = os.path.join(os.fsencode(str(shm)), b"bad\xffname")
    with open(name, "wb") as f:
        f.write(bytes(PAGE))
    outside = subprocess.Popen([sys.executable, "-c", NON_UTF8, name], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, close_fds=True, start_new_session=True)
    trees.popens.append(outside)
    with outside.stdout:
        assert outside.stdout.readline() == b"mapped\n"
    # the tree has an object of its own for collect to look for outside: python's
    # mmap(-1) is MAP_SHARED|MAP_ANONYMOUS
    ready = str(tmp_path / "ready")
    code = ("import mmap, os, signal, sys; m = mmap.mmap(-1, 4096); m[0] = 1; "
            "open(sys.argv[1], 'w').close(); signal.pause()")
    child = subprocess.Popen([sys.executable, "-c", code, ready], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                             start_new_session=True)
    trees.popens.append(child)
    wait_file(ready, child.pid)
    res = collect(child.pid, tmp_path / "images.cow")
    assert res.returncode == 0, res.stderr.decode()
    assert "Traceback" not in res.stderr.decode()
