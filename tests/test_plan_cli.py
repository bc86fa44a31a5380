"""cow-plan as a command: golden plans, --explain, --check, --stats, refusals of bad input.

Golden files live in tests/golden/plan/: <name>.cow (the input images, built by
tests/support/synthetic.py), <name>.sha256 (the plan of each strategy) and
<name>.explain.txt.  Regenerate with COWTREE_REGEN_GOLDEN=1.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from stages.plan.cli import main
from tests.support.golden import GOLDEN, check_golden, regenerating
from tests.support.synthetic import PATTERNS, ImageBuilder, page_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_GOLDEN = os.path.join(GOLDEN, "plan")


def mixed_images():
    """File VMAs, an LCA that does not hold the frame, a frame at two offsets, a dontfork VMA."""
    b = ImageBuilder()
    shared, moved = b.frame(page_bytes("shared")), b.frame(page_bytes("moved"))
    lib = b.frame(page_bytes("lib"))
    own = [b.frame(page_bytes(("own", i))) for i in range(4)]
    b.process(10, 0)
    b.process(11, 10)
    b.process(12, 10)
    b.process(13, 12)
    b.vma(10, 0x400000, [lib, 0, 0], kind="file", path="/usr/lib/libx.so", pgoff=0x3000)
    b.vma(10, 0x600000, [own[0], 0], vmflags=("rd", "wr", "dc"))
    b.vma(10, 0x7FFFF7FC0000, npages=4, kind="vvar", prot=1)
    b.vma(11, 0x400000, [lib, 0, 0], kind="file", path="/usr/lib/libx.so", pgoff=0x3000)
    b.vma(11, 0x800000, [shared, moved, own[1]])
    b.vma(12, 0x400000, [lib, 0, 0], kind="file", path="/usr/lib/libx.so", pgoff=0x3000)
    b.vma(12, 0x900000, [own[2], shared, 0, moved])
    b.vma(12, 0xA00000, npages=2, shared=True, kind="file", path="/dev/shm/x")
    b.vma(13, 0x900000, [own[3], shared, 0, moved])
    return b.stream()


SAMPLES = dict({name: (lambda fn=fn: fn().images()) for name, fn in PATTERNS.items()}, mixed=mixed_images)


def golden_images(name):
    """The checked-in image stream; the synthetic builder must still produce it byte for byte."""
    path = os.path.join(PLAN_GOLDEN, f"{name}.cow")
    data = SAMPLES[name]()
    if regenerating():
        os.makedirs(PLAN_GOLDEN, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    with open(path, "rb") as f:
        stored = f.read()
    assert stored == data, f"{name}.cow differs from what tests/support/synthetic.py builds"
    return path


def run_plan(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_plans(name, tmp_path, capsys):
    images = golden_images(name)
    lines = []
    for strategy in ("exact", "address", "none"):
        digests = set()
        for attempt in range(2):
            out = tmp_path / f"{strategy}{attempt}.plan"
            code, _, err = run_plan(capsys, "-i", images, "-o", str(out), "--strategy", strategy, "--check")
            assert code == 0, err
            digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
            assert oct(out.stat().st_mode & 0o777) == "0o600"
        assert len(digests) == 1, "the same images must give the same plan"
        lines.append(f"{strategy} {digests.pop()}")
    check_golden(f"plan/{name}.sha256", "\n".join(lines) + "\n")
    code, explain, _ = run_plan(capsys, "-i", images, "-o", str(tmp_path / "x.plan"), "--explain")
    assert code == 0
    check_golden(f"plan/{name}.explain.txt", explain)


def test_stats_file_and_pipe(tmp_path):
    images = golden_images("rewrote")
    stats = tmp_path / "stats.json"
    with open(images, "rb") as f:
        res = subprocess.run([sys.executable, "-m", "stages.plan.cli", "--stats", str(stats), "--explain"],
                             stdin=f, capture_output=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout[:1] == b"\x95", "a plan stream (5-item msgpack records) on stdout"
    assert b"strategy exact" in res.stderr, "--explain goes to stderr when the plan is on stdout"
    got = json.loads(stats.read_text())
    for key in ("frames_in_images", "frames_planned", "frames_duplicated", "bytes_to_write", "processes",
                "moves", "frames_merged_equal"):
        assert key in got
    assert got["frames_planned"] == got["frames_in_images"] == 16
    assert got["frames_duplicated"] == 0 and got["bytes_to_write"] == 16 * 4096


def corruptions(data):
    yield "truncated", data[: len(data) // 2]
    yield "no trailer", data[:-20]
    yield "empty", b""
    for at in (10, len(data) // 3, len(data) - 30):
        flipped = bytearray(data)
        flipped[at] ^= 0x40
        yield f"bit flip at {at}", bytes(flipped)
    yield "two streams", data + data


@pytest.mark.parametrize("name", ["rewrote", "mixed"])
def test_corrupt_input_is_refused_without_output(name, tmp_path, capsys):
    data = open(golden_images(name), "rb").read()
    for what, bad in corruptions(data):
        src = tmp_path / "bad.cow"
        src.write_bytes(bad)
        out = tmp_path / "out.plan"
        code, _, err = run_plan(capsys, "-i", str(src), "-o", str(out))
        assert code == 1, what
        assert err.startswith("cow-plan: "), (what, err)
        assert not out.exists(), f"{what}: partial plan file left behind"


def refused(tmp_path, capsys, builder):
    src = tmp_path / "in.cow"
    src.write_bytes(builder.stream())
    out = tmp_path / "out.plan"
    code, _, err = run_plan(capsys, "-i", str(src), "-o", str(out))
    assert code == 1 and not out.exists()
    return err


def test_overlapping_vmas_are_refused(tmp_path, capsys):
    b = ImageBuilder()
    f = b.frame(page_bytes(1))
    b.process(1, 0)
    b.vma(1, 0x100000, [f, 0])
    b.vma(1, 0x101000, npages=2)
    assert "overlaps" in refused(tmp_path, capsys, b)


def test_frame_twice_in_one_process_is_refused(tmp_path, capsys):
    b = ImageBuilder()
    f = b.frame(page_bytes(1))
    b.process(1, 0)
    b.vma(1, 0x100000, [f, f])
    assert "mapped twice" in refused(tmp_path, capsys, b)


def test_frame_missing_from_pages_is_refused(tmp_path, capsys):
    b = ImageBuilder()
    f = b.frame(page_bytes(1))
    b.process(1, 0)
    b.vma(1, 0x100000, [f, f + 1])
    assert "not in the images' pages" in refused(tmp_path, capsys, b)


def test_check_failure_exits_3(tmp_path, capsys, monkeypatch):
    import stages.plan.cli as cli

    real = cli.make_plan

    def broken(images, strategy="exact"):
        header, records = real(images, strategy)
        header["stats"]["frames_planned"] += 1
        return header, records

    monkeypatch.setattr(cli, "make_plan", broken)
    out = tmp_path / "out.plan"
    code, _, err = run_plan(capsys, "-i", golden_images("same"), "-o", str(out), "--check")
    assert code == 3 and "frames_planned" in err
    assert not out.exists()


def test_images_from_a_pipe_give_the_plan_a_file_gives(tmp_path):
    """From a regular file the pages are read again where they are, from a pipe they are
    spooled: the same plan, byte for byte."""
    images = golden_images("mixed")
    from_file, from_pipe = tmp_path / "file.plan", tmp_path / "pipe.plan"
    cmd = [sys.executable, "-m", "stages.plan.cli"]
    res = subprocess.run(cmd + ["-i", images, "-o", str(from_file)], capture_output=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    with open(images, "rb") as f:
        res = subprocess.run(cmd + ["-o", str(from_pipe)], input=f.read(), capture_output=True, cwd=ROOT,
                             timeout=60)
    assert res.returncode == 0, res.stderr
    assert from_file.read_bytes() == from_pipe.read_bytes()


def test_an_images_file_changed_before_the_plan_is_written_is_refused(tmp_path):
    from stages.plan.model import read_images
    from stages.stream import StreamError

    path = tmp_path / "images.cow"
    path.write_bytes(SAMPLES["rewrote"]())
    with open(path, "rb") as f:
        images = read_images(f)
    try:
        assert images.in_source and images.spool.count == 0  # nothing spooled: read again from the file
        _, _, offset, length, _ = images.in_source[0]
        data = bytearray(path.read_bytes())
        data[offset + length // 2] ^= 1
        with open(path, "r+b") as f:  # the same file, changed in place
            f.write(data)
        with pytest.raises(StreamError, match="record .* the input file has changed since it was read"):
            list(images.pages_records())
    finally:
        images.close()
