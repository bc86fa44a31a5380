/*
 * manyvmas N OUTDIR: one process with N separate anonymous VMAs (a page each), for load tests.
 * One mapping of N pages; a distinct byte is written into every page, then every other page is
 * made read-only: neighbours differ in prot, so the kernel cannot merge them.
 * Protocol of cowload.c: OUTDIR/<pid>.sum, then OUTDIR/ready (the pid); SIGUSR1 writes
 * OUTDIR/<pid>.check "ok <sum>" / "bad <sum>"; SIGTERM exits.  Errors: OUTDIR/error.
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

static unsigned char *region;
static long npages;

static uint64_t checksum(void)
{
	uint64_t h = 1469598103934665603ULL;
	for (long i = 0; i < npages; i++)
		h = (h ^ region[i * PAGE] ^ (uint64_t)region[i * PAGE + PAGE - 1] << 8) * 1099511628211ULL;
	return h;
}


int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	npages = atol(argv[1]);
	outdir = argv[2];
	region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED)
		die("mmap");
	for (long i = 0; i < npages; i++) {
		region[i * PAGE] = (unsigned char)(i * 7 + 1);
		region[i * PAGE + PAGE - 1] = (unsigned char)(i >> 8);
	}
	for (long i = 1; i < npages; i += 2)
		if (mprotect(region + i * PAGE, PAGE, PROT_READ) < 0)
			die("mprotect");
	uint64_t sum = checksum();
	catch_usr1_term();
	publish_sum(sum);
	char text[32];
	snprintf(text, sizeof text, "%d\n", (int)getpid());
	write_file("ready", text);
	serve_checksum(checksum, sum);
}
