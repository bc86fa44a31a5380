/*
 * fanout NPROC MIB OUTDIR: a root that fills MIB MiB, then forks NPROC - 1 children that
 * share it copy-on-write, each rewriting one page of its own; for load tests.
 * Protocol of cowload.c: every process writes OUTDIR/<pid>.sum; the root, once all NPROC
 * exist, writes OUTDIR/ready (the pids); SIGUSR1 writes OUTDIR/<pid>.check "ok <sum>" /
 * "bad <sum>"; SIGTERM exits.  Errors: OUTDIR/error.
 */
#define _GNU_SOURCE
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


int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	int nproc = atoi(argv[1]);
	len = (size_t)atol(argv[2]) << 20;
	outdir = argv[3];
	catch_usr1_term();
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
			uint64_t sum = checksum();
			publish_sum(sum);
			serve_checksum(checksum, sum);
		}
	}
	uint64_t sum = checksum();
	publish_sum(sum);
	write_ready_after_sums(nproc);
	serve_checksum(checksum, sum);
	return 0;
}
