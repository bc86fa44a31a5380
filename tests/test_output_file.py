"""-o FILE of cow-collect and cow-plan: the stream takes FILE's name only once complete.

A failed run must lose nothing: not the tree (collect resumes it) and not a file that was
already at FILE (an earlier image or plan).  A FIFO or device is written, never replaced
and never chmodded.
"""

import errno
import os
import stat
import subprocess
import threading

import pytest

from stages.stream import OutputFile, codec
from tests.support.commands import run, tool
from tests.support.synthetic import PATTERNS


def names(path):
    return sorted(os.listdir(path))


def test_an_abandoned_file_leaves_the_old_one_and_no_other_name(tmp_path):
    path = tmp_path / "images.cow"
    path.write_bytes(b"old image")
    out = OutputFile(str(path))
    out.file.write(b"new" * 100000)
    out.file.flush()
    assert names(tmp_path) == ["images.cow"] and path.read_bytes() == b"old image"
    out.abandon()
    assert names(tmp_path) == ["images.cow"] and path.read_bytes() == b"old image"


def test_commit_replaces_the_file_whole_and_private(tmp_path):
    path = tmp_path / "images.cow"
    path.write_bytes(b"old image, longer than the new one")
    os.chmod(path, 0o644)
    out = OutputFile(str(path))
    out.file.write(b"new")
    assert path.read_bytes().startswith(b"old image")
    out.commit()
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert names(tmp_path) == ["images.cow"]


def test_a_new_name_appears_only_at_commit(tmp_path):
    path = tmp_path / "plan.cow"
    out = OutputFile(str(path))
    out.file.write(b"plan")
    out.file.flush()
    assert names(tmp_path) == []
    out.commit()
    assert names(tmp_path) == ["plan.cow"] and path.read_bytes() == b"plan"


def test_without_o_tmpfile_a_hidden_name_is_renamed_or_removed(tmp_path, monkeypatch):
    real_open = os.open

    def no_tmpfile(path, flags, *args):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args)

    monkeypatch.setattr(codec.os, "open", no_tmpfile)
    path = tmp_path / "images.cow"
    path.write_bytes(b"old")
    out = OutputFile(str(path))
    out.file.write(b"new")
    hidden = [n for n in names(tmp_path) if n != "images.cow"]
    assert len(hidden) == 1 and hidden[0].startswith(".images.cow.")
    out.abandon()
    assert names(tmp_path) == ["images.cow"] and path.read_bytes() == b"old"
    out = OutputFile(str(path))
    out.file.write(b"new")
    out.commit()
    assert names(tmp_path) == ["images.cow"] and path.read_bytes() == b"new"


def test_a_symlink_stays_and_its_target_is_replaced(tmp_path):
    (tmp_path / "big").mkdir()
    target = tmp_path / "big" / "images.cow"
    target.write_bytes(b"old")
    link = tmp_path / "images.cow"
    link.symlink_to(target)
    out = OutputFile(str(link))
    out.file.write(b"new")
    out.commit()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new" and names(tmp_path / "big") == ["images.cow"]


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "stream"
    os.mkfifo(fifo, 0o640)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    try:
        out = OutputFile(str(fifo))
        out.file.write(b"through the fifo")
        out.commit()
    finally:
        reader.join(timeout=10)
    assert got == [b"through the fifo"]
    st = os.stat(fifo)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640


def test_dev_null_is_written_not_replaced_nor_chmodded():
    before = os.stat("/dev/null")
    try:
        out = OutputFile("/dev/null")
        out.file.write(b"x" * 100000)
        out.commit()
        after = os.stat("/dev/null")
        assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
        assert after.st_mode == before.st_mode, "cow-* -o /dev/null changed the mode of /dev/null"
    finally:
        if stat.S_IMODE(os.stat("/dev/null").st_mode) != stat.S_IMODE(before.st_mode):
            os.chmod("/dev/null", stat.S_IMODE(before.st_mode))  # a failure here must not break the machine


def test_a_directory_is_refused_at_once(tmp_path):
    with pytest.raises(IsADirectoryError):
        OutputFile(str(tmp_path))


# -- the commands ---------------------------------------------------------------------


def test_cow_plan_may_write_its_plan_over_its_input(tmp_path):
    path = tmp_path / "x.cow"
    path.write_bytes(PATTERNS["chain"]().images())
    expected = run([tool("cow-plan"), "-i", str(path)]).stdout
    run([tool("cow-plan"), "-i", str(path), "-o", str(path)])
    assert path.read_bytes() == expected
    assert names(tmp_path) == ["x.cow"]


def test_cow_plan_refusing_its_input_keeps_the_old_plan(tmp_path):
    plan = tmp_path / "plan.cow"
    plan.write_bytes(b"an earlier plan")
    bad = tmp_path / "bad.cow"
    data = PATTERNS["same"]().images()
    bad.write_bytes(data[: len(data) // 2])
    res = run([tool("cow-plan"), "-i", str(bad), "-o", str(plan)], check=False)
    assert res.returncode == 1 and res.stderr.startswith(b"cow-plan: ")
    assert plan.read_bytes() == b"an earlier plan"
    assert names(tmp_path) == ["bad.cow", "plan.cow"]


def test_cow_collect_that_fails_keeps_an_earlier_image(tmp_path):
    image = tmp_path / "images.cow"
    image.write_bytes(b"an earlier image")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists
    res = run([tool("cow-collect"), "--tree", str(gone.pid), "-o", str(image)], check=False)
    assert res.returncode == 1 and b"no such process" in res.stderr, res.stderr
    assert image.read_bytes() == b"an earlier image"
    assert names(tmp_path) == ["images.cow"]
