"""Freezing a process tree with ptrace, and letting it go again.

freeze_tree(root): PTRACE_SEIZE + PTRACE_INTERRUPT every thread of every process
below root, walking /proc/PID/task/*/children again until no new process or
thread shows up (a fork in flight when we stopped the parent has created its
child by the time the parent traps, so the next walk sees it; a thread cloned by
a thread not yet stopped shows up in the next listing of the process's tasks).
A process that exits while being frozen is dropped; one whose main thread has
exited while others run on is not seized but listed in ``leaderless`` (the
caller refuses it).  A process that was group-stopped (state T: kill -STOP, or
left so by cow-collect --leave-stopped) is listed in ``stopped``: the kernel
reports our trap with its stop signal instead of SIGTRAP.

FrozenTree.resume() / leave_stopped() / kill() end the ptrace session; every
path detaches every thread, so a tree is never left frozen by us.  That holds for
a freeze that fails half way too (a process someone else traces, EPERM, a signal):
each thread is booked before it is seized, and resume() lets go of every booked
one, wherever between seize and stop the failure caught it.
"""

import errno
import os
import select
import signal
import time

from . import procfs, ptrace, termination


REAP_GRACE = 1.0  # seconds to wait for the parents of killed processes to reap them




class _SignalsHeld:
    """Block SIGINT/SIGTERM/SIGHUP while the tree is being let go: all or nothing.
    (A class, not contextlib.contextmanager: contextlib's import is ~0.7 ms of cow-collect's start.)"""

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, termination.SIGNALS)  # they raise (termination.catch)

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


class FreezeError(Exception):
    pass


def _exiting(tid):
    try:
        return procfs.read_stat(tid)["state"] in ("Z", "X")
    except OSError:
        return True


def _tracer_of(tid):
    try:
        return int(procfs.read_status(tid).get("TracerPid", "0").split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _comm(pid):
    try:
        return procfs.read_stat(pid)["comm"]
    except OSError:
        return "?"


def _state(tid):
    try:
        return procfs.read_stat(tid)["state"]
    except OSError:
        return None


def _my_tid():
    """The thread id a tracee's TracerPid shows: ptrace belongs to the thread that seized."""
    return int(os.readlink("/proc/thread-self").rsplit("/", 1)[1])


def _thread_group(pid):
    """The process (thread group) pid belongs to, or None when /proc does not know pid."""
    try:
        return int(procfs.read_status(pid)["Tgid"].split()[0])
    except (OSError, KeyError, ValueError, IndexError):
        return None


class FrozenTree:
    def __init__(self, root):
        self.root = root
        self.order = []      # pids, parents before children
        self.threads = {}    # pid -> [tid, ...]
        self.zombies = []    # pids of exited, unreaped children in the tree (not seized)
        self.leaderless = {}  # pid -> threads left: processes whose main thread has exited (not seized)
        self.stopped = set()  # pids of processes that were group-stopped (state T)
        self.departed = []  # pids held for a while but no longer below the root when frozen (let go)
        self.released = False
        # tids booked in threads but not (yet) seen in our stop: maybe not seized, maybe running
        # under us, maybe in a stop we have not waited for; resume() handles them one by one
        self._unsettled = set()

    @property
    def pids(self):
        return list(self.order)

    # -- freezing -------------------------------------------------------------
    def _unbook(self, pid, tid):
        self._unsettled.discard(tid)
        self.threads[pid].remove(tid)

    def _seize_thread(self, pid, tid):
        """Seize and interrupt one thread of pid; the signal of its stop when it is now in ours
        (SIGTRAP, or the stop signal of a group-stopped process), 0 if it is gone.  The thread
        is booked first (a signal may land right after the seize)."""
        self._unsettled.add(tid)
        self.threads[pid].append(tid)
        try:
            ptrace.seize(tid, ptrace.PTRACE_O_TRACESYSGOOD)
        except OSError as exc:
            self._unbook(pid, tid)
            if exc.errno == ptrace.ESRCH:
                return 0
            if exc.errno == errno.EPERM and _exiting(tid):
                return 0  # it is exiting: the kernel refuses to attach to a dying task
            if exc.errno == errno.EPERM:
                other = _tracer_of(tid)
                if other:
                    # a task has one tracer: we cannot freeze it while someone else holds it
                    raise FreezeError(f"process {tid}: already traced by process {other} "
                                      f"({_comm(other)}): cannot freeze it")
            raise FreezeError(f"process {tid}: cannot attach: {os.strerror(exc.errno)}")
        try:
            ptrace.interrupt(tid)
        except OSError as exc:
            if exc.errno == ptrace.ESRCH:
                self._unbook(pid, tid)
                return 0
            raise
        while True:
            try:
                _, status = ptrace.waitpid(tid)
            except ChildProcessError:
                self._unbook(pid, tid)
                return 0
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._unbook(pid, tid)
                return 0
            if ptrace.is_group_stop(status):
                self._unsettled.discard(tid)
                return os.WSTOPSIG(status)
            # a signal-delivery stop came first: deliver the signal, the trap follows
            ptrace.cont(tid, os.WSTOPSIG(status))

    def _freeze_process(self, pid):
        """Seize every thread of pid until no new thread appears; False if pid is gone."""
        try:
            state = procfs.read_stat(pid)["state"]
        except OSError:
            return False
        if state in ("Z", "X"):
            try:
                left = int(procfs.read_status(pid).get("Threads", "1"))
            except (OSError, ValueError):
                left = 1
            if left > 1:  # pthread_exit in main: the process lives on in its other threads
                self.leaderless[pid] = left - 1
            return False
        self.threads.setdefault(pid, [])
        tried = set()
        while True:
            try:
                tids = procfs.tids(pid)
            except OSError:
                tids = []
            new = [t for t in tids if t not in tried]
            if not new:
                break
            for tid in new:
                tried.add(tid)  # a thread that could not be seized is exiting: not tried again
                sig = self._seize_thread(pid, tid)
                if sig and sig != signal.SIGTRAP:
                    self.stopped.add(pid)
        if not self.threads[pid]:
            del self.threads[pid]
            return False
        return True

    def freeze(self):
        tgid = _thread_group(self.root)
        if tgid is None:
            raise FreezeError(f"process {self.root}: no such process")
        if tgid != self.root:
            # /proc/TID answers for a non-main thread too; the tree is rooted at a process
            raise FreezeError(f"process {self.root}: is a thread of process {tgid}, not a process: "
                              f"use --tree {tgid}")
        seen = set()
        while True:
            walk = procfs.walk_tree(self.root)
            if self.root not in walk or not os.path.exists(f"/proc/{self.root}"):
                raise FreezeError(f"process {self.root}: no such process")
            if os.getpid() in walk:
                raise FreezeError(f"process {self.root}: its tree contains this process ({os.getpid()}) itself")
            new = [pid for pid in walk if pid not in seen]
            if not new:
                break
            for pid in new:
                seen.add(pid)
                self._freeze_process(pid)
        if self.root not in self.threads and self.root not in self.leaderless:
            raise FreezeError(f"process {self.root}: exited while being frozen")
        # keep the walk's order (parents first) for the processes we hold
        walk = procfs.walk_tree(self.root)
        self.order = [pid for pid in walk if pid in self.threads]
        # zombies: children that exited and that their (now frozen) parent has not reaped
        self.zombies = [pid for pid in walk if pid not in self.threads and pid not in self.leaderless
                        and _exiting(pid) and os.path.exists(f"/proc/{pid}")]
        # held but no longer below the root: its parent exited while we froze (it went to a
        # reaper outside the tree), or its pid was reused by another process between our
        # listing and our seize.  Either way not the tree's now: let it go, never dump or kill it
        ordered = set(self.order)
        for pid in [pid for pid in self.threads if pid not in ordered]:
            with _SignalsHeld():
                self._detach_process(pid, [])
                del self.threads[pid]
                self.stopped.discard(pid)
            self.departed.append(pid)
        return self

    # -- releasing ------------------------------------------------------------
    def _detach_all(self):
        with _SignalsHeld():
            return self._detach_all_threads()

    def _detach_all_threads(self):
        errors = []
        # children first; a freeze that failed has no order yet, only threads (in walk order)
        ordered = set(self.order)
        pids = self.order + [pid for pid in self.threads if pid not in ordered]
        for pid in reversed(pids):
            self._detach_process(pid, errors)
        self._unsettled.clear()
        self.released = True
        return errors

    def _detach_process(self, pid, errors):
        for tid in self.threads.get(pid, []):
            try:
                if tid in self._unsettled:
                    self._let_go(tid)
                else:
                    ptrace.detach(tid)
            except OSError as exc:
                if exc.errno != ptrace.ESRCH:
                    errors.append(f"process {pid}: detach of thread {tid}: {exc.strerror}")

    def _let_go(self, tid):
        """Detach a thread a failed freeze left between seize and stop.  PTRACE_DETACH needs
        the thread in a ptrace stop, and detaching from a signal-delivery stop with 0 would
        drop that signal: so ask the kernel where the thread is, not our bookkeeping."""
        if _tracer_of(tid) != _my_tid():
            return  # never seized (the seize failed or did not happen), or gone
        if _state(tid) == "t":
            # stopped for us (whether we waited for it or not): which stop says what to pass on
            try:
                signo, code = ptrace.getsiginfo(tid)
            except OSError as exc:
                if exc.errno == ptrace.ESRCH:
                    return
                signo, code = 0, 0
            ptrace.detach(tid, 0 if code >> 8 == ptrace.PTRACE_EVENT_STOP else signo)
            return
        # running under us (seized, the interrupt not sent or not arrived yet): stop it first
        ptrace.interrupt(tid)
        try:
            _, status = ptrace.waitpid(tid)
        except ChildProcessError:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return
        # a signal-delivery stop may come before the trap: its signal goes with the detach
        ptrace.detach(tid, 0 if ptrace.is_group_stop(status) else os.WSTOPSIG(status))

    def resume(self):
        """Detach everything: the tree runs on as if nothing happened."""
        if self.released:
            return []
        return self._detach_all()

    def leave_stopped(self):
        """Detach into group-stop: SIGSTOP is queued first, so each process stops as it resumes."""
        if self.released:
            return []
        with _SignalsHeld():
            for pid in self.order:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            return self._detach_all()

    def kill(self, timeout=10.0):
        """SIGKILL every process and wait until each has left /proc (or is a zombie its
        parent has not reaped yet).  Returns the list of such unreaped zombies."""
        if self.released:
            return []
        with _SignalsHeld():
            return self._kill(timeout)

    def _kill(self, timeout):
        # opened while the pids are surely ours: a pidfd reports POLLHUP once its process is
        # reaped, so the wait below wakes then instead of polling /proc
        pidfds = {}
        for pid in self.order:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except OSError:
                pass
        try:
            return self._kill_and_wait(timeout, pidfds)
        finally:
            for fd in pidfds.values():
                os.close(fd)

    def _kill_and_wait(self, timeout, pidfds):
        for pid in self.order:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # as tracer we are told about each thread's death; collecting that detaches it.
        # The leader last: its death is not reported while other threads are unreaped.
        for pid in self.order:
            for tid in sorted(self.threads.get(pid, []), key=lambda t: t == pid):
                try:
                    ptrace.waitpid(tid)
                except ChildProcessError:
                    pass
        self.released = True
        # dead processes leave /proc once reaped; give parents a moment to do it
        start = time.monotonic()
        poller = select.poll()
        pid_of = {fd: pid for pid, fd in pidfds.items()}
        for fd in pid_of:
            poller.register(fd, 0)  # only POLLHUP, which a pidfd reports once its process is reaped
        reaped = set()
        while True:
            left = []
            for pid in self.order:
                if pid in reaped:
                    continue
                try:
                    st = procfs.read_stat(pid)
                except OSError:
                    continue
                left.append((pid, st["state"], st["ppid"]))
            if not left:
                return []
            elapsed = time.monotonic() - start
            all_dead = all(state in ("Z", "X") for _, state, _ in left)
            if (all_dead and elapsed > REAP_GRACE) or elapsed > timeout:
                return [(pid, ppid) for pid, _, ppid in left]
            if all_dead and all(pid in pidfds for pid, _, _ in left):
                # until the next one is reaped
                for fd, _ in poller.poll(max(REAP_GRACE - elapsed, 0) * 1000 + 1):
                    poller.unregister(fd)
                    reaped.add(pid_of[fd])
            else:
                time.sleep(0.005)


def freeze_tree(root):
    tree = FrozenTree(root)
    try:
        return tree.freeze()
    except BaseException:
        tree.resume()
        raise
