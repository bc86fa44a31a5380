/*
 * cowload PATTERN MIB OUTDIR: a process tree that shares memory copy-on-write
 * in one of several patterns, for collect/apply tests and benchmarks.
 *
 * Protocol (tests/support/workloads.py relies on it):
 *   - every process, once its memory is final, writes OUTDIR/<pid>.sum
 *     (checksum of its workload memory) and closes it;
 *   - the root waits until all expected .sum files exist, then writes
 *     OUTDIR/ready (the pids, one per line; written to a temp name, renamed);
 *   - then every process waits in sigsuspend;
 *   - SIGUSR1: recompute the checksum, write OUTDIR/<pid>.check "ok <sum>" or "bad <sum>";
 *   - SIGTERM: exit.
 * No file descriptor stays open besides 0, 1, 2 (the launcher makes them /dev/null).
 * On a setup error, OUTDIR/error holds the reason.
 *
 * Patterns:
 *   same     parent fills the region, forks 3 children that rewrite a few pages each
 *   moved    2 children; one mremaps the region to another address, one rewrites a few pages
 *   rewrote  parent rewrites the whole region after forking 2 children
 *   chain    grandparent -> child -> 2 grandchildren; the child rewrites half
 *            (a quarter before forking, a quarter after), grandchildren a few pages
 *   split    3 children mprotect/munmap parts, so VMA boundaries differ
 *   orphans  root is a child subreaper; a middle process forks 2 children, then exits
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
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "protocol.h"

#define PAGE 4096UL
#define MAX_REGIONS 4

static struct { unsigned char *addr; size_t len; } regions[MAX_REGIONS];
static int nregions;

/* Page-distinct contents: every word depends on (seed, page index, word index). */
static void fill_pages(unsigned char *base, size_t first, size_t count, uint64_t seed)
{
	for (size_t p = first; p < first + count; p++) {
		uint64_t *w = (uint64_t *)(base + p * PAGE);
		uint64_t x = seed * 0x9E3779B97F4A7C15ULL ^ (p + 1) * 0xC2B2AE3D27D4EB4FULL;
		for (size_t i = 0; i < PAGE / 8; i++) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17;
			w[i] = x;
		}
	}
}

static uint64_t checksum(void)
{
	uint64_t h = 1469598103934665603ULL;
	for (int r = 0; r < nregions; r++) {
		const uint64_t *w = (const uint64_t *)regions[r].addr;
		for (size_t i = 0; i < regions[r].len / 8; i++)
			h = (h ^ w[i]) * 1099511628211ULL;
	}
	return h;
}

static void set_regions1(unsigned char *addr, size_t len)
{
	regions[0].addr = addr;
	regions[0].len = len;
	nregions = 1;
}

static void add_region(unsigned char *addr, size_t len)
{
	regions[nregions].addr = addr;
	regions[nregions].len = len;
	nregions++;
}

/* Final memory reached in a non-root process: publish and serve. */
static void settle(void)
{
	uint64_t sum = checksum();
	publish_sum(sum);
	serve_checksum(checksum, sum);
}

/* The root: publish, wait for everyone's .sum, write ready, serve. */
static void root_settle(int expected)
{
	uint64_t sum = checksum();
	publish_sum(sum);
	write_ready_after_sums(expected);
	serve_checksum(checksum, sum);
}

static pid_t fork_or_die(void)
{
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	return pid;
}

static void *map_region(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		static const char usage[] = "usage: cowload same|moved|rewrote|chain|split|orphans MIB OUTDIR\n";
		if (write(2, usage, sizeof usage - 1) < 0) { /* stderr may be closed */ }
		return 2;
	}
	const char *pattern = argv[1];
	size_t len = (size_t)atol(argv[2]) << 20;
	size_t npages = len / PAGE;
	outdir = argv[3];
	if (npages < 64) {
		errno = EINVAL;
		die("MIB must be at least 1");
	}

	catch_usr1_term();

	unsigned char *region = map_region(len);
	fill_pages(region, 0, npages, 1);
	set_regions1(region, len);

	if (strcmp(pattern, "same") == 0) {
		for (int c = 0; c < 3; c++) {
			if (fork_or_die() == 0) {
				fill_pages(region, 5 + c * 7, 3, 100 + c);
				settle();
			}
		}
		root_settle(4);
	} else if (strcmp(pattern, "moved") == 0) {
		if (fork_or_die() == 0) {
			/* reserve a spot, then move the region there */
			void *dest = mmap(NULL, len + PAGE * 16, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (dest == MAP_FAILED)
				die("mmap");
			unsigned char *moved = mremap(region, len, len, MREMAP_MAYMOVE | MREMAP_FIXED,
						      (unsigned char *)dest + PAGE * 8);
			if (moved == MAP_FAILED)
				die("mremap");
			set_regions1(moved, len);
			fill_pages(moved, 1, 2, 200);
			settle();
		}
		if (fork_or_die() == 0) {
			fill_pages(region, 10, 4, 201);
			settle();
		}
		root_settle(3);
	} else if (strcmp(pattern, "rewrote") == 0) {
		for (int c = 0; c < 2; c++) {
			if (fork_or_die() == 0) {
				fill_pages(region, 3 + c, 1, 300 + c);
				settle();
			}
		}
		fill_pages(region, 0, npages, 2);
		root_settle(3);
	} else if (strcmp(pattern, "chain") == 0) {
		if (fork_or_die() == 0) {
			fill_pages(region, 0, npages / 4, 400);
			for (int c = 0; c < 2; c++) {
				if (fork_or_die() == 0) {
					fill_pages(region, npages / 2 + 1 + c * 5, 2, 410 + c);
					settle();
				}
			}
			fill_pages(region, npages / 4, npages / 4, 401);
			settle();
		}
		root_settle(4);
	} else if (strcmp(pattern, "split") == 0) {
		if (fork_or_die() == 0) {
			/* a read-only hole in the middle: three VMAs */
			if (mprotect(region + npages / 4 * PAGE, npages / 4 * PAGE, PROT_READ) < 0)
				die("mprotect");
			settle();
		}
		if (fork_or_die() == 0) {
			/* unmap the second quarter: two VMAs */
			if (munmap(region + npages / 4 * PAGE, npages / 4 * PAGE) < 0)
				die("munmap");
			set_regions1(region, npages / 4 * PAGE);
			add_region(region + npages / 2 * PAGE, len - npages / 2 * PAGE);
			fill_pages(region, npages / 2 + 2, 2, 500);
			settle();
		}
		if (fork_or_die() == 0) {
			/* unmap the head, read-only tail */
			if (munmap(region, 8 * PAGE) < 0)
				die("munmap");
			if (mprotect(region + (npages - 8) * PAGE, 8 * PAGE, PROT_READ) < 0)
				die("mprotect");
			set_regions1(region + 8 * PAGE, len - 8 * PAGE);
			fill_pages(region, 9, 1, 501);
			settle();
		}
		root_settle(4);
	} else if (strcmp(pattern, "orphans") == 0) {
		if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
			die("PR_SET_CHILD_SUBREAPER");
		pid_t middle = fork_or_die();
		if (middle == 0) {
			fill_pages(region, 0, 4, 600);
			for (int c = 0; c < 2; c++) {
				if (fork_or_die() == 0) {
					fill_pages(region, 8 + c * 3, 2, 610 + c);
					settle();
				}
			}
			_exit(0);
		}
		if (waitpid(middle, NULL, 0) < 0)
			die("waitpid");
		root_settle(3);
	} else {
		errno = EINVAL;
		die("unknown pattern");
	}
	return 0;
}
