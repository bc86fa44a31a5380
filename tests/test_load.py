"""Load, kept fast (scripts/bench_load.py is the big version with the same code): a tree of
16 processes sharing 16 MiB, and one process with 20,000 VMAs, through collect, plan and
apply; the restored trees must check ok, use no more frames, and keep their VMAs."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_load", os.path.join(ROOT, "scripts", "bench_load.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture
def run_load(tmp_path):
    """start(name, args) -> (workload, figures); every original and restored process killed after."""
    started, restored = [], []

    def run(name, args):
        wl = bench.start(name, args, tmp_path)
        started.append(wl)
        work = tmp_path / f"{name}-streams"
        work.mkdir()
        vmas_before = bench.vma_count(wl.root)
        fig = bench.pipeline(wl, str(work), restored)
        fig["vmas_before"], fig["vmas_after"] = vmas_before, bench.vma_count(wl.root)
        print(name, args, fig)  # the figures, for -s
        return wl, fig

    yield run
    for r in restored:
        r.kill()
    for wl in started:
        wl.kill_tree()


def test_wide_tree_sharing_one_region(run_load):
    wl, fig = run_load("fanout", (16, 16))
    assert fig["restored_pids"] and fig["checks_ok"] == 16, fig
    assert fig["frames_after"] <= fig["frames_before"], fig
    # 16 MiB shared once plus one page per child, not 16 copies
    assert fig["apply"]["pages_written"] < 2 * 16 * 256, fig
    # the planner keeps no page bytes: above the interpreter's own RSS (cow-plan --help),
    # it needs well under half the image
    _, baseline_kib, _ = bench.stage([os.path.join(bench.BIN, "cow-plan"), "--help"])
    grown = (fig["plan"]["maxrss_kib"] - baseline_kib) * 1024
    assert grown < fig["collect"]["bytes"] / 2, (grown, fig)


def test_process_with_20000_vmas(run_load):
    wl, fig = run_load("manyvmas", (20000,))
    assert fig["vmas_before"] > 20000, fig  # the workload really has them (none merged)
    assert fig["vmas_after"] == fig["vmas_before"], fig
    assert fig["checks_ok"] == 1 and fig["frames_after"] <= fig["frames_before"], fig
