/*
 * The apply agent: the code a restored process runs from the moment clone3
 * creates it until it jumps into the restorer.  It never returns into Python:
 * it reads fixed-size commands from a pipe, executes them with raw system
 * calls and writes one result word back.  Every restored process is a fork of
 * cow-apply, so addresses in cow-apply (this library, cow_agent_buf) are the
 * same in every agent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define AGENT_SYSCALL 1 /* nr, a0..a5 */
#define AGENT_FORK 2    /* pid (innermost namespace), cmd fd, reply fd */
#define AGENT_ENTER 3   /* entry, argument, stack top */
#define AGENT_REAP 4    /* root pid: be the pid namespace's init */

struct agent_cmd {
	long op, nr, a[6];
};

/* Scratch memory cow-apply fills with process_vm_writev (paths, structs). */
char cow_agent_buf[1 << 16] __attribute__((aligned(4096)));

void *cow_agent_buf_addr(void) { return cow_agent_buf; }
long cow_agent_buf_size(void) { return sizeof(cow_agent_buf); }

/* Until the restorer program sets the dumped value, an agent dies with its parent:
 * a cow-apply killed by SIGKILL (and every agent below it, in a chain) leaves no
 * half-restored process behind, even one forked a moment before cow-apply traced it.
 * parent = 0: no check that the parent is still the one we were forked by. */
static void die_with_parent(long parent)
{
	syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (parent && syscall(SYS_getppid) != parent)
		syscall(SYS_exit_group, 122); /* the parent died before the prctl took */
}

static long raw_clone3(unsigned long flags, const int *set_tid, int n)
{
	struct clone_args args;
	memset(&args, 0, sizeof(args));
	args.flags = flags;
	args.exit_signal = SIGCHLD;
	args.set_tid = n ? (uintptr_t)set_tid : 0;
	args.set_tid_size = n;
	long r = syscall(SYS_clone3, &args, sizeof(args));
	return r < 0 ? -errno : r;
}

static int read_full(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		long r = syscall(SYS_read, fd, p, len);
		if (r == -1 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		len -= r;
	}
	return 0;
}

static void reply(int fd, long value) { syscall(SYS_write, fd, &value, sizeof(value)); }

/* glibc registered an rseq area in this thread's TLS; the restorer unmaps the
 * TLS, so the registration must go first (same address, length, signature). */
static void unregister_rseq(void)
{
	if (__rseq_size == 0)
		return;
	void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
	if (syscall(SYS_rseq, area, 32, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) == 0)
		return;
	syscall(SYS_rseq, area, __rseq_size, RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
}

/* pid 1 of a fresh pid namespace: reap everything; leave with the root's status. */
static __attribute__((noreturn)) void reap_forever(long root)
{
	syscall(SYS_close_range, 0, ~0U, 0);
	for (;;) {
		int status;
		long pid = syscall(SYS_wait4, -1, &status, __WALL, 0);
		if (pid == -1 && errno == EINTR)
			continue;
		if (pid == -1)
			syscall(SYS_exit_group, 0);
		if (pid == root)
			syscall(SYS_exit_group, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
	}
}

static __attribute__((noreturn)) void agent_loop(int cmd_fd, int reply_fd)
{
	struct agent_cmd c;
	for (;;) {
		if (read_full(cmd_fd, &c, sizeof(c)) < 0)
			syscall(SYS_exit_group, 121); /* cow-apply went away */
		switch (c.op) {
		case AGENT_SYSCALL: {
			long r = syscall(c.nr, c.a[0], c.a[1], c.a[2], c.a[3], c.a[4], c.a[5]);
			reply(reply_fd, r == -1 ? -errno : r);
			break;
		}
		case AGENT_FORK: {
			int tid = (int)c.a[0];
			long parent = syscall(SYS_getpid);
			long r = raw_clone3(0, &tid, 1);
			if (r == 0) { /* the child: from now on it listens on its own pipes */
				die_with_parent(parent);
				cmd_fd = (int)c.a[1];
				reply_fd = (int)c.a[2];
				break;
			}
			reply(reply_fd, r);
			break;
		}
		case AGENT_ENTER:
			reply(reply_fd, 0);
			unregister_rseq();
			__asm__ volatile("mov %0, %%rsp\n\t"
					 "xor %%ebp, %%ebp\n\t"
					 "jmp *%1"
					 :
					 : "r"(c.a[2]), "r"(c.a[0]), "D"(c.a[1])
					 : "memory");
			__builtin_unreachable();
		case AGENT_REAP:
			syscall(SYS_prctl, PR_SET_PDEATHSIG, 0, 0, 0, 0); /* outlives cow-apply */
			reply(reply_fd, 0);
			reap_forever(c.a[0]);
		default:
			reply(reply_fd, -EINVAL);
		}
	}
}

long cow_agent_spawn(unsigned long flags, const int *set_tid, int n, int cmd_fd, int reply_fd)
{
	long parent = syscall(SYS_getpid);
	long r = raw_clone3(flags, set_tid, n);
	if (r == 0) {
		/* in a new pid namespace the parent (cow-apply) is outside it: getppid() is 0 */
		die_with_parent((flags & CLONE_NEWPID) ? 0 : parent);
		agent_loop(cmd_fd, reply_fd);
	}
	return r;
}
