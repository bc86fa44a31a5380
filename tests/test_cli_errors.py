"""What a command prints for a path or process it cannot use: one line, "cmd: what: reason",
exit 1; and a reader that stops early (| head) is not an error."""

import json
import re
import subprocess

import pytest

from stages.apply.check import Refusal, check_pid_max
from stages.stream import StreamReader, StreamWriter, pack_u32, unpack_u32
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


def rewritten(src, dst, mutate=lambda kind, body: body, extra=()):
    """dst: the stream src with each record body passed through mutate(kind, body) and the
    records extra (kind, body, data) added before the trailer: well formed, checksums valid."""
    with open(src, "rb") as f:
        reader = StreamReader(f)
        records = [(r.kind, mutate(r.kind, dict(r.body)), None if r.data is None else bytes(r.data)) for r in reader]
        header, summary = reader.header, reader.trailer.get("summary")
    with open(dst, "wb") as out:
        w = StreamWriter(out, header["format"], header)
        for kind, body, data in [*records, *extra]:
            w.write(kind, body, data)
        w.close(summary)


@pytest.fixture
def sleep_images(tmp_path):
    """Images of a `sleep` started in tmp_path/wd (it runs on), and that directory."""
    wd = tmp_path / "wd"
    wd.mkdir()
    sleeper = subprocess.Popen(["sleep", "600"], cwd=wd, close_fds=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        images = tmp_path / "images.cow"
        run([tool("cow-collect"), "--tree", str(sleeper.pid), "-o", str(images)])
        yield images, wd
    finally:
        sleeper.kill()
        sleeper.wait()


def test_page_crcs_that_do_not_match_make_cow_show_fail(sleep_images, tmp_path):
    images, _ = sleep_images
    bad = tmp_path / "bad.cow"

    def flip_first_crc(kind, body):
        if kind == "pages":
            crcs = unpack_u32(body["crcs"], "crcs")
            crcs[0] ^= 1
            body["crcs"] = pack_u32(crcs)
        return body
    rewritten(images, bad, flip_first_crc)
    for form in ([], ["--json"]):
        res = run([tool("cow-show"), *form, str(bad)], check=False)
        assert res.returncode == 1, form
        assert re.fullmatch(r"cow-show: 1 of \d+ pages do not match their crc \(first: frame 1\)\n",
                            res.stderr.decode()), res.stderr
        assert run([tool("cow-show"), *form, str(images)]).returncode == 0


def test_cow_show_json_lists_the_pages_of_shared_memory(sleep_images, tmp_path):
    images, _ = sleep_images
    with_shmem = tmp_path / "shmem.cow"
    body = {"id": 1, "kind": "anon", "size": 3 * 4096, "npages": 3, "pages": pack_u32([0, 2, 1])}
    rewritten(images, with_shmem, extra=[("shmem", body, bytes(3 * 4096))])
    doc = json.loads(run([tool("cow-show"), "--json", str(with_shmem)]).stdout)
    assert [r["body"]["pages"] for r in doc["records"] if r["kind"] == "shmem"] == [[0, 2, 1]]


def test_outputs_that_cannot_be_written_are_refused_first(sleep_images, tmp_path):
    images, _ = sleep_images
    plan = tmp_path / "plan.cow"
    res = run([tool("cow-plan"), "-i", str(images), "-o", str(plan), "--stats", str(tmp_path / "no" / "s.json")],
              check=False)
    assert (res.returncode, res.stderr.decode()) == (1, f"cow-plan: {tmp_path}/no/s.json: No such file or directory\n")
    assert not plan.exists()  # exit 1: no plan left
    run([tool("cow-plan"), "-i", str(images), "-o", str(plan)])
    res = run([tool("cow-apply"), "-i", str(plan), "--report", str(tmp_path / "no" / "r.json")], check=False)
    assert (res.returncode, res.stderr.decode()) == (
        1, f"cow-apply: cannot write the report: {tmp_path}/no/r.json: No such file or directory: nothing was created\n")


def test_a_working_directory_that_is_gone_is_refused_before_any_process(sleep_images, tmp_path):
    images, wd = sleep_images
    plan = run([tool("cow-plan"), "-i", str(images)]).stdout
    wd.rmdir()
    res = run([tool("cow-apply")], plan, check=False)
    assert res.returncode == 1 and f"working directory {wd} does not exist" in res.stderr.decode(), res.stderr
    wd.write_text("a file now")
    res = run([tool("cow-apply")], plan, check=False)
    assert res.returncode == 1 and f"working directory {wd} is not a directory" in res.stderr.decode(), res.stderr


def test_pids_at_or_above_pid_max_are_refused():
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    check_pid_max([1, pid_max - 1])
    with pytest.raises(Refusal, match=rf"pid\(s\) {pid_max}, {pid_max + 5} are not below this machine's pid_max"):
        check_pid_max([pid_max + 5, 1, pid_max])


def test_readers_that_stop_early_are_not_errors(sleep_images, tmp_path):
    images, _ = sleep_images
    sleeper = subprocess.Popen(["sleep", "60"], close_fds=True, stdin=subprocess.DEVNULL)
    try:
        for argv in ([tool("cow-mem"), str(sleeper.pid)], [tool("cow-mem"), "--json", str(sleeper.pid)],
                     [tool("cow-plan"), "-i", str(images), "-o", str(tmp_path / "p.cow"), "--explain"]):
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            proc.stdout.close()  # like head -0: gone before the command writes
            err = proc.stderr.read().decode()
            assert (proc.wait(timeout=60), err) == (0, ""), argv
    finally:
        sleeper.kill()
        sleeper.wait()
