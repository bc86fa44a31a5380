/*
 * cowtree's restorer: a freestanding, position-independent blob (no libc, raw
 * system calls, no data sections, no relocations).
 *
 * cow-apply copies the blob into a hole that is free in both the current and
 * the target layout of a process, writes a program of operations after it,
 * and has the process's agent jump to cow_restorer_main(prog) on a stack that
 * lies inside the same region.  The blob interprets the program: every policy
 * decision (what to unmap, where to move, which fds to open) is made by
 * cow-apply in Python; the blob only executes, because once the first old
 * mapping is gone no library code is left to call.
 *
 * When the program is done (or an operation fails) the blob records the
 * outcome in the program header and sends itself SIGSTOP: cow-apply, the
 * tracer, sees the signal-delivery stop, reads the outcome, sets the registers
 * and lets the process go.  (Not int3: a forced SIGTRAP while signals are
 * blocked would reset the restored SIGTRAP disposition to SIG_DFL.)
 */

typedef unsigned long u64;
typedef long s64;

/* Operation codes; stages/apply/restorer.py mirrors them. */
enum {
	OP_END = 0,
	OP_UNMAP = 1,      /* addr, len */
	OP_MREMAP = 2,     /* old, len, new: MREMAP_MAYMOVE|MREMAP_FIXED */
	OP_MMAP = 3,       /* addr, len, prot, flags, path (0: anonymous), pgoff, open flags */
	OP_MPROTECT = 4,   /* addr, len, prot */
	OP_MADVISE = 5,    /* addr, len, advice */
	OP_SIGACTION = 6,  /* signo, handler, flags, restorer, mask */
	OP_OPEN_FD = 7,    /* fd, path, open flags, pos, mode */
	OP_MM_MAP = 8,     /* struct prctl_mm_map address, its size, exe path (0: keep) */
	OP_TID_ADDRESS = 9,/* address */
	OP_ROBUST_LIST = 10,/* head, len */
	OP_CLOSE_RANGE = 11,/* first, last */
	OP_CHDIR = 12,     /* path */
	OP_UMASK = 13,     /* mask */
	OP_SYSCALL = 14,   /* nr, a0..a5: anything else, result must be >= 0 */
	OP_REAP = 15,      /* root pid: be pid 1 of a pid namespace, never returns */
	OP_THREAD = 16,    /* tid, area, area size, nops: clone3 a thread with that tid; it runs the
			      next nops ops (which the caller skips) on a stack at the top of area,
			      records its outcome at the start of area, and stops itself */
	OP_WAIT_THREAD = 17,/* area: wait until that thread has run its ops; its error, if any */
};

/* The outcome of a thread's ops, at the start of its area (stages/apply/restorer.py). */
struct thread_status {
	u64 done;      /* ops completed */
	s64 error;     /* 0 or -errno of op `done` */
	u64 finished;  /* 1 when the thread reached its final stop */
	u64 tid;       /* the thread's tid, written by the thread */
};

/* The program header cow-apply writes; ops follow at ops. */
struct program {
	u64 magic;     /* "cowrest1" */
	u64 nops;
	u64 ops;       /* address of nops * 8 words */
	u64 done;      /* out: operations completed */
	s64 error;     /* out: 0 or -errno of operation `done` */
	u64 finished;  /* out: 1 when the blob reached its final trap */
};

#define SYS_read 0
#define SYS_open 2
#define SYS_close 3
#define SYS_lseek 8
#define SYS_mmap 9
#define SYS_mprotect 10
#define SYS_munmap 11
#define SYS_rt_sigaction 13
#define SYS_mremap 25
#define SYS_madvise 28
#define SYS_dup2 33
#define SYS_chdir 80
#define SYS_umask 95
#define SYS_getpid 39
#define SYS_kill 62
#define SYS_prctl 157
#define SYS_set_tid_address 218
#define SYS_set_robust_list 273
#define SYS_wait4 61
#define SYS_exit_group 231
#define SYS_close_range 436
#define SYS_clone3 435
#define SYS_gettid 186
#define SYS_tgkill 234
#define SYS_sched_yield 24
#define WALL 0x40000000
#define EINTR 4

#define MREMAP_MAYMOVE 1
#define MREMAP_FIXED 2
#define PR_SET_MM 35
#define PR_SET_MM_MAP 14
#define O_CLOEXEC 02000000

static inline s64 sys6(s64 nr, u64 a, u64 b, u64 c, u64 d, u64 e, u64 f)
{
	register u64 r10 __asm__("r10") = d;
	register u64 r8 __asm__("r8") = e;
	register u64 r9 __asm__("r9") = f;
	s64 ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

/* An fd from open(), moved to `want` when it is not already there. */
static s64 open_at_number(u64 path, u64 flags, u64 mode, s64 want)
{
	s64 fd = sys6(SYS_open, path, flags, mode, 0, 0, 0);
	if (fd < 0 || want < 0 || fd == want)
		return fd;
	s64 r = sys6(SYS_dup2, fd, want, 0, 0, 0, 0);
	sys6(SYS_close, fd, 0, 0, 0, 0, 0);
	return r;
}

/* pid 1 of a pid namespace: reap every orphan; leave with the root's status
 * (exit code, or 128 + signal), which ends the namespace. */
static void __attribute__((noreturn)) reap_forever(s64 root)
{
	for (;;) {
		int status = 0;
		s64 pid = sys6(SYS_wait4, (u64)-1, (u64)&status, WALL, 0, 0, 0);
		if (pid == -EINTR)
			continue;
		if (pid < 0)
			sys6(SYS_exit_group, 0, 0, 0, 0, 0, 0);
		if (pid == root) {
			int code = (status & 0x7f) ? 128 + (status & 0x7f) : (status >> 8) & 0xff;
			sys6(SYS_exit_group, (u64)code, 0, 0, 0, 0, 0);
		}
	}
}

static s64 run_op(const u64 *op)
{
	s64 r, fd;
	switch (op[0]) {
	case OP_UNMAP:
		return sys6(SYS_munmap, op[1], op[2], 0, 0, 0, 0);
	case OP_MREMAP:
		r = sys6(SYS_mremap, op[1], op[2], op[2], MREMAP_MAYMOVE | MREMAP_FIXED, op[3], 0);
		return r == (s64)op[3] ? 0 : (r < 0 ? r : -14);
	case OP_MMAP:
		fd = -1;
		if (op[5]) {
			fd = sys6(SYS_open, op[5], op[7] | O_CLOEXEC, 0, 0, 0, 0);
			if (fd < 0)
				return fd;
		}
		r = sys6(SYS_mmap, op[1], op[2], op[3], op[4], (u64)fd, op[6]);
		if (fd >= 0)
			sys6(SYS_close, fd, 0, 0, 0, 0, 0);
		return r == (s64)op[1] ? 0 : (r < 0 ? r : -14);
	case OP_MPROTECT:
		return sys6(SYS_mprotect, op[1], op[2], op[3], 0, 0, 0);
	case OP_MADVISE:
		return sys6(SYS_madvise, op[1], op[2], op[3], 0, 0, 0);
	case OP_SIGACTION:
		/* kernel struct sigaction: handler, flags, restorer, mask (8 bytes) */
		return sys6(SYS_rt_sigaction, op[1], (u64)&op[2], 0, 8, 0, 0);
	case OP_OPEN_FD:
		fd = open_at_number(op[2], op[3], op[5], (s64)op[1]);
		if (fd < 0)
			return fd;
		if (op[4]) {
			r = sys6(SYS_lseek, (u64)fd, op[4], 0 /* SEEK_SET */, 0, 0, 0);
			if (r < 0)
				return r;
		}
		return 0;
	case OP_MM_MAP: {
		/* exe_fd is the last u32 of struct prctl_mm_map */
		unsigned int *exe_fd = (unsigned int *)(op[1] + op[2] - 4);
		fd = -1;
		if (op[3]) {
			fd = sys6(SYS_open, op[3], O_CLOEXEC, 0, 0, 0, 0);
			if (fd < 0)
				return fd;
		}
		*exe_fd = (unsigned int)fd;
		r = sys6(SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, op[1], op[2], 0, 0);
		if (fd >= 0)
			sys6(SYS_close, fd, 0, 0, 0, 0, 0);
		return r;
	}
	case OP_TID_ADDRESS:
		sys6(SYS_set_tid_address, op[1], 0, 0, 0, 0, 0);
		return 0;
	case OP_ROBUST_LIST:
		return sys6(SYS_set_robust_list, op[1], op[2], 0, 0, 0, 0);
	case OP_CLOSE_RANGE:
		return sys6(SYS_close_range, op[1], op[2], 0, 0, 0, 0);
	case OP_CHDIR:
		return sys6(SYS_chdir, op[1], 0, 0, 0, 0, 0);
	case OP_UMASK:
		sys6(SYS_umask, op[1], 0, 0, 0, 0, 0);
		return 0;
	case OP_SYSCALL:
		return sys6(op[1], op[2], op[3], op[4], op[5], op[6], op[7]);
	case OP_REAP:
		reap_forever((s64)op[1]);
	}
	return -22; /* EINVAL: unknown operation */
}

/* Stop this thread (not the process: another thread could take a process-wide SIGSTOP)
 * for the tracer, forever. */
static void __attribute__((noreturn)) stop_forever(void)
{
	for (;;)
		sys6(SYS_tgkill, (u64)sys6(SYS_getpid, 0, 0, 0, 0, 0, 0), (u64)sys6(SYS_gettid, 0, 0, 0, 0, 0, 0),
		     19 /* SIGSTOP */, 0, 0, 0);
}

/* A restored thread starts here, on its own stack in its area: run its ops, record the
 * outcome, stop.  cow-apply then gives it its dumped registers. */
static void __attribute__((noreturn, used, noinline)) thread_main(const u64 *op, u64 nops, struct thread_status *st)
{
	u64 i;
	st->tid = (u64)sys6(SYS_gettid, 0, 0, 0, 0, 0, 0);
	for (i = 0; i < nops; i++, op += 8) {
		s64 r = run_op(op);
		if (r < 0) {
			st->error = r;
			break;
		}
		st->done = i + 1;
	}
	__atomic_store_n(&st->finished, 1, __ATOMIC_RELEASE);
	stop_forever();
}

#define CLONE_VM 0x100
#define CLONE_FS 0x200
#define CLONE_FILES 0x400
#define CLONE_SIGHAND 0x800
#define CLONE_THREAD 0x10000
#define CLONE_SYSVSEM 0x40000

/* clone3 a thread of this process with tid op[1]: it shares everything a pthread shares
 * (its TLS base and clear_child_tid come later: registers, and its own ops).  The child
 * leaves the syscall on the new stack with every other register as the parent's, so the
 * thread's arguments travel in callee-saved registers and it calls thread_main through
 * a register (no relocation).  Returns the new tid, or -errno. */
static s64 start_thread(const u64 *op)
{
	volatile u64 args[11];
	s64 tid = (s64)op[1];
	struct thread_status *st = (struct thread_status *)op[2];
	u64 i;
	for (i = 0; i < 11; i++)
		args[i] = 0;
	args[0] = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;
	args[5] = op[2];                   /* stack: the area; the status words sit at its bottom, */
	args[6] = op[3];                   /* far below where the stack grows down to */
	args[8] = (u64)&tid;               /* set_tid */
	args[9] = 1;                       /* set_tid_size: the tid in our own pid namespace */
	st->done = 0;
	st->error = 0;
	st->finished = 0;
	register u64 r12 __asm__("r12") = (u64)(op + 8);
	register u64 r13 __asm__("r13") = op[4];
	register u64 r14 __asm__("r14") = (u64)st;
	register u64 r15 __asm__("r15") = (u64)&thread_main;
	s64 ret;
	__asm__ volatile("syscall\n\t"
			 "test %%rax, %%rax\n\t"
			 "jnz 1f\n\t"
			 "xor %%ebp, %%ebp\n\t"
			 "and $-16, %%rsp\n\t"
			 "mov %%r12, %%rdi\n\t"
			 "mov %%r13, %%rsi\n\t"
			 "mov %%r14, %%rdx\n\t"
			 "call *%%r15\n\t"
			 "ud2\n"
			 "1:"
			 : "=a"(ret)
			 : "a"((u64)SYS_clone3), "D"((u64)args), "S"((u64)sizeof(args)), "r"(r12), "r"(r13), "r"(r14),
			   "r"(r15)
			 : "rcx", "r11", "memory");
	if (ret >= 0 && ret != tid)
		return -17; /* EEXIST: not the tid asked for */
	return ret;
}

static s64 wait_thread(const struct thread_status *st)
{
	while (!__atomic_load_n(&st->finished, __ATOMIC_ACQUIRE))
		sys6(SYS_sched_yield, 0, 0, 0, 0, 0, 0);
	return st->error;
}

__attribute__((noreturn, used)) void cow_restorer_main(struct program *prog)
{
	const u64 *op = (const u64 *)prog->ops;
	u64 i;

	prog->error = 0;
	for (i = 0; i < prog->nops; i++, op += 8) {
		s64 r;
		u64 skip = 0;
		if (op[0] == OP_THREAD) {
			r = start_thread(op);
			skip = op[4]; /* the thread's own ops */
		} else if (op[0] == OP_WAIT_THREAD) {
			r = wait_thread((const struct thread_status *)op[1]);
		} else {
			r = run_op(op);
		}
		if (r < 0) {
			prog->error = r;
			break;
		}
		i += skip;
		op += 8 * skip;
		prog->done = i + 1;
	}
	prog->finished = 1;
	stop_forever();
}
