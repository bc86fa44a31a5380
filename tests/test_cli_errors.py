"""What a command prints for a path or process it cannot use: one line, "cmd: what: reason",
exit 1; and a reader that stops early (| head) is not an error."""

import subprocess

from tests.support.commands import run, tool
from tests.support.synthetic import PATTERNS


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_missing_paths_are_named(tmp_path):
    images = tmp_path / "images.cow"
    images.write_bytes(PATTERNS["same"]().images())
    missing = tmp_path / "missing.cow"
    in_missing_dir = tmp_path / "no-such-dir" / "plan.cow"
    cases = [
        ([tool("cow-plan"), "-i", str(missing)], f"cow-plan: {missing}: No such file or directory\n"),
        ([tool("cow-plan"), "-i", str(images), "-o", str(in_missing_dir)],
         f"cow-plan: {in_missing_dir}: No such file or directory\n"),
        ([tool("cow-plan"), "-i", str(images), "-o", str(tmp_path)], f"cow-plan: {tmp_path}: Is a directory\n"),
        ([tool("cow-show"), str(missing)], f"cow-show: {missing}: No such file or directory\n"),
        ([tool("cow-apply"), "-i", str(missing)],
         f"cow-apply: cannot read the plan: {missing}: No such file or directory\n"),
    ]
    for argv, expected in cases:
        res = run(argv, check=False)
        assert (res.returncode, res.stderr.decode()) == (1, expected), argv


def test_cow_mem_of_a_dead_pid_says_so_once():
    pid = dead_pid()
    res = run([tool("cow-mem"), str(pid)], check=False)
    assert (res.returncode, res.stderr.decode()) == (1, f"cow-mem: process {pid}: no such process\n")


def test_cow_show_into_a_reader_that_stops_early(tmp_path):
    images = tmp_path / "images.cow"
    images.write_bytes(PATTERNS["split"](pages=3000).images())  # --json of it: ~150 KB, more than a pipe holds
    show = subprocess.Popen([tool("cow-show"), "--json", str(images)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    show.stdout.readline()
    show.stdout.close()  # like head -1
    err = show.stderr.read().decode()
    assert show.wait(timeout=60) == 0 and err == "", err
