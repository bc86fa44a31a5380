"""Credentials, capabilities and simple per-process state (rlimits, nice, scheduler policy,
CPU affinity, oom_score_adj, umask, cwd, personality, subreaper, pdeathsig, dumpable,
no_new_privs): collected, shown, restored, and read back
from inside the restored processes (tests/workloads/statewl.c)."""

import json
import os
import shutil
import signal
import tempfile

import pytest

from tests.support.workloads import ask_inside, build, proc_state, running_workload, wait_killed

from tests.support.commands import run, tool  # noqa: F401


@pytest.fixture
def statewl():
    """Start statewl in a fresh 0777 directory (its root drops to uid 1004); everything it
    started, and every pid added to .pids, is killed and reaped at teardown."""
    outdir = tempfile.mkdtemp(prefix="statewl-", dir="/tmp")
    os.chmod(outdir, 0o777)
    try:
        with running_workload([build("statewl"), outdir], outdir, tree=True) as w:
            yield w
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_credentials_and_process_state_restored(statewl, tmp_path):
    root, child = statewl.order
    before = {pid: ask_inside(statewl.outdir, pid, pid) for pid in (root, child)}
    # the workload did set what it claims (so the comparison below is not vacuous)
    assert before[root]["uids"] == "1004 1005 1006 1006" and before[root]["gids"] == "1001 1002 1003 1003"
    assert before[root]["groups"] == "4 27 1234" and before[child]["groups"] == "5 6"
    assert (before[root]["nice"], before[child]["nice"]) == ("5", "3")
    assert (before[root]["umask"], before[child]["umask"]) == ("27", "77")
    assert before[root]["subreaper"] == "1" and before[child]["pdeathsig"] == str(int(signal.SIGWINCH))
    assert (before[root]["dumpable"], before[child]["dumpable"]) == ("1", "0")
    assert before[child]["no_new_privs"] == "1" and before[root]["no_new_privs"] == "0"
    assert before[root]["personality"] == "0x40000" and before[child]["personality"] == "0x20000"
    assert before[root]["rlimit7"] == "250 300" and before[child]["rlimit7"] == "100 200"
    assert before[root]["rlimit4"] == "0 1048576"
    assert before[root]["cwd"] == statewl.outdir
    bit = lambda *caps: f"{sum(1 << c for c in caps):016x}"  # noqa: E731
    NET_BIND_SERVICE, NET_RAW, SYS_MODULE, SYS_PTRACE, SYS_BOOT = 10, 13, 16, 19, 22
    assert (before[root]["CapEff"], before[root]["CapPrm"]) == (bit(NET_BIND_SERVICE), bit(NET_BIND_SERVICE, NET_RAW))
    assert (before[root]["CapInh"], before[root]["CapAmb"]) == (bit(NET_BIND_SERVICE, NET_RAW), bit(NET_RAW))
    assert not int(before[root]["CapBnd"], 16) >> SYS_BOOT & 1 and int(before[child]["CapBnd"], 16) >> SYS_BOOT & 1
    assert not int(before[child]["CapBnd"], 16) >> SYS_MODULE & 1
    assert not int(before[child]["CapEff"], 16) >> SYS_PTRACE & 1 and int(before[child]["CapPrm"], 16) >> SYS_PTRACE & 1
    assert (before[child]["CapInh"], before[child]["CapAmb"]) == (bit(NET_RAW), bit(NET_RAW))
    assert (before[root]["securebits"], before[child]["securebits"]) == ("0x10", "0x1")
    assert (before[root]["sched"], before[child]["sched"]) == ("0x2 3", "0x40000003 0")  # RR 3; BATCH, reset-on-fork
    assert before[child]["cpus"] == "0" and before[root]["cpus"] == " ".join(map(str, sorted(os.sched_getaffinity(0))))
    assert (before[root]["oom_score_adj"], before[child]["oom_score_adj"]) == ("700", "300")
    status_before = {pid: status(pid) for pid in (root, child)}

    images = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
    shown = run([tool("cow-show")], images).stdout.decode()
    assert "creds uids [1004, 1005, 1006, 1006] gids [1001, 1002, 1003, 1003] groups [4, 27, 1234]" in shown, shown
    assert "nice 3 personality 0x20000 subreaper 0 pdeathsig 28 dumpable 0 no_new_privs 1" in shown, shown
    assert "caps eff 0x400 per 0x2400 inh 0x2400 bou " in shown and " amb 0x2000 securebits 0x10" in shown, shown
    assert "sched RR priority 3 cpus " in shown and "oom_score_adj 700" in shown, shown
    assert "sched BATCH priority 0 reset_on_fork cpus 0 oom_score_adj 300" in shown, shown
    wait_killed(statewl.popen, (root, child))

    report = tmp_path / "apply.json"
    run([tool("cow-apply"), "--report", str(report)], run([tool("cow-plan")], images).stdout)
    rep = json.loads(report.read_text())
    outer = {int(k): int(v) for k, v in rep["pids"].items()}
    statewl.pids.update(outer.values())
    assert outer == {root: root, child: child}
    for pid in (root, child):
        after = ask_inside(statewl.outdir, pid, outer[pid])
        assert after == before[pid], {k: (before[pid].get(k), after.get(k)) for k in after if after.get(k) != before[pid].get(k)}
        st = status(pid)
        for key in ("Uid", "Gid", "Groups", "NoNewPrivs", "Umask", "CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            assert st[key] == status_before[pid][key], key
    assert all(proc_state(p) == "S" for p in (root, child))


def test_non_root_caller_is_refused_other_credentials(statewl, tmp_path):
    """A caller that is not root may only restore its own credentials: cow-apply's check,
    run in a forked process of ours that became uid 1004 / gid 1001 (the root's real ids),
    refuses the plan (the root has other effective ids, the child is uid 0); as root it passes."""
    import io
    import types

    from stages.apply.check import check_state
    from stages.stream import StreamReader

    root, child = statewl.order
    plan_bytes = run([tool("cow-plan")], run([tool("cow-collect"), "--tree", str(root)]).stdout).stdout
    plan = types.SimpleNamespace(processes=[r.body for r in StreamReader(io.BytesIO(plan_bytes)) if r.kind == "process"])
    check_state(plan)  # root: any credentials

    def become_uid_1004():
        os.setgroups([])
        os.setresgid(1001, 1001, 1001)
        os.setresuid(1004, 1004, 1004)

    msg = _check_state_in_child(plan, become_uid_1004)
    assert msg.startswith(f"refused: process {root}: uids [1004, 1005, 1006, 1006]"), msg
    assert "only root may restore credentials other than its own" in msg, msg
    assert all(proc_state(p) == "S" for p in (root, child))  # the originals run on


def _check_state_in_child(plan, prepare):
    """check_state(plan) in a forked process of ours after prepare(): 'passed' or 'refused: ...'."""
    from stages.apply.check import Refusal, check_state

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(r)
            prepare()
            try:
                check_state(plan)
                msg = "passed"
            except Refusal as exc:
                msg = f"refused: {exc}"
            os.write(w, msg.encode())
        except BaseException as exc:
            os.write(w, f"error: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    return msg


def test_capabilities_and_oom_beyond_the_caller_are_refused(statewl):
    """cow-apply never gives a process capabilities or an oom_score_adj it could not have
    itself: as a root without CAP_NET_RAW (permitted) or without CAP_SYS_MODULE in its
    bounding set, or with a higher oom_score_adj (no CAP_SYS_RESOURCE here), it refuses."""
    import ctypes
    import io
    import types

    from stages.apply.check import check_state
    from stages.stream import StreamReader

    root, child = statewl.order
    plan_bytes = run([tool("cow-plan")], run([tool("cow-collect"), "--tree", str(root)]).stdout).stdout
    plan = types.SimpleNamespace(processes=[r.body for r in StreamReader(io.BytesIO(plan_bytes)) if r.kind == "process"])
    check_state(plan)  # as we are: passes
    libc = ctypes.CDLL(None, use_errno=True)

    def drop_net_raw():
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        assert libc.syscall(125, hdr, data) == 0  # capget
        for i in (0, 1):  # effective, permitted of the low word
            data[i] &= ~(1 << 13)
        assert libc.syscall(126, hdr, data) == 0, ctypes.get_errno()  # capset

    def drop_sys_module_bounding():
        assert libc.prctl(24, 16, 0, 0, 0) == 0  # PR_CAPBSET_DROP CAP_SYS_MODULE

    def raise_oom():
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("800")

    msg = _check_state_in_child(plan, drop_net_raw)
    assert msg == f"refused: process {root}: capabilities 13 are permitted, cow-apply does not have them", msg
    msg = _check_state_in_child(plan, drop_sys_module_bounding)
    assert msg.startswith(f"refused: process {root}: bounding set holds 16, cow-apply's does not"), msg
    if not int(status(os.getpid())["CapEff"], 16) >> 24 & 1:  # no CAP_SYS_RESOURCE: it cannot lower it
        msg = _check_state_in_child(plan, raise_oom)
        assert msg == (f"refused: process {root}: oom_score_adj 700 is below cow-apply's 800 "
                       "(lowering it needs CAP_SYS_RESOURCE)"), msg
    assert all(proc_state(p) == "S" for p in (root, child))
