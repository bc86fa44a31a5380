"""Running cowtree's commands from tests: the venv's console scripts, with a timeout."""

import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)
TIMEOUT = 60


def tool(name):
    return os.path.join(BIN, name)


def run(argv, data=None, check=True):
    proc = subprocess.run(argv, input=data, capture_output=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc
