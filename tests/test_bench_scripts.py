"""The benchmark scripts still run (small sizes, no CRIU): they are how #7's figures are made,
and a script that rots is found here rather than when someone needs its numbers."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_collect_times_every_run_and_leaves_the_tree_intact(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_collect.py"), "--mib", "4", "--runs", "2",
         "--patterns", "same", "orphans", "--no-criu", "--dir", str(tmp_path)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "criu: skipped" not in out  # --no-criu: not looked for at all
    for pattern in ("same", "orphans"):
        assert len(re.findall(rf"(?m)^  run \d: cow-collect +[\d.]+ s", out.split(pattern, 1)[1])) >= 2, out
        assert re.search(rf"(?m)^{pattern} 4 MiB, medians: cow-collect [\d.]+ s$", out), out
    # the images are deleted as it goes, and its work directory at the end
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
