"""Golden files: compare a text with tests/golden/<path>, or rewrite it on request.

Golden files are regenerated only with COWTREE_REGEN_GOLDEN=1 (e.g.
``COWTREE_REGEN_GOLDEN=1 scripts/test tests/test_collect_golden.py``); a changed
golden file is reviewed like code.
"""

import os

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")


def regenerating():
    return os.environ.get("COWTREE_REGEN_GOLDEN") == "1"


def check_golden(relpath, text):
    path = os.path.join(GOLDEN, relpath)
    if regenerating():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if not os.path.exists(path):
        raise AssertionError(f"no golden file {relpath}: create it with COWTREE_REGEN_GOLDEN=1")
    with open(path) as f:
        expected = f.read()
    assert text == expected, f"{relpath} differs from the golden file (regenerate with COWTREE_REGEN_GOLDEN=1)"
