/*
 * fanout NPROC MIB OUTDIR: a root that fills MIB MiB, then forks NPROC - 1 children that
 * share it copy-on-write, each rewriting one page of its own; for load tests.
 * Protocol of cowload.c: every process writes OUTDIR/<pid>.sum; the root, once all NPROC
 * exist, writes OUTDIR/ready (the pids); SIGUSR1 writes OUTDIR/<pid>.check "ok <sum>" /
 * "bad <sum>"; SIGTERM exits.  Errors: OUTDIR/error.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "protocol.h"

#define PAGE 4096UL

static uint64_t *region;
static size_t len;

static uint64_t checksum(void)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < len / 8; i++)
		h = (h ^ region[i]) * 1099511628211ULL;
	return h;
}

static void fill_page(size_t page, uint64_t tag)
{
	uint64_t *p = region + page * (PAGE / 8);
	for (size_t i = 0; i < PAGE / 8; i++)
		p[i] = tag * 0x9E3779B97F4A7C15ULL + page * 4099 + i;
}


static void serve(uint64_t sum)
{
	char name[64], text[128];
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
		uint64_t now = checksum();
		snprintf(name, sizeof name, "%d.check", (int)getpid());
		snprintf(text, sizeof text, "%s %016llx\n", now == sum ? "ok" : "bad", (unsigned long long)now);
		write_file(name, text);
	}
}

static uint64_t publish(void)
{
	char name[64], text[64];
	uint64_t sum = checksum();
	snprintf(name, sizeof name, "%d.sum", (int)getpid());
	snprintf(text, sizeof text, "%016llx\n", (unsigned long long)sum);
	write_file(name, text);
	return sum;
}

int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	int nproc = atoi(argv[1]);
	len = (size_t)atol(argv[2]) << 20;
	outdir = argv[3];
	struct sigaction sa = {0};
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED)
		die("mmap");
	size_t npages = len / PAGE;
	for (size_t p = 0; p < npages; p++)
		fill_page(p, 1);
	for (int c = 1; c < nproc; c++) {
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			fill_page((size_t)c % npages, 100 + c);
			serve(publish());
		}
	}
	uint64_t sum = publish();
	/* ready once every .sum exists */
	char pids[1 << 16];
	for (;;) {
		DIR *d = opendir(outdir);
		struct dirent *e;
		int n = 0;
		size_t used = 0;
		if (!d)
			die("opendir");
		while ((e = readdir(d))) {
			size_t l = strlen(e->d_name);
			if (l > 4 && e->d_name[0] != '.' && strcmp(e->d_name + l - 4, ".sum") == 0) {
				n++;
				used += snprintf(pids + used, sizeof pids - used, "%.*s\n", (int)(l - 4), e->d_name);
			}
		}
		closedir(d);
		if (n == nproc)
			break;
		usleep(2000);
	}
	write_file("ready", pids);
	serve(sum);
	return 0;
}
