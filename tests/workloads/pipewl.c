/*
 * pipewl OUTDIR: a pre-fork tree (root + 2 workers) talking over pipes, for the
 * pipe tests of cow-collect/cow-apply (tests/test_state_pipes.py).
 *
 * fds (besides 0, 1, 2 on /dev/null):
 *   workers  10 jobs read end (blocking)      13 replies write end (O_NONBLOCK, set by
 *                                                worker 1 on the shared description)
 *   root     11 jobs write end (blocking)     12 replies read end (close-on-exec)
 *            17 dup of 12 (same description, no close-on-exec)
 *            18 jobs write end opened again via /proc/self/fd/11 (own description, O_NONBLOCK)
 *            14/15 "big" pipe read/write ends, capacity 256 KiB, 14 O_NONBLOCK,
 *                  200000 unread bytes
 *            16 write end of a pipe whose read end nobody holds (SIGPIPE ignored)
 * Before OUTDIR/ready: the root writes 3 jobs "J:0000n\n" (unread), each worker writes
 * "W:<pid>\n" to the replies pipe (unread).  Then everybody waits in sigsuspend.
 * SIGUSR1 (the test signals the workers first, then the root):
 *   worker: reads one job, answers "R:<pid>:<n>\n", checks its flags;
 *   root:   reads 4 lines from replies (2 W lines first, then 2 R lines), all the big
 *           pipe's bytes, writes to fd 16 (must fail EPIPE), checks every flag;
 *   each writes OUTDIR/<pid>.check: "ok" or "bad <what>".
 * SIGTERM: exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "protocol.h"

#define BIG 200000
static pid_t workers[2];
static char bad[512];


static void note(const char *fmt, const char *what, long v)
{
	if (!bad[0])
		snprintf(bad, sizeof bad, fmt, what, v);
}

static void move_fd(int from, int to)
{
	if (from != to) {
		if (dup2(from, to) < 0)
			_exit(4);
		close(from);
	}
}

static unsigned char pattern(long i) { return (unsigned char)(i * 7 + i / 251); }

static void expect_flag(int fd, int getcmd, int flag, int want, const char *what)
{
	int v = fcntl(fd, getcmd);
	if (v < 0)
		note("%s: fcntl failed (fd %ld)", what, (long)fd);
	else if (!!(v & flag) != want)
		note("%s: flag wrong on fd %ld", what, (long)fd);
}

static void report(void)
{
	char text[600];
	snprintf(text, sizeof text, "%s\n", bad[0] ? bad : "ok");
	if (bad[0]) {
		memmove(text + 4, text, strlen(text) + 1);
		memcpy(text, "bad ", 4);
	}
	write_own_file("check", text);
}

static void worker_check(void)
{
	char job[9] = {0}, line[64];
	if (read(10, job, 8) != 8 || strncmp(job, "J:0000", 6) != 0 || job[7] != '\n')
		note("%s: bad job (%ld)", "worker", 0L);
	snprintf(line, sizeof line, "R:%d:%c\n", (int)getpid(), job[6]);
	if (write(13, line, strlen(line)) != (ssize_t)strlen(line))
		note("%s: reply write failed (errno %ld)", "worker", (long)errno);
	expect_flag(13, F_GETFL, O_NONBLOCK, 1, "replies write end nonblock");
	expect_flag(10, F_GETFL, O_NONBLOCK, 0, "jobs read end blocking");
	expect_flag(10, F_GETFD, FD_CLOEXEC, 0, "jobs read end cloexec");
	report();
}

static int read_line(int fd, char *buf, int size)
{
	int n = 0;
	while (n < size - 1) {
		struct pollfd p = {fd, POLLIN, 0};
		if (poll(&p, 1, 3000) != 1)
			return -1;
		if (read(fd, buf + n, 1) != 1)
			return -1;
		if (buf[n++] == '\n')
			break;
	}
	buf[n] = 0;
	return n;
}

static void root_check(void)
{
	char line[64], want[2][64];
	int seen_w = 0, seen_r = 0, jobs = 0;
	for (int i = 0; i < 2; i++)
		snprintf(want[i], sizeof want[i], "W:%d\n", (int)workers[i]);
	for (int i = 0; i < 4; i++) {
		if (read_line(12, line, sizeof line) < 0) {
			note("%s: reply %ld missing", "root", (long)i);
			break;
		}
		if (i < 2) {
			int k = strcmp(line, want[0]) == 0 ? 0 : strcmp(line, want[1]) == 0 ? 1 : -1;
			if (k < 0 || (seen_w & (1 << k)))
				note("%s: unexpected unread reply at line %ld", "root", (long)i);
			else
				seen_w |= 1 << k;
		} else {
			int pid, j;
			if (sscanf(line, "R:%d:%d", &pid, &j) != 2 || j < 1 || j > 3 || (jobs & (1 << j)))
				note("%s: bad answer at line %ld", "root", (long)i);
			jobs |= 1 << j;
			seen_r |= pid == workers[0] ? 1 : pid == workers[1] ? 2 : 4;
		}
	}
	if (seen_r != 3)
		note("%s: answers not from both workers (%ld)", "root", (long)seen_r);
	static unsigned char big[BIG + 4096];
	long got = 0;
	for (;;) {
		ssize_t n = read(14, big + got, sizeof big - got);
		if (n <= 0) {
			if (n < 0 && errno != EAGAIN)
				note("%s: big pipe read errno %ld", "root", (long)errno);
			break;
		}
		got += n;
	}
	if (got != BIG)
		note("%s: big pipe held %ld bytes", "root", got);
	for (long i = 0; i < got && i < BIG; i++)
		if (big[i] != pattern(i)) {
			note("%s: big pipe byte %ld differs", "root", i);
			break;
		}
	if (fcntl(14, F_GETPIPE_SZ) != 262144)
		note("%s: big pipe capacity %ld", "root", (long)fcntl(14, F_GETPIPE_SZ));
	if (write(16, "x", 1) != -1 || errno != EPIPE)
		note("%s: write to a pipe without readers: errno %ld", "root", (long)errno);
	expect_flag(11, F_GETFL, O_NONBLOCK, 0, "jobs write end blocking");
	expect_flag(18, F_GETFL, O_NONBLOCK, 1, "second jobs write description nonblock");
	expect_flag(12, F_GETFD, FD_CLOEXEC, 1, "replies read end cloexec");
	expect_flag(17, F_GETFD, FD_CLOEXEC, 0, "dup of replies read end not cloexec");
	expect_flag(14, F_GETFL, O_NONBLOCK, 1, "big read end nonblock");
	report();
}

int main(int argc, char **argv)
{
	start(argc, argv);
	int jobs[2], replies[2], bigp[2], orphan[2];
	sigset_t none;
	sigemptyset(&none);
	signal(SIGPIPE, SIG_IGN);
	if (pipe(jobs) || pipe(replies) || pipe(bigp) || pipe(orphan))
		return 2;
	/* park everything high first so the moves below never collide */
	int fds[8] = {jobs[0], jobs[1], replies[0], replies[1], bigp[0], bigp[1], orphan[0], orphan[1]};
	for (int i = 0; i < 8; i++) {
		int hi = fcntl(fds[i], F_DUPFD, 100 + i);
		close(fds[i]);
		fds[i] = hi;
	}
	move_fd(fds[0], 10);
	move_fd(fds[1], 11);
	move_fd(fds[2], 12);
	move_fd(fds[3], 13);
	move_fd(fds[4], 14);
	move_fd(fds[5], 15);
	close(fds[6]);
	move_fd(fds[7], 16);
	for (int i = 0; i < 2; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			for (int fd = 11; fd <= 16; fd++)
				if (fd != 13)
					close(fd);
			if (i == 0) /* shared description: worker 2 sees it too */
				fcntl(13, F_SETFL, fcntl(13, F_GETFL) | O_NONBLOCK);
			char line[32];
			snprintf(line, sizeof line, "W:%d\n", (int)getpid());
			if (write(13, line, strlen(line)) < 0)
				_exit(5);
			write_own_file("sum", "w\n");
			for (;;) {
				sigsuspend(&none);
				if (got_usr1) {
					got_usr1 = 0;
					worker_check();
				}
			}
		}
		workers[i] = pid;
		char name[32];
		snprintf(name, sizeof name, "%d.sum", (int)pid);
		char path[4096];
		snprintf(path, sizeof path, "%s/%s", outdir, name);
		while (access(path, F_OK) != 0) /* worker i writes in order */
			usleep(1000);
	}
	close(10);
	close(13);
	fcntl(12, F_SETFD, FD_CLOEXEC);
	if (dup2(12, 17) != 17)
		return 6;
	int again = open("/proc/self/fd/11", O_WRONLY | O_NONBLOCK);
	move_fd(again, 18);
	fcntl(14, F_SETFL, O_NONBLOCK);
	if (fcntl(15, F_SETPIPE_SZ, 262144) < 0)
		return 7;
	static unsigned char big[BIG];
	for (long i = 0; i < BIG; i++)
		big[i] = pattern(i);
	for (long off = 0; off < BIG;) { /* many writes: the pipe holds many buffers */
		ssize_t n = write(15, big + off, BIG - off < 4000 ? BIG - off : 4000);
		if (n <= 0)
			return 8;
		off += n;
	}
	for (int j = 1; j <= 3; j++) {
		char line[16];
		snprintf(line, sizeof line, "J:0000%d\n", j);
		if (write(11, line, 8) != 8)
			return 9;
	}
	char ready[64];
	snprintf(ready, sizeof ready, "%d\n%d\n%d\n", (int)getpid(), (int)workers[0], (int)workers[1]);
	write_file("ready", ready);
	for (;;) {
		sigsuspend(&none);
		if (got_usr1) {
			got_usr1 = 0;
			root_check();
		}
	}
}
