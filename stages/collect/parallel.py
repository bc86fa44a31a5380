"""Work on a few threads, for work that spends its time in system calls, which release the GIL.

ordered_map: a function over a list, results and errors as a loop gives them (reading /proc of
several frozen processes, where the kernel walks each one's page tables for smaps).
Workers: threads running a function on arguments submitted one by one, a Job for each
(reading the pages of the next records, the pagemaps of the next processes).
"""

import collections
import os
import threading
from _queue import SimpleQueue  # what queue.SimpleQueue is, without the queue module's import

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


class Job:
    __slots__ = ("args", "done", "value", "error")

    def __init__(self, args):
        self.args, self.done, self.value, self.error = args, threading.Event(), None, None

    def result(self, poll=None, every=None):
        """The value (or the error raised); poll() is called every ``every`` seconds while waiting."""
        while not self.done.wait(every if poll else None):
            poll()
        if self.error is not None:
            raise self.error
        return self.value


class Workers:
    """``count`` threads running fn on submitted arguments; results come back per job.
    (concurrent.futures would do, but importing it costs cow-collect 12 ms.)"""

    def __init__(self, fn, count, name="cow-work"):
        self.fn, self.jobs = fn, SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                        for i in range(count)]
        for t in self.threads:
            t.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job.value = self.fn(*job.args)
            except BaseException as exc:  # handed to the caller by result()
                job.error = exc
            job.done.set()

    def submit(self, *args):
        job = Job(args)
        self.jobs.put(job)
        return job

    def close(self):
        """The threads end once the jobs submitted so far are done."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
