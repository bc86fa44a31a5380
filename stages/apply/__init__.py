"""cow-apply: a plan stream in, a running process tree out.

Modules, in the order they act:
  spool      read the whole plan (every record checked, trailer required); page
             bytes into an unlinked temp file from a pipe, used in place in a plan
             file (mapped); frames indexed by id (``same`` resolved)
  check      everything verified before a process exists: arch, page size, vDSO
             (layout, sha256, symbols), the plan validator (stages.plan.validate),
             supported VMAs/fds/threads, files present with the dumped dev/inode,
             pids free (waits 3 s for an upstream ``cow-collect --kill``)
  program    per process, the restorer's program (what to unmap, move, map, open, set)
  addresses  staging window and restorer region: free in cow-apply, disjoint from targets
  agent      the native agents (native/helpers/agent.c) every restored process runs
             until it jumps into the restorer: commands over a pipe
  restorer   loading the freestanding blob (pyelftools, no relocations; what it found is
             kept beside the object) and program images
  fill       the page writes into staging (native/helpers/pagefill.c)
  restore    the orchestration: create, fill, handover, resume; kill all on failure
  cli        the ``cow-apply`` command

Choices worth knowing:
  * One orchestrator writes every page from outside, from the mmap'd spool, while
    each process waits in its agent (fill.py).  A page the process does not have
    yet is made by UFFDIO_COPY on a userfaultfd of the process (no zero-fill, no
    fault, runs of pages in one call; the fd is closed before the restorer runs);
    a page it has (shared copy-on-write with its parent or children) is
    overwritten by process_vm_writev, which gives the written process a private
    copy only, or, in long runs, dropped first (MADV_DONTNEED) and made anew.
  * --pidns: pid 1 is a fork of cow-apply that forks the root with set_tid and
    then runs the restorer blob with a program that drops every mapping, fd and
    handler and reaps ("cow-init", ~72 kB RSS); it exits with the root's status.
  * The inherited rseq registration is removed by the agent (glibc's
    __rseq_offset / __rseq_size give the area of the thread, which is cow-apply's
    main thread in every fork); the dumped one (PTRACE_GET_RSEQ_CONFIGURATION at
    collect) is registered by the restorer at the end, as are the dumped
    set_tid_address and set_robust_list values.
  * Syscall restart: for -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND and also
    -ERESTART_RESTARTBLOCK the original syscall is re-executed (rax = orig_rax,
    rip -= 2; orig_rax = -1 so the kernel adds nothing): a new process has no
    restart block, so a relative nanosleep starts over with its full length.
  * Pipes (pipes.py): cow-apply creates each pipe once before the root, refills
    its unread bytes and opens one description per dumped description at fd
    numbers above every dumped fd; every process inherits them and its restorer
    dup3s its own to the dumped numbers and closes the rest; cow-apply closes its
    copies once every process has taken its own.
  * exe_file is left alone when the dumped executable is cow-apply's own
    interpreter (the kernel refuses to replace exe_file while the old one is mapped).
  * Process state (program.py, last in the restorer program): rlimits, scheduler
    policy, nice, CPU affinity, personality, subreaper, then capabilities and
    groups/gids/uids (caps.py: inheritable and bounding sets and keep-caps before
    the uid change, the dumped sets, ambient and securebits after it; root may
    restore any ids; check.py refuses other credentials to a caller that is not
    root, and any capability beyond cow-apply's own), then pdeathsig (not
    the root's), dumpable, no_new_privs, sigaltstack, pending signals (queued to
    itself with the dumped siginfo, all blocked until cow-apply sets the mask), the
    POSIX timers (with their ids: PR_TIMER_CREATE_RESTORE_IDS) and the interval
    timers, which therefore lose the time between their setting and the release,
    as they lose the time the tree was frozen and on disk.
  * oom_score_adj is written by cow-apply to /proc/PID/oom_score_adj once the
    process's restorer has finished.
  * FIFOs (pipes.py): cow-apply opens the FIFO by its path, read-write, refills
    it, and opens one description per dumped one, passed on like a pipe's; so is
    a regular file's description that several fds shared (offset, flock, OFD locks).
  * Terminals: an fd on cow-collect's terminal is opened on cow-apply's (stdin,
    stdout or stderr), with O_NOCTTY; file locks are taken again after each open.
Not restored yet: threads (refused), sockets/other terminals/leases/other fds
(refused), the root's pdeathsig, MAP_GROWSDOWN of a stack that was moved from
staging.
"""
