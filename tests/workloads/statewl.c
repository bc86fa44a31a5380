/*
 * statewl OUTDIR: a root and one child that set process state beyond memory, for
 * tests/test_state_creds.py.  OUTDIR must be writable by uid 1004 (the root drops to it).
 *
 *   child (forked first, stays uid 0): groups {5, 6}, nice 3, umask 077,
 *          personality UNAME26, pdeathsig SIGWINCH, dumpable 0, no_new_privs,
 *          RLIMIT_NOFILE 100/200, SCHED_BATCH with reset-on-fork, CPU 0 only,
 *          oom_score_adj 300, CAP_SYS_PTRACE not effective (still permitted),
 *          inheritable and ambient CAP_NET_RAW, CAP_SYS_MODULE out of the bounding
 *          set, securebits NOROOT
 *   root:  nice 5, child subreaper, umask 027, personality ADDR_NO_RANDOMIZE,
 *          RLIMIT_NOFILE 250/300, RLIMIT_CORE 0/1 MiB, RLIMIT_STACK soft 4 MiB,
 *          cwd OUTDIR, groups {4, 27, 1234}, gids 1001/1002/1003 (fs 1003),
 *          uids 1004/1005/1006 (fs 1006), dumpable 1 (a change of uid resets it to 0),
 *          SCHED_RR priority 3, oom_score_adj 700, CAP_SYS_BOOT out of the bounding set,
 *          keep-caps across the uid change, then effective {NET_BIND_SERVICE},
 *          permitted and inheritable {NET_BIND_SERVICE, NET_RAW}, ambient {NET_RAW}
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
#include <linux/capability.h>
#include <linux/securebits.h>
#include <sched.h>
#include <sys/personality.h>
#include <sys/syscall.h>
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

static void capsets(struct __user_cap_data_struct d[2], int get)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	must(syscall(get ? SYS_capget : SYS_capset, &h, d) == 0, get ? 60 : 61);
}

static void set_oom(const char *value)
{
	int fd = open("/proc/self/oom_score_adj", O_WRONLY);
	must(fd >= 0 && write(fd, value, strlen(value)) == (ssize_t)strlen(value), 62);
	close(fd);
}

static void set_caps(unsigned long long eff, unsigned long long prm, unsigned long long inh)
{
	struct __user_cap_data_struct d[2] = {{eff, prm, inh}, {eff >> 32, prm >> 32, inh >> 32}};
	capsets(d, 0);
}

/* The lines of /proc/self/status that start with Cap, one "capxxx value" line each. */
static char *status_caps(char *p, char *end)
{
	char line[256];
	FILE *f = fopen("/proc/self/status", "r");
	if (!f)
		return p;
	while (fgets(line, sizeof line, f)) {
		char key[32], val[64];
		if (strncmp(line, "Cap", 3) == 0 && sscanf(line, "%31[^:]:%63s", key, val) == 2)
			p += snprintf(p, end - p, "%s %s\n", key, val);
	}
	fclose(f);
	return p;
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
	p = status_caps(p, end);
	struct sched_param sp;
	sched_getparam(0, &sp);
	cpu_set_t cpus;
	sched_getaffinity(0, sizeof cpus, &cpus);
	char oom[32] = "?";
	int ofd = open("/proc/self/oom_score_adj", O_RDONLY);
	if (ofd >= 0) {
		ssize_t n = read(ofd, oom, sizeof oom - 1);
		oom[n > 0 ? n - 1 : 0] = 0;
		close(ofd);
	}
	p += snprintf(p, end - p, "securebits %#x\nsched %#x %d\ncpus", prctl(PR_GET_SECUREBITS),
		      sched_getscheduler(0), sp.sched_priority);
	for (int c = 0; c < CPU_SETSIZE; c++)
		if (CPU_ISSET(c, &cpus))
			p += snprintf(p, end - p, " %d", c);
	p += snprintf(p, end - p, "\noom_score_adj %s\n", oom);
	write_own_file("check", text);
}

static void set_limit(int res, rlim_t soft, rlim_t hard)
{
	struct rlimit rl = {soft, hard};
	must(setrlimit(res, &rl) == 0, 10 + res);
}

int main(int argc, char **argv)
{
	start(argc, argv);
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
		struct sched_param batch = {0};
		must(sched_setscheduler(0, SCHED_BATCH | SCHED_RESET_ON_FORK, &batch) == 0, 36);
		cpu_set_t one;
		CPU_ZERO(&one);
		CPU_SET(0, &one);
		must(sched_setaffinity(0, sizeof one, &one) == 0, 37);
		set_oom("300");
		struct __user_cap_data_struct d[2];
		capsets(d, 1);
		d[0].effective &= ~(1u << CAP_SYS_PTRACE);
		d[0].inheritable = 1u << CAP_NET_RAW;
		capsets(d, 0);
		must(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW, 0, 0) == 0, 38);
		must(prctl(PR_CAPBSET_DROP, CAP_SYS_MODULE) == 0, 39);
		must(prctl(PR_SET_SECUREBITS, SECBIT_NOROOT) == 0, 50);
		write_own_file("sum", "child\n");
		serve_reports(report, NULL);
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
	struct sched_param rr = {3};
	must(sched_setscheduler(0, SCHED_RR, &rr) == 0, 51);
	set_oom("700");
	must(prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT) == 0, 52);
	must(prctl(PR_SET_KEEPCAPS, 1) == 0, 53);
	gid_t g[3] = {4, 27, 1234};
	must(setgroups(3, g) == 0, 44);
	must(setresgid(1001, 1002, 1003) == 0, 45);
	setfsgid(1003);
	must(setresuid(1004, 1005, 1006) == 0, 46);
	setfsuid(1006);
	unsigned long long nbs = 1ull << CAP_NET_BIND_SERVICE, raw = 1ull << CAP_NET_RAW;
	set_caps(nbs, nbs | raw, nbs | raw);
	must(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW, 0, 0) == 0, 54);
	must(prctl(PR_SET_DUMPABLE, 1) == 0, 47);
	write_own_file("sum", "root\n");
	char ready[64];
	snprintf(ready, sizeof ready, "%d\n%d\n", (int)getpid(), (int)child);
	write_file("ready", ready);
	serve_reports(report, NULL);
}
