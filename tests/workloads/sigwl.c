/*
 * sigwl OUTDIR: one process with interval timers, an alternate signal stack and
 * pending signals, for tests/test_state_signals.py.
 *
 *   ITIMER_REAL     value 1000 s, interval 500 s   (SIGALRM ignored, it never fires in a test)
 *   ITIMER_VIRTUAL  value 300 s, interval 7 s      (counts only CPU time: stays near 300 s)
 *   sigaltstack     a static 64 KiB buffer, SS_AUTODISARM
 *   blocked and pending: SIGUSR2 sent with sigqueue (value 4242), SIGRTMIN+1 queued
 *                        twice (values 1 and 2), SIGWINCH raised by the thread (its own queue)
 * OUTDIR/ready holds the pid.  SIGUSR1: OUTDIR/<pid>.check, one "key value" per line:
 * timers (intervals exact, values in whole seconds), the altstack, the pending set.
 * SIGHUP: OUTDIR/<pid>.drain: the pending signals taken with sigtimedwait, in order,
 * "signo code value" per line (this consumes them).  SIGTERM: exit.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "protocol.h"

#ifndef SS_AUTODISARM
#define SS_AUTODISARM (1U << 31)
#endif

static volatile sig_atomic_t got_hup;
static char altstack[65536] __attribute__((aligned(16)));

static void on_hup(int s) { (void)s; got_hup = 1; }

/* OUTDIR/<pid>.<suffix> = text */
static void put_own(const char *suffix, const char *text)
{
	char name[64];
	snprintf(name, sizeof name, "%d.%s", (int)getpid(), suffix);
	write_file(name, text);
}

static void report(void)
{
	char text[2048], *p = text, *end = text + sizeof text;
	for (int which = 0; which < 3; which++) {
		struct itimerval v;
		getitimer(which, &v);
		p += snprintf(p, end - p, "timer%d %ld.%06ld %ld\n", which, (long)v.it_interval.tv_sec,
			      (long)v.it_interval.tv_usec, (long)v.it_value.tv_sec);
	}
	stack_t ss;
	sigaltstack(NULL, &ss);
	p += snprintf(p, end - p, "altstack %d %zu %d\n", ss.ss_sp == (void *)altstack, ss.ss_size, ss.ss_flags);
	sigset_t pend;
	sigpending(&pend);
	p += snprintf(p, end - p, "pending");
	for (int s = 1; s < 65; s++)
		if (sigismember(&pend, s))
			p += snprintf(p, end - p, " %d", s);
	p += snprintf(p, end - p, "\n");
	put_own("check", text);
}

static void drain(void)
{
	char text[2048], *p = text, *end = text + sizeof text;
	sigset_t want;
	sigemptyset(&want);
	sigaddset(&want, SIGUSR2);
	sigaddset(&want, SIGRTMIN + 1);
	sigaddset(&want, SIGWINCH);
	struct timespec zero = {0, 0};
	siginfo_t si;
	while (sigtimedwait(&want, &si, &zero) > 0)
		p += snprintf(p, end - p, "%d %d %d\n", si.si_signo, si.si_code, si.si_value.sival_int);
	put_own("drain", text);
}

int main(int argc, char **argv)
{
	start(argc, argv);
	sigset_t wait_mask;
	signal(SIGHUP, on_hup);
	signal(SIGALRM, SIG_IGN);
	signal(SIGVTALRM, SIG_IGN);
	struct itimerval real = {{500, 0}, {1000, 0}}, virt = {{7, 0}, {300, 0}};
	if (setitimer(ITIMER_REAL, &real, NULL) || setitimer(ITIMER_VIRTUAL, &virt, NULL))
		return 2;
	stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = SS_AUTODISARM};
	if (sigaltstack(&ss, NULL))
		return 3;
	union sigval v;
	v.sival_int = 4242;
	if (sigqueue(getpid(), SIGUSR2, v))
		return 4;
	for (int i = 1; i <= 2; i++) {
		v.sival_int = i;
		if (sigqueue(getpid(), SIGRTMIN + 1, v))
			return 5;
	}
	if (raise(SIGWINCH)) /* tgkill: the thread's own queue */
		return 6;
	char ready[32];
	snprintf(ready, sizeof ready, "%d\n", (int)getpid());
	char path[4096], tmp[4200];
	snprintf(path, sizeof path, "%s/ready", outdir);
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	fputs(ready, f);
	fclose(f);
	rename(tmp, path);
	sigfillset(&wait_mask);
	sigdelset(&wait_mask, SIGUSR1);
	sigdelset(&wait_mask, SIGHUP);
	sigdelset(&wait_mask, SIGTERM);
	for (;;) {
		sigsuspend(&wait_mask);
		if (got_usr1) {
			got_usr1 = 0;
			report();
		}
		if (got_hup) {
			got_hup = 0;
			drain();
		}
	}
}
