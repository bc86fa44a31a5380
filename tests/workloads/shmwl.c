/* Shared memory workload: shmwl MODE OUTDIR CHILDREN
 * MODE: "anon" (MAP_SHARED|MAP_ANONYMOUS), "memfd" (a memfd, also kept as an fd, offset 1234)
 * or a file path (created, mapped MAP_SHARED, fd closed).
 * The region has 64 pages: page 0 holds one u64 counter per process (slot 0 the parent, k
 * child k), pages 1..39 hold the byte p, pages 40..63 are left untouched.  Private memory
 * (256 pages) is written before the fork, so the children share it copy-on-write, and each
 * child rewrites 4 of its pages.  Then every process counts in its slot forever.
 * In "anon" mode a second region: 8 shared pages, page i = 0x40 + i, of which the parent
 * unmaps the first 2 before forking: a mapping at offset 2 pages into its object.
 * OUTDIR/ready = "parent child1 .. childN [fd]". */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#include "protocol.h"

#define PAGE 4096
#define PAGES 64
#define FILLED 40
#define PRIVATE 256
#define MAX_CHILDREN 7

int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	const char *mode = argv[1];
	outdir = argv[2];
	int children = atoi(argv[3]);
	if (children < 0 || children > MAX_CHILDREN)
		return 2;
	size_t size = PAGES * PAGE;
	int fd = -1;
	unsigned char *region;
	if (!strcmp(mode, "anon")) {
		region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	} else {
		if (!strcmp(mode, "memfd"))
			fd = memfd_create("cowtree-test", 0);
		else
			fd = open(mode, O_RDWR | O_CREAT | O_TRUNC, 0600);
		if (fd < 0)
			die("open");
		if (ftruncate(fd, size) < 0)
			die("ftruncate");
		region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (strcmp(mode, "memfd")) {
			close(fd);
			fd = -1;
		} else if (lseek(fd, 1234, SEEK_SET) < 0) {
			die("lseek");
		}
	}
	if (region == MAP_FAILED)
		die("mmap");
	if (!strcmp(mode, "anon")) {
		unsigned char *second = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (second == MAP_FAILED)
			die("mmap second");
		for (int p = 0; p < 8; p++)
			memset(second + (size_t)p * PAGE, 0x40 + p, PAGE);
		if (munmap(second, 2 * PAGE) < 0)
			die("munmap");
	}
	for (int p = 1; p < FILLED; p++)
		memset(region + (size_t)p * PAGE, p, PAGE);
	unsigned char *private = mmap(NULL, PRIVATE * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (private == MAP_FAILED)
		die("mmap private");
	for (int p = 0; p < PRIVATE; p++) {  /* every page's bytes differ: no equal-content merge */
		memset(private + (size_t)p * PAGE, 0x80 + p % 64, PAGE);
		memcpy(private + (size_t)p * PAGE, &p, sizeof p);
	}

	char ready[512];
	int at = snprintf(ready, sizeof ready, "%d", (int)getpid());
	int slot = 0;
	for (int k = 1; k <= children; k++) {
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			slot = k;
			for (int p = 0; p < 4; p++)
				private[(size_t)(k * 8 + p) * PAGE] = (unsigned char)k;  /* COW break */
			break;
		}
		at += snprintf(ready + at, sizeof ready - at, " %d", (int)pid);
	}
	if (slot == 0) {
		if (fd >= 0)
			snprintf(ready + at, sizeof ready - at, " %d", fd);
		write_file("ready", ready);
	}
	volatile uint64_t *counter = (volatile uint64_t *)region + slot;
	struct timespec ts = {0, 2000000};
	for (;;) {
		__atomic_add_fetch(counter, 1, __ATOMIC_RELAXED);
		nanosleep(&ts, NULL);
	}
}
