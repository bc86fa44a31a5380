/*
 * statewl OUTDIR: a root and one child that set process state beyond memory, for
 * tests/test_state_creds.py.  OUTDIR must be writable by uid 1004 (the root drops to it).
 *
 *   child (forked first, stays uid 0): groups {5, 6}, nice 3, umask 077,
 *          personality UNAME26, pdeathsig SIGWINCH, dumpable 0, no_new_privs,
 *          RLIMIT_NOFILE 100/200
 *   root:  nice 5, child subreaper, umask 027, personality ADDR_NO_RANDOMIZE,
 *          RLIMIT_NOFILE 250/300, RLIMIT_CORE 0/1 MiB, RLIMIT_STACK soft 4 MiB,
 *          cwd OUTDIR, groups {4, 27, 1234}, gids 1001/1002/1003 (fs 1003),
 *          uids 1004/1005/1006 (fs 1006), dumpable 1 (a change of uid resets it to 0)
 * Each writes OUTDIR/<pid>.sum once set up; the root then writes OUTDIR/ready (pids).
 * SIGUSR1: write OUTDIR/<pid>.check: the state as read from inside, one "key value" per line.
 * SIGTERM: exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/fsuid.h>
#include <unistd.h>

#include "protocol.h"



static void must(int ok, int code)
{
	if (!ok)
		_exit(code);
}

static void report(void)
{
	static char text[8192];
	char *p = text, *end = text + sizeof text;
	uid_t r, e, s;
	gid_t gr, ge, gs;
	getresuid(&r, &e, &s);
	getresgid(&gr, &ge, &gs);
	int fsuid = setfsuid(-1), fsgid = setfsgid(-1);
	p += snprintf(p, end - p, "uids %u %u %u %d\ngids %u %u %u %d\n", r, e, s, fsuid, gr, ge, gs, fsgid);
	gid_t groups[64];
	int n = getgroups(64, groups);
	p += snprintf(p, end - p, "groups");
	for (int i = 0; i < n; i++)
		p += snprintf(p, end - p, " %u", groups[i]);
	mode_t um = umask(0);
	umask(um);
	errno = 0;
	int nice = getpriority(PRIO_PROCESS, 0);
	int sub = -1, pdeath = -1;
	prctl(PR_GET_CHILD_SUBREAPER, &sub);
	prctl(PR_GET_PDEATHSIG, &pdeath);
	char cwd[4096];
	if (!getcwd(cwd, sizeof cwd))
		strcpy(cwd, "?");
	p += snprintf(p, end - p, "\numask %o\nnice %d\nsubreaper %d\npdeathsig %d\ndumpable %d\nno_new_privs %d\n"
		      "personality %#x\ncwd %s\n", um, nice, sub, pdeath, prctl(PR_GET_DUMPABLE),
		      prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), personality(0xffffffff), cwd);
	for (int res = 0; res < RLIM_NLIMITS; res++) {
		struct rlimit rl;
		getrlimit(res, &rl);
		p += snprintf(p, end - p, "rlimit%d %llu %llu\n", res, (unsigned long long)rl.rlim_cur,
			      (unsigned long long)rl.rlim_max);
	}
	char name[64];
	snprintf(name, sizeof name, "%d.check", (int)getpid());
	write_file(name, text);
}

static void serve(void)
{
	sigset_t none;
	sigemptyset(&none);
	for (;;) {
		sigsuspend(&none);
		if (got_usr1) {
			got_usr1 = 0;
			report();
		}
	}
}

static void set_limit(int res, rlim_t soft, rlim_t hard)
{
	struct rlimit rl = {soft, hard};
	must(setrlimit(res, &rl) == 0, 10 + res);
}

int main(int argc, char **argv)
{
	if (argc != 2)
		return 64;
	outdir = argv[1];
	sigset_t all;
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, NULL);
	signal(SIGUSR1, on_usr1);
	char name[64];
	pid_t child = fork();
	if (child == 0) {
		gid_t g[2] = {5, 6};
		must(setgroups(2, g) == 0, 30);
		must(setpriority(PRIO_PROCESS, 0, 3) == 0, 31);
		umask(077);
		must(personality(UNAME26) != -1, 32);
		must(prctl(PR_SET_PDEATHSIG, SIGWINCH) == 0, 33);
		must(prctl(PR_SET_DUMPABLE, 0) == 0, 34);
		must(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, 35);
		set_limit(RLIMIT_NOFILE, 100, 200);
		snprintf(name, sizeof name, "%d.sum", (int)getpid());
		write_file(name, "child\n");
		serve();
	}
	snprintf(name, sizeof name, "%s/%d.sum", outdir, (int)child);
	while (access(name, F_OK) != 0)
		usleep(1000);
	must(setpriority(PRIO_PROCESS, 0, 5) == 0, 40);
	must(prctl(PR_SET_CHILD_SUBREAPER, 1) == 0, 41);
	umask(027);
	must(personality(ADDR_NO_RANDOMIZE) != -1, 42);
	set_limit(RLIMIT_NOFILE, 250, 300);
	set_limit(RLIMIT_CORE, 0, 1 << 20);
	struct rlimit st;
	getrlimit(RLIMIT_STACK, &st);
	set_limit(RLIMIT_STACK, 4 << 20, st.rlim_max);
	must(chdir(outdir) == 0, 43);
	gid_t g[3] = {4, 27, 1234};
	must(setgroups(3, g) == 0, 44);
	must(setresgid(1001, 1002, 1003) == 0, 45);
	setfsgid(1003);
	must(setresuid(1004, 1005, 1006) == 0, 46);
	setfsuid(1006);
	must(prctl(PR_SET_DUMPABLE, 1) == 0, 47);
	snprintf(name, sizeof name, "%d.sum", (int)getpid());
	write_file(name, "root\n");
	char ready[64];
	snprintf(ready, sizeof ready, "%d\n%d\n", (int)getpid(), (int)child);
	write_file("ready", ready);
	serve();
}
