"""Issue #8: bad image and plan streams are refused by name, exit non-zero, and leave nothing:
cow-plan writes no -o file, cow-apply creates no process (counted by a pids cgroup)."""

import copy
import io
import os
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stages.plan.cli import make_plan
from stages.plan.model import PlanError, read_images
from stages.plan.simulate import simulate
from stages.plan.validate import PlanInvalid, validate_plan
from stages.stream import StreamError, StreamReader, StreamWriter, envelope, images, pack_u32, plans, unpack_u32
from tests.support.commands import tool
from tests.support.synthetic import PATTERNS, ImageBuilder, page_bytes

PAGE = 4096
PIDS_CGROUP = "/sys/fs/cgroup/pids"


# -- running a stage and proving it created no process ----------------------------------------

class Counted:
    """A finished command and the most tasks its pids cgroup ever held (1 = it never forked)."""

    def __init__(self, proc, peak):
        self.returncode, self.stdout, self.stderr, self.peak = proc.returncode, proc.stdout, proc.stderr, peak
        self.err = proc.stderr.decode(errors="replace")


def run_counted(argv, data=None, timeout=60):
    """Run argv alone in a fresh pids cgroup; pids.peak counts every task it ever created
    (fork, clone3, threads), however briefly: unlike /proc polling it cannot miss one."""
    cg = os.path.join(PIDS_CGROUP, f"cowtree-test-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(cg)
    try:
        # the shell moves itself in, then execs: the command is the cgroup's first task
        wrapper = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *argv]
        proc = subprocess.run(wrapper, input=data, capture_output=True, timeout=timeout)
        with open(os.path.join(cg, "pids.peak")) as f:
            peak = int(f.read())
        return Counted(proc, peak)
    finally:
        deadline = time.monotonic() + 10
        while True:  # a leaked task would keep the cgroup: kill it, then remove the cgroup
            with open(os.path.join(cg, "cgroup.procs")) as f:
                left = [int(x) for x in f.read().split()]
            for pid in left:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            try:
                os.rmdir(cg)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def test_the_counter_sees_a_fork():
    # the detector itself: a command that forks once must show a peak of 2
    res = run_counted(["sh", "-c", "sleep 0; true"])
    assert res.returncode == 0 and res.peak == 2, res.peak
    assert run_counted(["true"]).peak == 1


def apply_refuses(plan_bytes, *words):
    res = run_counted([tool("cow-apply")], plan_bytes)
    assert res.returncode == 1, res.err
    assert res.err.startswith("cow-apply: "), res.err
    for w in words:
        assert w in res.err, (w, res.err)
    assert res.peak == 1, f"cow-apply created {res.peak - 1} task(s) before refusing: {res.err}"
    return res.err


def plan_refuses(image_bytes, tmp_path, *words):
    out = tmp_path / "never.plan"
    proc = subprocess.run([tool("cow-plan"), "-o", str(out)], input=image_bytes, capture_output=True, timeout=60)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    assert err.startswith("cow-plan: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists(), "cow-plan left a partial plan file"
    return err


# -- building bad streams -------------------------------------------------------------------

def forge(fmt, header, records, version=None):
    """A stream with valid crcs, seq numbers and trailer, whatever the records' order or
    content: only the checks beyond the envelope can refuse it."""
    mod = {"cowtree-images": "images", "cowtree-plan": "plans"}[fmt]
    head = dict(header, format=fmt)
    head["version"] = version if version is not None else __import__(f"stages.stream.{mod}", fromlist=["x"]).VERSION
    out, chain, counts = [], 0, {}
    for seq, (kind, body, data) in enumerate([("header", head, None)] + list(records)):
        meta = body if isinstance(body, bytes) else envelope.pack_meta(body)
        parts, crc = envelope.encode_record(kind, seq, meta, data)
        out.extend(parts)
        chain = envelope.chain_update(chain, crc)
        counts[kind] = counts.get(kind, 0) + 1
    trailer = envelope.pack_meta({"records": len(records) + 1, "counts": counts, "chain": chain})
    out.extend(envelope.encode_record("trailer", len(records) + 1, trailer, None)[0])
    return b"".join(out)


def split(blob):
    """(header without format/version, [(kind, body, data)]) of a valid stream."""
    reader = StreamReader(io.BytesIO(blob))
    header = {k: v for k, v in reader.header.items() if k not in ("format", "version")}
    return reader.format, header, [(r.kind, r.body, r.data) for r in reader]


def good_images():
    b = ImageBuilder()
    b.process(100, 0)
    b.process(101, 100)
    frames = [b.frame(page_bytes(i)) for i in range(4)]
    for pid in (100, 101):
        b.vma(pid, 0x10000000, frames)
    return b.stream()


def edit_images(change):
    fmt, header, recs = split(good_images())
    recs = copy.deepcopy(recs)
    change(header, recs)
    return forge(fmt, header, recs)


def vmas_of(recs, pid):
    return next(body for kind, body, _ in recs if kind == "vmas" and body["pid"] == pid)["vmas"]


def anon_vma(start, end, frames=None):
    return {"start": start, "end": end, "prot": 3, "shared": False, "pgoff": 0, "kind": "anon",
            "path": None, "vmflags": ["rd", "wr"], "frames": frames}


def test_good_synthetic_images_are_planned(tmp_path):
    out = tmp_path / "good.plan"
    proc = subprocess.run([tool("cow-plan"), "-o", str(out)], input=good_images(), capture_output=True, timeout=60)
    assert proc.returncode == 0 and out.exists(), proc.stderr


def _out_of_order(h, recs):
    recs.insert(0, recs.pop(2))  # the first vmas record before the process records


def _pid_zero(h, recs):
    recs[1][1]["pid"] = 0


def _dup_pid(h, recs):
    recs[1][1]["pid"] = 100
    vmas_of(recs, 101)  # keep the vmas records as they are: two records for one pid win first
    for kind, body, _ in recs:
        if kind == "vmas" and body["pid"] == 101:
            body["pid"] = 100


def _overlapping_vmas(h, recs):
    vmas = vmas_of(recs, 100)
    vmas.append(anon_vma(vmas[0]["start"] + PAGE, vmas[0]["end"] + PAGE))


def _vma_2_60(h, recs):
    vmas_of(recs, 100).append(anon_vma(0x20000000, 0x20000000 + (1 << 60)))


def _vma_huge_in_range(h, recs):
    # inside the address space, but 2^45 bytes of private anonymous memory
    vmas_of(recs, 100).append(anon_vma(0x100000000, 0x100000000 + (1 << 45)))


def _million_threads(h, recs):
    t = {"tid": 100, "regs": b"", "xstate": b"", "sigmask": 0}
    recs[0][1]["threads"] = [t] * 1_000_000


def _huge_frames(h, recs):
    # 32 MiB of frame ids for a 4-page VMA
    vmas_of(recs, 100)[0]["frames"] = bytes(32 << 20)


def _frame_beyond_pages(h, recs):
    vmas_of(recs, 100)[0]["frames"] = pack_u32([1, 2, 3, 1 << 31])


IMAGE_CASES = {
    "records out of order": (_out_of_order, ["out of order"]),
    "pid 0": (_pid_zero, [".pid: 0 is below 1"]),
    "duplicated pid": (_dup_pid, ["process 100", "two vmas records"]),
    "overlapping VMAs": (_overlapping_vmas, ["process 100", "overlaps the previous VMA"]),
    "VMA of 2^60 bytes": (_vma_2_60, ["process 100", "beyond the user address space"]),
    "VMA of 2^45 bytes": (_vma_huge_in_range, ["process 100", "more than cow-plan handles"]),
    "a million threads": (_million_threads, ["threads: list of 1000000 items is above the limit"]),
    "huge frames array": (_huge_frames, ["process 100", "8388608 frame ids for 4 pages"]),
    "frame id beyond the pages": (_frame_beyond_pages, ["process 100", "not in the images' pages"]),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_images_are_refused_by_cow_plan(case, tmp_path):
    change, words = IMAGE_CASES[case]
    plan_refuses(edit_images(change), tmp_path, *words)


def test_newer_image_version_is_refused_by_cow_plan(tmp_path):
    fmt, header, recs = split(good_images())
    newer = images.VERSION + 1
    plan_refuses(forge(fmt, header, recs, version=newer), tmp_path, f"version {newer} is newer")


def test_older_image_version_is_refused_by_cow_plan(tmp_path):
    """A stream of an older format (the header's version below ours, the rest ours) is
    refused as old, before any of its records is read."""
    fmt, header, recs = split(good_images())
    older = images.VERSION - 1
    plan_refuses(forge(fmt, header, recs, version=older), tmp_path, f"version {older} is older", "re-create it")


# -- plans: a real one (sleep), broken field by field, must create nothing ---------------------

@pytest.fixture(scope="module")
def real_plan():
    orig = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
    try:
        time.sleep(0.2)
        images = subprocess.run([tool("cow-collect"), "--tree", str(orig.pid), "--kill"],
                                capture_output=True, timeout=60, check=True).stdout
        plan = subprocess.run([tool("cow-plan")], input=images, capture_output=True, timeout=60, check=True).stdout
    finally:
        orig.kill()
        orig.wait(timeout=10)
    return plan


def edit_plan(plan, change, validate=True):
    fmt, header, recs = split(plan)
    recs = copy.deepcopy(recs)
    change(header, recs)
    if not validate:
        return forge(fmt, header, recs)
    out = io.BytesIO()
    w = StreamWriter(out, fmt, header)
    for kind, body, data in recs:
        w.write(kind, body, data)
    w.close()
    return out.getvalue()


def procs(recs):
    return [body for kind, body, _ in recs if kind == "process"]


def _window_on_target(h, recs):
    h["window"]["base_hint"] = procs(recs)[0]["layout"][0]["start"]


def _layout_overlap(h, recs):
    lay = procs(recs)[0]["layout"]
    lay.insert(1, dict(lay[0], pieces=[]))


def _plan_pid_zero(h, recs):
    procs(recs)[0]["pid"] = 0


def _plan_dup_pid(h, recs):
    p = procs(recs)[0]
    twin = copy.deepcopy(p)
    twin["ppid"], twin["ranges"], twin["steps"] = p["pid"], [], []
    recs.insert(1, ("process", twin, None))


def _plan_layout_2_60(h, recs):
    lay = procs(recs)[0]["layout"]
    last = max((v for v in lay if v["kind"] != "vsyscall"), key=lambda v: v["end"])
    lay.insert(lay.index(last) + 1, dict(anon_vma(last["end"], last["end"] + (1 << 60)), pieces=[]))


def _plan_window_2_50(h, recs):
    h["window"]["size"] = 1 << 50


def _plan_million_threads(h, recs):
    t = {"tid": 1, "regs": b"", "xstate": b"", "sigmask": 0}
    procs(recs)[0]["image"]["threads"] = [t] * 1_000_000


def _plan_huge_frames(h, recs):
    v = next(v for v in procs(recs)[0]["layout"] if v["frames"] is not None)
    v["frames"] = bytes(32 << 20)


def _plan_out_of_order(h, recs):
    recs.append(recs.pop(0))  # the process record after the pages records


def _plan_fork_unknown(h, recs):
    procs(recs)[0]["steps"].append({"op": "fork", "pid": 4_000_000})


PLAN_CASES = {
    # (change, written through the checking writer?, words in the refusal)
    "window overlaps a target VMA": (_window_on_target, True, ["overlaps the staging window"]),
    "overlapping VMAs": (_layout_overlap, True, ["not sorted or overlaps the previous VMA"]),
    "pid 0": (_plan_pid_zero, False, ["pid: 0 is below 1"]),
    "duplicated pid": (_plan_dup_pid, True, ["not positive or not unique"]),
    "VMA of 2^60 bytes": (_plan_layout_2_60, True, ["beyond the user address space"]),
    "window of 2^50 bytes": (_plan_window_2_50, True, ["window", "beyond the user address space"]),
    "a million threads": (_plan_million_threads, False, ["threads: list of 1000000 items is above the limit"]),
    "huge frames array": (_plan_huge_frames, True, ["frames has 8388608 entries"]),
    "records out of order": (_plan_out_of_order, False, ["out of order"]),
    "fork of a pid with no record": (_plan_fork_unknown, True, ["4000000"]),
}


@pytest.mark.parametrize("case", PLAN_CASES)
def test_bad_plans_are_refused_by_cow_apply_before_any_process(case, real_plan):
    change, checked, words = PLAN_CASES[case]
    apply_refuses(edit_plan(real_plan, change, validate=checked), *words)


def test_newer_plan_version_is_refused_before_any_process(real_plan):
    fmt, header, recs = split(real_plan)
    newer = plans.VERSION + 1
    apply_refuses(forge(fmt, header, recs, version=newer), f"version {newer} is newer")


def test_older_plan_version_is_refused_before_any_process(real_plan):
    fmt, header, recs = split(real_plan)
    older = plans.VERSION - 1
    apply_refuses(forge(fmt, header, recs, version=older), f"version {older} is older")


# -- fuzzing: the decoder and the validator raise their own errors, nothing else -------------

def _synthetic_plan(name):
    images = read_images(io.BytesIO(PATTERNS[name]().images()))
    header, records = make_plan(images, "exact")
    bodies = copy.deepcopy(images.pages_bodies)
    n = images.nframes
    images.close()
    return header, records, bodies, n


FUZZ_PLANS = {name: _synthetic_plan(name) for name in ("chain", "split", "orphans")}
STRUCTURAL = ("not mapped", "out of range", "never forked", "gap or overlap", "too short",
              "without a process record", "has pieces", "pieces cover")

INTS = st.one_of(st.integers(-2, 8), st.integers(0, 1 << 20), st.sampled_from([1 << 31, 1 << 47, 1 << 60, (1 << 64) - 1]))


def _mutate(data, header, records):
    """One random change to a field of a process record (or the window)."""
    proc = data.draw(st.sampled_from(records))
    what = data.draw(st.sampled_from(["pid", "ppid", "range", "step", "piece", "vma", "window", "drop", "swap"]))
    if what == "pid":
        proc["pid"] = data.draw(st.integers(1, 110))
    elif what == "ppid":
        proc["ppid"] = data.draw(st.integers(0, 110))
    elif what == "range" and proc["ranges"]:
        r = data.draw(st.sampled_from(proc["ranges"]))
        r[data.draw(st.sampled_from(["id", "offset", "size"]))] = data.draw(INTS.filter(lambda x: x >= 1))
    elif what == "step" and proc["steps"]:
        s = data.draw(st.sampled_from(proc["steps"]))
        if s["op"] == "write":
            pairs = list(unpack_u32(s["pages"]))
            k = data.draw(st.integers(0, len(pairs) - 1))
            pairs[k] = data.draw(st.integers(0, (1 << 32) - 1) | st.integers(0, 40))
            s["pages"] = pack_u32(pairs)
        else:
            key = "pid" if s["op"] == "fork" else "range"
            s[key] = data.draw(st.integers(1, 120))
    elif what == "piece":
        vmas = [v for v in proc["layout"] if v["pieces"]]
        if vmas:
            v = data.draw(st.sampled_from(vmas))
            pieces = v["pieces"]  # a new list from make_plan's layout: set back below
            p = data.draw(st.sampled_from(pieces))
            p[data.draw(st.integers(0, 3))] = data.draw(st.integers(1, 50) | INTS.filter(lambda x: x >= 1))
            v["pieces"] = pieces
    elif what == "vma" and proc["layout"]:
        v = data.draw(st.sampled_from(proc["layout"]))
        field = data.draw(st.sampled_from(["start", "end", "kind", "shared", "pgoff"]))
        if field in ("start", "end"):
            v[field] = data.draw(INTS.filter(lambda x: x >= 0)) * data.draw(st.sampled_from([1, PAGE]))
        elif field == "kind":
            v["kind"] = data.draw(st.sampled_from(["anon", "file", "stack", "vdso", "vsyscall"]))
        elif field == "shared":
            v["shared"] = not v["shared"]
        else:
            v["pgoff"] = data.draw(st.integers(0, 8)) * PAGE
    elif what == "window":
        header["window"][data.draw(st.sampled_from(["base_hint", "size"]))] = \
            data.draw(INTS.filter(lambda x: x >= 0)) * data.draw(st.sampled_from([1, PAGE]))
    elif what == "drop" and proc["steps"]:
        del proc["steps"][data.draw(st.integers(0, len(proc["steps"]) - 1))]
    elif what == "swap" and len(proc["steps"]) > 1:
        i = data.draw(st.integers(0, len(proc["steps"]) - 2))
        proc["steps"][i], proc["steps"][i + 1] = proc["steps"][i + 1], proc["steps"][i]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_plans_are_refused_or_executable(data):
    """validate_plan raises PlanInvalid or accepts; an accepted plan runs in the simulator
    without a structural error (it may give other bytes: apply cannot know the images)."""
    name = data.draw(st.sampled_from(sorted(FUZZ_PLANS)))
    header, records, bodies, n = copy.deepcopy(FUZZ_PLANS[name])
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(data, header, records)
    try:
        validate_plan(header, records, range(1, n + 1))
    except PlanInvalid:
        return
    res = simulate(header, records, bodies)
    structural = [e for e in res.errors if any(w in e for w in STRUCTURAL)]
    assert not structural, structural


def test_unmutated_fuzz_plans_simulate_correctly():
    # the fuzz starts from correct plans: otherwise it proves nothing
    for name, (header, records, bodies, n) in FUZZ_PLANS.items():
        validate_plan(header, records, range(1, n + 1))
        assert simulate(header, records, bodies).ok, name


def _fuzz_value(data):
    return data.draw(st.one_of(INTS, st.none(), st.booleans(), st.text(max_size=4), st.binary(max_size=12),
                               st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-9, 9), max_size=2)))


def _poke(data, obj, depth=0):
    """Replace one value somewhere inside obj (a dict/list tree) with a random one."""
    if isinstance(obj, dict) and obj:
        key = data.draw(st.sampled_from(sorted(obj, key=str)))
        if depth < 4 and isinstance(obj[key], (dict, list)) and obj[key] and data.draw(st.booleans()):
            _poke(data, obj[key], depth + 1)
        elif data.draw(st.integers(0, 9)) == 0:
            del obj[key]
        else:
            obj[key] = _fuzz_value(data)
    elif isinstance(obj, list) and obj:
        i = data.draw(st.integers(0, len(obj) - 1))
        if depth < 4 and isinstance(obj[i], (dict, list)) and obj[i] and data.draw(st.booleans()):
            _poke(data, obj[i], depth + 1)
        else:
            obj[i] = _fuzz_value(data)


FUZZ_IMAGES = split(PATTERNS["split"]().images())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_image_fields_give_stream_or_plan_errors_only(data):
    """Any field of any record changed (with valid checksums): the reader and the planner's
    model refuse with StreamError/PlanError or read it; no other exception escapes."""
    fmt, header, recs = copy.deepcopy(FUZZ_IMAGES)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(-1, len(recs) - 1))
        _poke(data, header if i < 0 else recs[i][1])
    blob = forge(fmt, header, recs)
    try:
        images = read_images(io.BytesIO(blob))
    except (StreamError, PlanError):
        return
    try:
        header2, records = make_plan(images, "exact")
        # what the planner accepted it must plan correctly
        assert simulate(header2, records, images.pages_bodies).ok
    except PlanError:
        pass
    finally:
        images.close()
