"""The README's main job, small: the demo checkpoints and restores a python3 pre-fork server."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_restores_a_prefork_server_that_answers_again():
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--mib", "16", "--workers", "2"],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("dataset check: ok") == 2
    frames = {}
    for line in res.stdout.splitlines():
        if line.startswith("before the dump"):
            frames["before"] = int(line.split()[-2])
        elif line.startswith("after restore, exact"):
            frames["after"] = int(line.split()[-2])
    assert 0 < frames["after"] <= frames["before"], frames
