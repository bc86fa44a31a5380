"""ordered_map (collect reads /proc of several processes on threads) gives what a plain loop
gives: results in item order, and the error of the first failing item in item order, even when
a later item fails first; and inspect still names the first vanished process of the tree."""

import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from stages.collect.collector import Collection, CollectError
from stages.collect.parallel import ordered_map


def test_results_in_item_order_on_several_threads():
    names = set()

    def slow_square(x):
        names.add(threading.current_thread().name)
        time.sleep(0.01 * (5 - x % 5))  # later items finish first
        return x * x

    assert ordered_map(slow_square, range(10), threads=3) == [x * x for x in range(10)]
    assert len(names) == 3  # really on three threads, none of them the caller
    assert threading.current_thread().name not in names


def test_the_first_failing_item_in_order_wins_not_the_first_in_time():
    def fail(x):
        if x == 0:
            time.sleep(0.2)  # fails last
            raise KeyError("item 0")
        raise ValueError(f"item {x}")

    with pytest.raises(KeyError, match="item 0"):
        ordered_map(fail, range(4), threads=4)


def test_no_item_starts_after_a_failure():
    started = []

    def work(x):
        started.append(x)
        if x == 1:
            raise ValueError("item 1")
        time.sleep(0.05)
        return x

    with pytest.raises(ValueError, match="item 1"):
        ordered_map(work, range(20), threads=2)
    # items 0 and 1 ran at once; at most the one item taken while 1 was failing follows
    assert sorted(started)[:2] == [0, 1] and len(started) <= 3


def test_one_thread_is_the_plain_loop():
    caller = threading.current_thread().name
    assert ordered_map(lambda x: (x, threading.current_thread().name), [3, 1], threads=1) == [(3, caller), (1, caller)]
    assert ordered_map(str, []) == []


def test_inspect_names_the_first_vanished_process_in_tree_order():
    """Views read on threads: a pid gone gives the CollectError the sequential loop gave, for
    the first such pid in the tree's order (which error wins: the tests above)."""
    live = subprocess.Popen(["sleep", "60"], close_fds=True)
    gone = []
    for _ in range(2):
        p = subprocess.Popen(["true"], close_fds=True)
        p.wait()  # reaped: its pid has no /proc entry (until reused)
        gone.append(p.pid)
    try:
        order = [live.pid, live.pid, gone[0], live.pid, gone[1]]
        tree = SimpleNamespace(order=order, zombies=[], leaderless={},
                               threads={pid: [pid] for pid in order})
        with pytest.raises(CollectError, match=rf"^process {gone[0]}: exited while the tree was frozen \(killed\?\)$"):
            Collection(tree).inspect()
    finally:
        live.kill()
        live.wait()
