"""ordered_map: a function over a list on a few threads, results and errors as a loop gives them.

For work that spends its time in system calls, which release the GIL: reading /proc of several
frozen processes, where the kernel walks each one's page tables for smaps.
"""

import collections
import os
import threading

MAX_THREADS = 8


def cpus():
    return len(os.sched_getaffinity(0))


def ordered_map(fn, items, threads=None):
    """[fn(item) for item in items], fn run on up to ``threads`` threads (default: the CPUs this
    process may use, at most MAX_THREADS).

    Raises what that loop would raise: the exception of the first item, in list order, whose
    call failed.  Items are taken in order and none is started once a call has failed, so every
    item before a failed one has run; items after it may have run too, their results dropped."""
    items = list(items)
    count = min(len(items), threads or min(cpus(), MAX_THREADS))
    if count <= 1:
        return [fn(item) for item in items]
    results, errors = [None] * len(items), [None] * len(items)
    todo = collections.deque(range(len(items)))  # popleft is atomic: each index is taken once
    failed = threading.Event()

    def work():
        while not failed.is_set():
            try:
                i = todo.popleft()
            except IndexError:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as exc:  # raised by the caller below, in item order
                errors[i] = exc
                failed.set()

    # the calling thread only waits: an exception a signal handler raises there (cow-collect's
    # SIGTERM) is then never taken for an item's error
    workers = [threading.Thread(target=work, name=f"cow-map-{n}", daemon=True) for n in range(count)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    except BaseException:
        failed.set()  # the workers stop after their current item
        raise
    for exc in errors:
        if exc is not None:
            raise exc
    return results
