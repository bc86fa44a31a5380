"""A small workload, without ASLR, dumped and shown in cow-show's normal form.

Regenerate with COWTREE_REGEN_GOLDEN=1 scripts/test tests/test_collect_golden.py.
The trailer lines counting pages with equal bytes are left out: whether two
pages hold equal bytes depends on timing (errno and counters in libc's data),
not on what collect did.  Frame ids and maps are compared in full.
"""

import os
import subprocess
import sys

import pytest

from tests.support.golden import check_golden
from tests.support.workloads import workload  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = os.path.join(ROOT, "stages", "tools", "show.py")
TIMING_DEPENDENT = ("  stored_pages = ", "  page_bytes = ", "pages: ")


@pytest.mark.skipif(not os.path.exists(SHOW), reason="cow-show (stages/tools/show.py) is not there yet")
@pytest.mark.parametrize("pattern", ["same", "split"])
def test_golden_normal_form(workload, tmp_path, pattern):
    wl = workload(pattern, mib=1, no_aslr=True, fixed_path=True)
    out = tmp_path / "images.cow"
    res = subprocess.run([sys.executable, "-m", "stages.collect.cli", "--tree", str(wl.root), "-o", str(out)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    show = subprocess.run([sys.executable, "-m", "stages.tools.show", "--normal", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert show.returncode == 0, show.stderr
    text = "".join(line for line in show.stdout.splitlines(True) if not line.startswith(TIMING_DEPENDENT))
    check_golden(f"collect/{pattern}-1mib.txt", text)
