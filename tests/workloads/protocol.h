/* The workload protocol shared by the C workloads (see tests/support/workloads.py):
 * files in OUTDIR written atomically, failures reported in OUTDIR/error, the
 * SIGUSR1 (check) / SIGTERM (exit) flags the main loops wait on, and the files of
 * the checksum workloads: OUTDIR/<pid>.sum, OUTDIR/ready (the pids), OUTDIR/<pid>.check. */
#ifndef COWTREE_WORKLOAD_PROTOCOL_H
#define COWTREE_WORKLOAD_PROTOCOL_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* not every workload uses every piece */
#define PROTOCOL_FN static __attribute__((unused))

static const char *outdir;
static volatile sig_atomic_t got_usr1, got_term;

/* Report "pid: what: strerror" in OUTDIR/error and exit. */
PROTOCOL_FN void die(const char *what)
{
	char path[4096], msg[512];
	int n = snprintf(msg, sizeof msg, "%d: %s: %s\n", (int)getpid(), what, strerror(errno));
	snprintf(path, sizeof path, "%s/error", outdir);
	int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (fd >= 0) {
		if (write(fd, msg, n) < 0) { /* nothing left to report to */ }
		close(fd);
	}
	_exit(1);
}

/* OUTDIR/name = text, renamed into place so a reader never sees half a file. */
PROTOCOL_FN void write_file(const char *name, const char *text)
{
	char path[4096], tmp[4096];
	snprintf(path, sizeof path, "%s/%s", outdir, name);
	snprintf(tmp, sizeof tmp, "%s/.%s.tmp", outdir, name);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open");
	size_t n = strlen(text);
	if (write(fd, text, n) != (ssize_t)n)
		die("write");
	close(fd);
	if (rename(tmp, path) < 0)
		die("rename");
}

/* OUTDIR/<pid>.<suffix> = text: the per-process files (.sum, .check) */
PROTOCOL_FN void write_own_file(const char *suffix, const char *text)
{
	char name[64];
	snprintf(name, sizeof name, "%d.%s", (int)getpid(), suffix);
	write_file(name, text);
}

/* OUTDIR/<pid>.sum = the checksum of the memory this process keeps */
PROTOCOL_FN void publish_sum(uint64_t sum)
{
	char text[32];
	snprintf(text, sizeof text, "%016llx\n", (unsigned long long)sum);
	write_own_file("sum", text);
}

/* How many OUTDIR/<pid>.sum exist; pids gets their pids, one per line (OUTDIR/ready's text). */
PROTOCOL_FN int list_sums(char *pids, size_t size)
{
	DIR *d = opendir(outdir);
	struct dirent *e;
	int n = 0;
	size_t used = 0;
	if (!d)
		die("opendir");
	pids[0] = 0;
	while ((e = readdir(d))) {
		size_t len = strlen(e->d_name);
		if (len > 4 && e->d_name[0] != '.' && strcmp(e->d_name + len - 4, ".sum") == 0) {
			n++;
			if (used < size)
				used += snprintf(pids + used, size - used, "%.*s\n", (int)(len - 4), e->d_name);
		}
	}
	closedir(d);
	return n;
}

/* Wait (polling, up to a minute) until expected .sum files exist, then write OUTDIR/ready. */
PROTOCOL_FN void write_ready_after_sums(int expected)
{
	char pids[1 << 16];
	for (int tries = 0; list_sums(pids, sizeof pids) < expected; tries++) {
		if (tries > 60000) {
			errno = ETIMEDOUT;
			die("waiting for the .sum files");
		}
		usleep(1000);
	}
	write_file("ready", pids);
}

PROTOCOL_FN void on_usr1(int sig) { (void)sig; got_usr1 = 1; }
PROTOCOL_FN void on_term(int sig) { (void)sig; got_term = 1; }

/* SIGUSR1 and SIGTERM set got_usr1 and got_term (for workloads that do not call start()). */
PROTOCOL_FN void catch_usr1_term(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
}

/* The checksum workloads' last state: on SIGUSR1 write OUTDIR/<pid>.check "ok <sum>" or
 * "bad <sum>" (sum_now() against expected); SIGTERM exits.  Never returns. */
PROTOCOL_FN void serve_checksum(uint64_t (*sum_now)(void), uint64_t expected)
{
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGTERM);
	sigprocmask(SIG_BLOCK, &block, &old);
	for (;;) {
		while (!got_usr1 && !got_term)
			sigsuspend(&old);
		if (got_term)
			_exit(0);
		got_usr1 = 0;
		uint64_t now = sum_now();
		char text[64];
		snprintf(text, sizeof text, "%s %016llx\n", now == expected ? "ok" : "bad", (unsigned long long)now);
		write_own_file("check", text);
	}
}

/* The state workloads' last state (after start(): signals are taken only here): on SIGUSR1
 * call report(); after every signal call also (when not NULL).  Never returns. */
PROTOCOL_FN void serve_reports(void (*report)(void), void (*also)(void))
{
	sigset_t none;
	sigemptyset(&none);
	for (;;) {
		sigsuspend(&none);
		if (got_usr1) {
			got_usr1 = 0;
			report();
		}
		if (also)
			also();
	}
}

/* The start of main: OUTDIR is the one argument (else exit 64), every signal blocked (the
 * main loops take them in sigsuspend) and SIGUSR1 caught. */
PROTOCOL_FN void start(int argc, char **argv)
{
	if (argc != 2)
		_exit(64);
	outdir = argv[1];
	sigset_t all;
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, NULL);
	signal(SIGUSR1, on_usr1);
}

#endif
