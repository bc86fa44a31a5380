/*
 * holes OUTDIR: two VMAs of one process with a page never touched, in the layout that once
 * made cow-plan give both untouched pages the same staging slot (the restorer moves a slot's
 * page away with mremap, so the second VMA found nothing there and the restore failed):
 *   root:  A = [own page, untouched], B = [page P, untouched]
 *   child: A's address = [P (B moved there with mremap), untouched]
 * Every process writes OUTDIR/<pid>.sum (its pages' checksum; an untouched page must read
 * as zeros); the root, once both exist, OUTDIR/ready (the pids); SIGUSR1 writes
 * OUTDIR/<pid>.check "ok <sum>" / "bad <sum>"; SIGTERM exits.  Errors: OUTDIR/error.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "protocol.h"

#define PAGE 4096UL

static unsigned char *a, *b;  /* b is NULL in the child: moved onto a */

static uint64_t page_sum(const unsigned char *p, uint64_t h)
{
	for (size_t i = 0; i < PAGE; i++)
		h = (h ^ p[i]) * 1099511628211ULL;
	return h;
}

static int zeros(const unsigned char *p)
{
	for (size_t i = 0; i < PAGE; i++)
		if (p[i])
			return 0;
	return 1;
}

/* the written pages' checksum; 0 when an untouched page does not read as zeros (read only
 * at a check: reading it before the dump would map the zero page there) */
static uint64_t checksum_now(void)
{
	if (!zeros(a + PAGE) || (b && !zeros(b + PAGE)))
		return 0;
	uint64_t h = page_sum(a, 1469598103934665603ULL);
	return b ? page_sum(b, h) : h;
}

static uint64_t checksum_written(void)
{
	uint64_t h = page_sum(a, 1469598103934665603ULL);
	return b ? page_sum(b, h) : h;
}

int main(int argc, char **argv)
{
	if (argc != 2)
		return 64;
	outdir = argv[1];
	catch_usr1_term();
	/* A at pages 0-1 and B at pages 4-5 of one reservation: apart, so they never merge */
	unsigned char *area = mmap(NULL, 8 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		die("mmap");
	munmap(area + 2 * PAGE, 2 * PAGE);
	munmap(area + 6 * PAGE, 2 * PAGE);
	a = mmap(area, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	b = mmap(area + 4 * PAGE, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (a == MAP_FAILED || b == MAP_FAILED)
		die("mmap fixed");
	memset(a, 0xa1, PAGE);  /* page 1 of each stays untouched */
	memset(b, 0xb2, PAGE);
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		if (mremap(b, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, a) != a)
			die("mremap");
		b = NULL;
	}
	uint64_t sum = checksum_written();
	publish_sum(sum);
	if (pid > 0)
		write_ready_after_sums(2);
	serve_checksum(checksum_now, sum);
	return 0;
}
