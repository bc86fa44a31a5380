"""cow-apply's work once the plan is spooled and checked: create, fill, hand over, resume.

  create   the tree in plan order (clone3 with set_tid; --pidns: a native init as
           pid 1 first), each process an agent of ours, seized by us (ptrace);
  fill     each process maps its staging ranges and runs its steps (writes from
           the spool: fill.py, forks, drops), depth first;
  handover each process gets the restorer blob and its program and jumps into it;
           the blob clones the other threads with their tids (each traced from its
           first instruction: PTRACE_O_TRACECLONE); every thread stops (SIGSTOP) when
           done, the main thread when its layout is the dumped one;
  resume   registers, xstate and signal mask of every thread as dumped (syscall restart applied),
           the blob unmapped by a syscall injected into the process, then the
           whole tree is detached together (a process that was stopped, state T,
           when dumped gets a SIGSTOP first: it stops again).
Anything failing after the first process exists kills every process created.
"""

import os
import signal
import time

from stages._native import lib
from stages.linux import ptrace

from . import addresses, agent as agent_mod, pipes as pipes_mod, program as program_mod, restorer
from . import shmem as shmem_mod
from .agent import Agent, Channel
from .fill import Filler

PAGE = 4096
PROT_RW, PROT_RWX = 3, 7
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x02, 0x10, 0x20, 0x100
SYS_MUNMAP = 11
SYS_SETSID, SYS_SETPGID, SYS_GETPGID = 112, 109, 121
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
SIGTRAP_SYSCALL = signal.SIGTRAP | 0x80
# TRACECLONE: a thread the restorer clones is ours from its first instruction (the agents'
# forks use exit signal SIGCHLD: fork events, which we do not trace)
SEIZE_OPTIONS = ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACECLONE
U64 = (1 << 64) - 1
PTRACE_EVENT_CLONE = 3


class ApplyError(Exception):
    pass


def growsdown_ranges(processes):
    """Ids of anon ranges whose pieces all go to growsdown VMAs (stacks).

    mremap keeps a VMA's flags, so a stack moved out of a range mapped with
    MAP_GROWSDOWN can still grow after restore; a plain range would make it fixed-size.
    """
    use = {}
    for proc in processes:
        for vma in proc["layout"]:
            gd = "gd" in vma["vmflags"]
            for piece in vma["pieces"]:
                use[piece[0]] = use.get(piece[0], True) and gd
    return {rid for rid, all_gd in use.items() if all_gd}


def resume_regs(regs):
    """The registers a resumed process starts with, from the dumped ones.

    A process frozen in a system call carries the kernel's restart code in rax.
    We do what signal return would: re-execute the syscall (rax = orig_rax,
    rip -= 2).  For -ERESTART_RESTARTBLOCK (nanosleep, clock_nanosleep, poll
    with a timeout) the kernel would call restart_syscall with a restart block
    that a new process does not have, so the original syscall is re-issued with
    its original arguments: a relative sleep starts again from its full length.
    orig_rax = -1 afterwards so the kernel adds no restart logic of its own.
    """
    regs = dict(regs)
    orig = regs["orig_rax"]
    rax = regs["rax"] - (1 << 64) if regs["rax"] >> 63 else regs["rax"]
    if not orig >> 63 and -rax in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
        regs["rax"] = orig
        regs["rip"] -= 2
    regs["orig_rax"] = U64
    return regs


class Restore:
    def __init__(self, plan, pidns=False, log=None, progress=None):
        self.plan = plan
        self.pidns = pidns
        self.log = log or (lambda msg: None)
        self.progress = progress  # progress(pages written so far), after every write
        self.ranges = {r["id"]: r for p in plan.processes for r in p["ranges"]}
        self.growsdown = growsdown_ranges(plan.processes)
        self.agents = {}  # plan pid -> Agent
        self.channels = {}
        self.init = None  # --pidns: the namespace's pid 1 (an Agent)
        self.created = []  # outer pids, creation order
        self.traced = set()
        self.programs = {}
        self.phases = {}
        self.pages_written = 0
        self.window = self.blob_region = None
        self.filler = None
        self.pipe_fds = {}  # pipe description -> fd in cow-apply (inherited by the whole tree)
        self.shmem_fds = {}  # shared memory object id -> fd in cow-apply (inherited likewise)
        self.shmem_desc_fds = {}  # memfd open file description id -> fd in cow-apply
        self.threads = {}  # plan pid -> [outer tid of each thread but the main one], image order

    # -- phases -------------------------------------------------------------------------------

    def run(self):
        become_subreaper()
        t = time.monotonic()
        self.prepare()
        self._phase("prepare", t)
        try:
            t = time.monotonic()
            self.create_root()
            self.start_process(self.plan.processes[0]["pid"])
            self._phase("create_fill", t)
            t = time.monotonic()
            self.handover()
            self._phase("handover", t)
            t = time.monotonic()
            self.resume()
            self._phase("resume", t)
        except BaseException:
            self.kill_all()
            raise
        finally:
            self.close_channels()

    def _phase(self, name, t0):
        self.phases[name] = round(time.monotonic() - t0, 6)

    def prepare(self):
        """Programs for every process, window and restorer region chosen and reserved."""
        plan = self.plan
        self.own_vdso = program_mod_own_vdso()
        size = max(plan.header["window"]["size"], PAGE)
        self.pipe_fds = pipes_mod.create(plan.processes)
        self.shmem_fds, self.shmem_desc_fds = shmem_mod.create(plan)
        # the programs' size depends on the addresses only through values, not lengths:
        # build once with provisional addresses to size the region
        provisional = [program_mod.build(p, self.ranges, (0, size), (0, PAGE), self.own_vdso, (0, 0), self.pipe_fds,
                                         shmem_fds=self.shmem_fds, shmem_desc_fds=self.shmem_desc_fds)
                       for p in plan.processes]
        blob_size = max(p.size_estimate() for p in provisional) + 2 * PAGE + 8 * PAGE  # slack, vDSO parking
        base, blob = addresses.choose(plan, blob_size)
        self.window = (base, size)
        self.blob_region = (blob, blob_size)
        scratch = (blob + blob_size - 8 * PAGE, 8 * PAGE)
        for proc in plan.processes:
            self.programs[proc["pid"]] = program_mod.build(
                proc, self.ranges, self.window, self.blob_region, self.own_vdso, scratch, self.pipe_fds,
                is_root=proc is plan.processes[0], shmem_fds=self.shmem_fds, shmem_desc_fds=self.shmem_desc_fds)
        self.filler = Filler(self.ranges, plan, base)
        for proc in plan.processes:
            self.channels[proc["pid"]] = Channel()

    def create_root(self):
        root = self.plan.processes[0]["pid"]
        channel = self.channels[root]
        if self.pidns:
            init_channel = Channel()
            self.channels[0] = init_channel
            pid = agent_mod.spawn(init_channel, new_pidns=True)
            self.created.append(pid)
            self.init = Agent(pid, init_channel, 1)
            self._seize(self.init)  # EXITKILL: if cow-apply dies, the namespace goes with it
            ns_pid = self.init.fork(root, channel)
            outer = agent_mod.outer_pid_of(pid, ns_pid)
        else:
            outer = ns_pid = agent_mod.spawn(channel, set_tid=root)
        self.created.append(outer)
        if ns_pid != root:
            raise ApplyError(f"process {root} was created with pid {ns_pid}")
        self.agents[root] = Agent(outer, channel, ns_pid)
        self._seize(self.agents[root])

    def _seize(self, ag):
        ptrace.seize(ag.pid, SEIZE_OPTIONS)
        self.traced.add(ag.pid)

    def start_process(self, pid):
        """Session/group, staging ranges, then the steps (children depth first)."""
        proc = self.plan.by_pid[pid]
        ag = self.agents[pid]
        self._session(proc, ag)
        base = self.window[0]
        for rng in proc["ranges"]:
            addr = base + rng["offset"]
            if rng["backing"] == "file":
                fd = ag.open(rng["path"], os.O_RDONLY)
                try:
                    ag.mmap(addr, rng["size"], PROT_RW, MAP_PRIVATE | MAP_FIXED, fd, rng.get("pgoff", 0))
                finally:
                    ag.close(fd)
            else:
                flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED
                if rng["id"] in self.growsdown:
                    flags |= MAP_GROWSDOWN
                ag.mmap(addr, rng["size"], PROT_RW, flags)
            self.filler.mapped(pid, rng["id"])
        for step in proc["steps"]:
            op = step["op"]
            if op == "write":
                self._write(ag, step["range"], step["pages"])
            elif op == "drop":
                rng = self.ranges[step["range"]]
                ag.syscall(SYS_MUNMAP, base + rng["offset"], rng["size"], what=f"drop range {rng['id']}")
                self.filler.dropped(pid, rng["id"])
            elif op == "fork":
                child = step["pid"]
                self.filler.forked(pid, child)
                ns_pid = ag.fork(child, self.channels[child])
                outer = agent_mod.outer_pid_of(ag.pid, ns_pid) if self.pidns else ns_pid
                self.created.append(outer)
                if ns_pid != child:
                    raise ApplyError(f"process {child} was created with pid {ns_pid}")
                self.agents[child] = Agent(outer, self.channels[child], ns_pid)
                self._seize(self.agents[child])
                self.start_process(child)
        self.filler.done(pid)

    def _session(self, proc, ag):
        image = proc["image"]
        pid, sid, pgid = proc["pid"], image["sid"], image["pgid"]
        if sid == pid:
            ag.syscall(SYS_SETSID, what="setsid")
        elif pgid == pid:
            ag.syscall(SYS_SETPGID, 0, 0, what="setpgid")
        elif pgid and ag.syscall(SYS_GETPGID, 0) != pgid:
            try:
                ag.syscall(SYS_SETPGID, 0, pgid, what=f"setpgid {pgid}")
            except OSError as exc:
                self.log(f"process {pid}: process group {pgid} not restored ({exc.strerror})")

    def _write(self, ag, range_id, packed):
        self.pages_written += self.filler.write(ag, ag.ns_pid, range_id, packed)
        if self.progress:
            self.progress(self.pages_written)

    def handover(self):
        blob_base, blob_size = self.blob_region
        entered = []
        for proc in self.plan.processes:
            pid = proc["pid"]
            ag = self.agents[pid]
            image, entry, prog_addr, stack_top, total = self.programs[pid].image(blob_base)
            ag.mmap(blob_base, blob_size, PROT_RWX, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
            agent_mod.vm_write(ag.pid, blob_base, image)
            ag.enter(entry, prog_addr, stack_top)
            entered.append((pid, prog_addr))
        for pid, prog_addr in entered:
            self._wait_restorer(pid, prog_addr)
        pipes_mod.close_all(self.pipe_fds)  # every process holds its own now: EOF works as dumped
        shmem_mod.close_all(self.shmem_fds)  # every process has mapped (and closed) its own
        shmem_mod.close_all(self.shmem_desc_fds)
        if self.init is not None:
            self._init_to_reaper()

    def _init_to_reaper(self):
        """The namespace's pid 1 sheds cow-apply's memory and becomes a reaper in the blob."""
        blob_base, blob_size = self.blob_region
        prog = program_mod.build_init(self.plan.processes[0]["pid"], self.blob_region)
        image, entry, prog_addr, stack_top, _ = prog.image(blob_base)
        self.init.mmap(blob_base, blob_size, PROT_RWX, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        agent_mod.vm_write(self.init.pid, blob_base, image)
        self.init.enter(entry, prog_addr, stack_top)
        deadline = time.monotonic() + 5
        while True:  # it never stops on success: watch its progress instead
            finished, done, error = restorer.read_outcome(agent_mod.vm_read(self.init.pid, prog_addr, restorer.HEADER.size))
            if finished or error:
                raise ApplyError(f"pid namespace init: operation {done} {prog.describe(done)} failed: "
                                 f"{os.strerror(-error) if error < 0 else error}")
            if done == len(prog.ops) - 1:  # in the reap loop: ours no more
                ptrace.interrupt(self.init.pid)
                ptrace.waitpid(self.init.pid)
                ptrace.detach(self.init.pid)
                self.traced.discard(self.init.pid)
                return
            if time.monotonic() > deadline:
                raise ApplyError("pid namespace init did not reach its reap loop")
            time.sleep(0.001)

    def _wait_restorer(self, pid, prog_addr):
        ag = self.agents[pid]
        threads = self.threads.setdefault(pid, [])
        while True:
            _, status = ptrace.waitpid(ag.pid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.traced.discard(ag.pid)
                how = f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}"
                raise ApplyError(f"process {pid} died in the restorer ({how})")
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGSTOP:
                break
            if status >> 8 == signal.SIGTRAP | PTRACE_EVENT_CLONE << 8:
                threads.append(self._thread_born(pid, ptrace.geteventmsg(ag.pid)))
                ptrace.cont(ag.pid)
                continue
            if ptrace.is_group_stop(status):
                ptrace.cont(ag.pid)
                continue
            regs = ptrace.get_regs(ag.pid)
            raise ApplyError(f"process {pid}: signal {sig} in the restorer at rip {regs['rip']:#x}")
        finished, done, error = restorer.read_outcome(agent_mod.vm_read(ag.pid, prog_addr, restorer.HEADER.size))
        prog = self.programs[pid]
        if error and done < len(prog.ops) and prog.ops[done][0] == restorer.OP_WAIT_THREAD:
            self._check_threads(pid)  # says which thread's operation failed
        if error or not finished:
            what = prog.describe(done) if done < len(prog.ops) else "?"
            raise ApplyError(f"process {pid}: restorer operation {done} {what} failed: "
                             f"{os.strerror(-error) if error < 0 else error}")
        self._check_threads(pid)
        oom = (self.plan.by_pid[pid]["image"].get("state") or {}).get("oom_score_adj")
        if oom is not None:  # written from outside: the restorer has no write op (check.py allowed it)
            try:
                with open(f"/proc/{ag.pid}/oom_score_adj", "w") as f:
                    f.write(str(oom))
            except OSError as exc:
                raise ApplyError(f"process {pid}: setting oom_score_adj {oom}: {exc.strerror}")

    def _thread_born(self, pid, tid):
        """A thread the restorer just cloned, in its first stop: let it run its own ops
        (it stops itself when done).  Returns its tid (as cow-apply sees it)."""
        while True:
            _, status = ptrace.waitpid(tid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                raise ApplyError(f"process {pid}: thread {tid} died as it was created")
            if ptrace.is_group_stop(status):
                ptrace.cont(tid)
                return tid
            raise ApplyError(f"process {pid}: thread {tid}: unexpected first stop {status:#x}")

    def _check_threads(self, pid):
        """Every thread ran its ops and stopped itself, with the dumped tid."""
        prog = self.programs[pid]
        made = self.threads.get(pid, [])
        want = prog.threads(self.blob_region[0])
        ag_pid = self.agents[pid].pid
        for outer, (tid, status_addr, first) in zip(made, want):
            while True:
                _, status = ptrace.waitpid(outer)
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    raise ApplyError(f"process {pid}: thread {tid} died in the restorer")
                if os.WSTOPSIG(status) == signal.SIGSTOP and not ptrace.is_group_stop(status):
                    break
                if ptrace.is_group_stop(status):
                    ptrace.cont(outer)
                    continue
                regs = ptrace.get_regs(outer)
                raise ApplyError(f"process {pid}: thread {tid}: signal {os.WSTOPSIG(status)} in the restorer "
                                 f"at rip {regs['rip']:#x}")
            done, error, finished, ns_tid = restorer.THREAD_STATUS.unpack(
                agent_mod.vm_read(ag_pid, status_addr, restorer.THREAD_STATUS.size))
            if error or not finished:
                raise ApplyError(f"process {pid}: thread {tid}: restorer operation {first + done} "
                                 f"{prog.describe(first + done)} failed: {os.strerror(-error) if error < 0 else error}")
            if ns_tid != tid:
                raise ApplyError(f"process {pid}: thread {tid} was created with tid {ns_tid} (process {ag_pid})")
        if len(made) != len(want):
            raise ApplyError(f"process {pid}: {len(made)} of {len(want)} threads were created")

    def resume(self):
        """The blob goes (no thread runs in it: each is stopped, and gets its dumped
        registers here), then every thread of every process is let go together."""
        blob_base, blob_size = self.blob_region
        for proc in self.plan.processes:
            pid = proc["pid"]
            ag = self.agents[pid]
            syscall_at = self._syscall_insn(proc, ag)
            self._inject(ag, syscall_at, SYS_MUNMAP, blob_base, blob_size)
            for tid, thread in zip([ag.pid] + self.threads.get(pid, []), proc["image"]["threads"]):
                ptrace.set_regs(tid, resume_regs(ptrace.regs_from_bytes(thread["regs"])))
                ptrace.set_xstate(tid, thread["xstate"])
                ptrace.set_sigmask(tid, thread["sigmask"])
        for proc in self.plan.processes:  # the whole tree goes at once
            ag = self.agents[proc["pid"]]
            if (proc["image"].get("state") or {}).get("stopped"):
                os.kill(ag.pid, signal.SIGSTOP)  # stopped when dumped: it stops again once let go
            for tid in self.threads.get(proc["pid"], []):
                ptrace.detach(tid)
            ptrace.detach(ag.pid)
            self.traced.discard(ag.pid)

    def _syscall_insn(self, proc, ag):
        """A `syscall` instruction in the restored process's own vDSO or text."""
        for kind in ("vdso", "file"):
            for vma in proc["layout"]:
                if vma["kind"] == kind and vma["prot"] & 4:
                    code = agent_mod.vm_read(ag.pid, vma["start"], vma["end"] - vma["start"])
                    at = code.find(b"\x0f\x05")
                    if at >= 0:
                        return vma["start"] + at
        raise ApplyError(f"process {proc['pid']}: no syscall instruction to unmap the restorer with")

    def _inject(self, ag, at, nr, *args):
        regs = ptrace.get_regs(ag.pid)
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            regs[name] = value & U64
        regs.update(rax=nr, orig_rax=U64, rip=at)
        ptrace.set_regs(ag.pid, regs)
        for phase in ("entry", "exit"):
            ptrace.ptrace(ptrace.PTRACE_SYSCALL, ag.pid, 0, 0, "PTRACE_SYSCALL")
            _, status = ptrace.waitpid(ag.pid)
            if not os.WIFSTOPPED(status) or os.WSTOPSIG(status) != SIGTRAP_SYSCALL:
                raise ApplyError(f"process {ag.ns_pid}: unexpected status {status:#x} at syscall {phase} of {nr}")
        result = ptrace.get_regs(ag.pid)["rax"]
        if result >> 63:
            raise ApplyError(f"process {ag.ns_pid}: injected syscall {nr} failed: {os.strerror((1 << 64) - result)}")
        return result

    # -- failure and cleanup --------------------------------------------------------------------

    def kill_all(self):
        """Nothing half-restored stays: SIGKILL every process we created (init first), and
        reap them: as child subreaper, cow-apply gets the orphans of the killed tree too."""
        for pid in self.created:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        left = set(self.created)
        while left and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG | 0x40000000)  # __WALL
            except ChildProcessError:
                break
            if pid == 0:
                left = {p for p in left if os.path.exists(f"/proc/{p}")}
                time.sleep(0.005)
            else:
                left.discard(pid)

    def close_channels(self):
        if self.filler is not None:
            self.filler.close_all()
        pipes_mod.close_all(self.pipe_fds)
        shmem_mod.close_all(self.shmem_fds)
        shmem_mod.close_all(self.shmem_desc_fds)
        for channel in self.channels.values():
            channel.close()
        if self.window:
            addresses.release(*self.window)
        if self.blob_region:
            addresses.release(*self.blob_region)

    @property
    def root_outer_pid(self):
        return self.agents[self.plan.processes[0]["pid"]].pid

    def wait_root(self):
        """--wait: reap (we are the tree's subreaper) until the root exits; its status
        (through init with --pidns, which exits with the root's status)."""
        root = self.init.pid if self.init is not None else self.root_outer_pid
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                return 1  # the root is gone without us seeing it
            if pid != root or os.WIFSTOPPED(status):
                continue
            if os.WIFEXITED(status):
                return os.WEXITSTATUS(status)
            return 128 + os.WTERMSIG(status)

    def report(self):
        return {
            "root": self.plan.processes[0]["pid"],
            "pidns": self.pidns,
            "init_pid": self.init.pid if self.init else None,
            "pids": {str(p["pid"]): self.agents[p["pid"]].pid for p in self.plan.processes if p["pid"] in self.agents},
            # the other threads of each process, as this side sees their tids (image order)
            "threads": {str(pid): tids for pid, tids in self.threads.items() if tids},
            "phases": self.phases,
            "pages_written": self.pages_written,
            "bytes_written": self.pages_written * PAGE,
            # how the pages went in (fill.py): overwritten = by process_vm_writev into pages the
            # process had; dropped = pages it had, dropped first and then made anew
            "fill": self.filler.stats() if self.filler else None,
            "frames_planned": self.plan.header["stats"].get("frames_planned"),
            "frames_in_images": self.plan.header["stats"].get("frames_in_images"),
            # shared memory objects created, and the pages written into them
            "shmem_objects": len(self.plan.shared),
            "shmem_pages_written": sum(len(o["pages"]) for o in self.plan.shared.values()),
            "window": {"base": self.window[0], "size": self.window[1]} if self.window else None,
            "restorer": {"base": self.blob_region[0], "size": self.blob_region[1]} if self.blob_region else None,
        }


def become_subreaper():
    """Orphans of the tree come to cow-apply (while it runs): --wait reaps them, and a
    failed restore can reap every process it killed."""
    r = lib.cow_syscall6(157, 36, 1, 0, 0, 0, 0)  # prctl(PR_SET_CHILD_SUBREAPER, 1)
    if r < 0:
        raise OSError(-r, f"PR_SET_CHILD_SUBREAPER: {os.strerror(-r)}")


def program_mod_own_vdso():
    from stages.linux import vdso

    return vdso.own_layout()
