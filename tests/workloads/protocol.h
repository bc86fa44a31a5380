/* The workload protocol shared by the C workloads (see tests/support/workloads.py):
 * files in OUTDIR written atomically, failures reported in OUTDIR/error, and the
 * SIGUSR1 (check) / SIGTERM (exit) flags the main loops wait on. */
#ifndef COWTREE_WORKLOAD_PROTOCOL_H
#define COWTREE_WORKLOAD_PROTOCOL_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
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

PROTOCOL_FN void on_usr1(int sig) { (void)sig; got_usr1 = 1; }
PROTOCOL_FN void on_term(int sig) { (void)sig; got_term = 1; }

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
