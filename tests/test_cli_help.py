"""Every command's --help runs, names its options and its exit codes."""

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
OPTIONS = {
    "cow-collect": ["--tree", "-o", "--kill", "--leave-stopped", "--progress"],
    "cow-plan": ["-i", "-o", "--strategy", "--check", "--stats", "--explain"],
    "cow-apply": ["-i", "--pidns", "--wait", "--report", "--progress"],
    "cow-show": ["--json", "--normal"],
    "cow-mem": ["--json"],
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_names_options_and_exit_codes(command):
    res = subprocess.run([os.path.join(BIN, command), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    for option in OPTIONS[command]:
        assert option in res.stdout, f"{command} --help does not mention {option}"
    assert "exit codes" in res.stdout
