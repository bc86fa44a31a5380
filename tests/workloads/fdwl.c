/*
 * fdwl OUTDIR: directory fds and a FIFO shared by a root and its child, for
 * tests/test_state_fds.py.  OUTDIR holds a directory "d" with many entries and a FIFO
 * "fifo" (the test makes both).
 *
 *   root:  fd 7  = OUTDIR/d, O_DIRECTORY, 10 entries already read (its position moved)
 *          fd 8  = OUTDIR/log, O_WRONLY|O_APPEND, "before\n" written
 *          fd 9  = OUTDIR, O_DIRECTORY|O_CLOEXEC, nothing read
 *          fd 10 = the FIFO, O_RDWR (opened before the fork: the child shares it)
 *          fd 12 = the FIFO, O_WRONLY|O_NONBLOCK; "fifo-bytes" written and left unread
 *   child: fd 10 inherited, fd 11 = the FIFO, O_RDONLY|O_NONBLOCK (its own description)
 * Each writes OUTDIR/<pid>.sum once set up; the root then writes OUTDIR/ready (pids).
 * SIGUSR1: write OUTDIR/<pid>.check, from inside: for the root, the names read at set-up
 * ("seen"), the names its fd 7 still gives from its position ("rest"; then it seeks back),
 * and for every fd 7..12 it has: its flags, position and inode; the FIFO's unread count.
 * SIGUSR2 (child): read everything from fd 11 into OUTDIR/<pid>.fifo.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include "protocol.h"

static volatile sig_atomic_t got_usr2;
static char seen[4096];

static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }

static void must(int ok, const char *what)
{
	if (!ok)
		die(what);
}

static void at(int fd, int want, const char *what)
{
	must(fd >= 0, what);
	if (fd != want) {
		must(dup2(fd, want) == want, what);
		close(fd);
	}
}

/* Names from the directory fd, up to max (all if max < 0), appended space-separated. */
static int read_names(int fd, char *out, size_t size, int max)
{
	char buf[512];
	int count = 0;
	for (;;) {
		long n = syscall(SYS_getdents64, fd, buf, max < 0 ? sizeof buf : 64);
		if (n <= 0)
			return count;
		for (long off = 0; off < n;) {
			struct dirent64 *d = (struct dirent64 *)(buf + off);
			off += d->d_reclen;
			if (strcmp(d->d_name, ".") && strcmp(d->d_name, "..")) {
				size_t len = strlen(out);
				snprintf(out + len, size - len, "%s%s", len ? " " : "", d->d_name);
			}
			count++;
		}
		if (max >= 0 && count >= max)
			return count;
	}
}

static int is_root; /* the root reports the names it read at set-up too */

static void report(void)
{
	static char text[16384], rest[8192];
	char *p = text, *end = text + sizeof text;
	if (is_root) {
		off_t pos = lseek(7, 0, SEEK_CUR);
		rest[0] = 0;
		read_names(7, rest, sizeof rest, -1);
		must(lseek(7, pos, SEEK_SET) == pos, "seek back");
		p += snprintf(p, end - p, "seen %s\nrest %s\n", seen, rest);
	}
	for (int fd = 7; fd <= 12; fd++) {
		int flags = fcntl(fd, F_GETFL), fdflags = fcntl(fd, F_GETFD);
		if (flags < 0)
			continue;
		struct stat st;
		fstat(fd, &st);
		p += snprintf(p, end - p, "fd%d flags %#o cloexec %d pos %lld ino %lu", fd, flags,
			      fdflags & FD_CLOEXEC, (long long)lseek(fd, 0, SEEK_CUR), (unsigned long)st.st_ino);
		if (S_ISFIFO(st.st_mode)) {
			int unread = -1;
			ioctl(fd, FIONREAD, &unread);
			p += snprintf(p, end - p, " unread %d", unread);
		}
		p += snprintf(p, end - p, "\n");
	}
	write_own_file("check", text);
}

/* SIGUSR2: OUTDIR/<pid>.fifo = what the fifo (fd 11) holds now */
static void read_fifo(void)
{
	if (!got_usr2)
		return;
	got_usr2 = 0;
	char buf[4096];
	ssize_t n = read(11, buf, sizeof buf - 1);
	buf[n > 0 ? n : 0] = 0;
	write_own_file("fifo", buf);
}

int main(int argc, char **argv)
{
	start(argc, argv);
	signal(SIGUSR2, on_usr2);
	char path[4096];
	snprintf(path, sizeof path, "%s/fifo", outdir);
	at(open(path, O_RDWR), 10, "open fifo rdwr");
	pid_t child = fork();
	if (child == 0) {
		at(open(path, O_RDONLY | O_NONBLOCK), 11, "open fifo rdonly");
		write_own_file("sum", "child\n");
		serve_reports(report, read_fifo);
	}
	at(open(path, O_WRONLY | O_NONBLOCK), 12, "open fifo wronly");
	must(write(12, "fifo-bytes", 10) == 10, "write fifo");
	snprintf(path, sizeof path, "%s/d", outdir);
	at(open(path, O_RDONLY | O_DIRECTORY), 7, "open d");
	must(read_names(7, seen, sizeof seen, 10) >= 10, "read d");
	snprintf(path, sizeof path, "%s/log", outdir);
	at(open(path, O_WRONLY | O_APPEND | O_CREAT, 0644), 8, "open log");
	must(write(8, "before\n", 7) == 7, "write log");
	at(open(outdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), 9, "open outdir");
	must(fcntl(9, F_SETFD, FD_CLOEXEC) == 0, "cloexec"); /* dup2 in at() dropped it */
	snprintf(path, sizeof path, "%s/%d.sum", outdir, (int)child);
	while (access(path, F_OK) != 0)
		usleep(1000);
	char ready[64];
	snprintf(ready, sizeof ready, "%d\n%d\n", (int)getpid(), (int)child);
	write_file("ready", ready);
	is_root = 1;
	serve_reports(report, read_fifo);
}
