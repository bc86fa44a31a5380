"""cow-show on small fixed streams: the report, the JSON form, and refusal of a bad stream."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_stream import tiny_images

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "show")


def run_show(path, *args):
    return subprocess.run(
        [sys.executable, "-m", "stages.tools.show", *args, path],
        capture_output=True, text=True, timeout=60,
    )


def check_golden(name, text):
    path = os.path.join(GOLDEN, name)
    if os.environ.get("COWTREE_REGEN_GOLDEN") == "1":
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"{name} differs from the golden file (regenerate with COWTREE_REGEN_GOLDEN=1)"


@pytest.fixture
def images_file(tmp_path):
    path = tmp_path / "tiny.cow"
    path.write_bytes(tiny_images())
    return str(path)


def test_report_matches_golden(images_file):
    res = run_show(images_file)
    assert res.returncode == 0, res.stderr
    check_golden("tiny-images.txt", res.stdout)


def test_normal_form_matches_golden(images_file):
    res = run_show(images_file, "--normal")
    assert res.returncode == 0, res.stderr
    assert "P1" in res.stdout and " 100 " not in res.stdout
    check_golden("tiny-images.normal.txt", res.stdout)


def test_json_decodes_frame_maps(images_file):
    res = run_show(images_file, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    vmas = [r for r in doc["records"] if r["kind"] == "vmas"]
    assert vmas[1]["body"]["vmas"][0]["frames"] == [1, 2, 3]
    assert doc["trailer"]["records"] == 6


def test_truncated_stream_exits_1(tmp_path):
    blob = tiny_images()
    path = tmp_path / "cut.cow"
    path.write_bytes(blob[: len(blob) - 10])
    res = run_show(str(path))
    assert res.returncode == 1
    assert "truncated" in res.stderr
