/*
 * rseqwl OUTDIR: a thread that lives inside an rseq critical section, for
 * tests/test_threads.py.
 *
 * The worker thread points its rseq area (glibc's registration) at a critical section
 * that is an endless loop: it only ever leaves it through the abort handler, when the
 * kernel preempts it or delivers it a signal.  The handler counts the abort and enters
 * the section again.  A dump therefore almost always finds it inside the section; a
 * restored thread that does not start at the abort handler, with rseq registered again,
 * spins forever and counts nothing more.
 * OUTDIR/ready: the pid.  SIGUSR1: OUTDIR/<pid>.check = "aborts N".  SIGTERM: exit.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <sys/rseq.h>
#include <unistd.h>

#include "protocol.h"

static volatile unsigned long aborts;

static void *worker(void *arg)
{
	(void)arg;
	if (__rseq_size == 0)
		die("glibc registered no rseq area");
	struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
	for (;;) {
		__asm__ volatile(
			".pushsection __rseq_cs, \"aw\"\n\t"
			".balign 32\n\t"
			"3: .long 0, 0\n\t"               /* version, flags */
			".quad 1f, 2f - 1f, 4f\n\t"        /* start_ip, post_commit_offset, abort_ip */
			".popsection\n\t"
			"lea 3b(%%rip), %%rax\n\t"
			"mov %%rax, %[cs]\n\t"
			"1: jmp 1b\n\t"                    /* the critical section */
			"2:\n\t"
			".byte 0x0f, 0xb9, 0x3d\n\t"       /* ud1 with the signature as displacement */
			".long 0x53053053\n\t"             /* RSEQ_SIG, right before the abort handler */
			"4:\n\t"
			: [cs] "=m"(rs->rseq_cs)
			:
			: "rax", "memory");
		aborts++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: rseqwl OUTDIR\n");
		return 2;
	}
	outdir = argv[1];
	catch_usr1_term();
	sigset_t mask, old;
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &mask, &old);
	pthread_t t;
	if (pthread_create(&t, NULL, worker, NULL))
		die("pthread_create");
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	char text[64];
	snprintf(text, sizeof text, "%d\n", (int)getpid());
	write_file("ready", text);
	while (!got_term) {
		if (got_usr1) {
			got_usr1 = 0;
			snprintf(text, sizeof text, "aborts %lu\n", aborts);
			write_own_file("check", text);
		}
		usleep(5000);
	}
	return 0;
}
