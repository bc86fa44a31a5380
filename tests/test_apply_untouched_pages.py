"""Untouched pages of two VMAs of one process (tests/workloads/holes.c): cow-plan once gave
both the same staging slot, and cow-apply failed after the tree was created (the restorer
had moved that slot's page into the first VMA already).  Restored for real, checked inside."""

import os

from tests.support.commands import run, tool
from tests.support.workloads import ask, build, running_workload, wait_killed


def test_two_vmas_with_untouched_pages_restore(tmp_path):
    outdir = str(tmp_path)
    with running_workload([build("holes"), outdir], outdir, tree=True) as w:
        root = w.popen.pid
        (child,) = set(w.order) - {root}  # ready lists the pids in directory order
        for pid in (root, child):
            assert ask(os.path.join(outdir, f"{pid}.check"), pid).startswith("ok"), pid
        images = run([tool("cow-collect"), "--tree", str(root), "--kill"]).stdout
        wait_killed(w.popen, (root, child))
        plan = run([tool("cow-plan"), "--check"], images).stdout
        res = run([tool("cow-apply")], plan, check=False)
        assert res.returncode == 0, res.stderr.decode()
        assert int(res.stdout.split()[-1]) == root
        for pid in (root, child):
            answer = ask(os.path.join(outdir, f"{pid}.check"), pid)
            assert answer.startswith("ok"), (pid, answer)  # own pages back; untouched ones zeros
