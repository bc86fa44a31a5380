/*
 * threadwl OUTDIR CHILDREN: a multi-threaded process (and CHILDREN forked copies of it,
 * each multi-threaded too) for tests/test_threads.py.
 *
 * Before forking, the root fills a 4 MiB dataset the children share copy-on-write.
 * Then every process starts NTHREADS threads.  Thread i has its own 256 KiB buffer
 * (malloc'd by the thread: glibc gives it its own arena), filled with a pattern of its
 * own, and a __thread copy of its index (its TLS, through fs_base).  It counts in
 * counter[i] and keeps its tid in tid_now[i] (gettid on every round).  Threads differ in
 * how they wait, so a dump finds them blocked in different system calls (each is named
 * "wl-I"; thread 5 runs at nice 7, the others at the process's; thread 3 has a SIGWINCH
 * pending in its own queue, blocked):
 *   0..5  nanosleep 2 ms per round
 *   6     pthread_cond_wait (a futex wait with no timeout), woken by every check
 *   7     clock_nanosleep 300 ms per round
 * OUTDIR/ready: the pids of the tree.  SIGUSR1: each process asks every thread to verify
 * its buffer and TLS (a generation count; the futex thread is woken), waits for all, then
 * writes OUTDIR/<pid>.check: "ok"/"bad", then per thread
 * "thread I tid T now N tls 0|1 sum 0|1 count C", then "dataset 0|1".  SIGTERM: exit.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#include "protocol.h"

#define NTHREADS 8
#define BUF (256 * 1024)
#define DATASET (4 << 20)

static unsigned char *dataset;
static uint64_t dataset_sum;
static volatile uint64_t counter[NTHREADS];
static volatile int tid_first[NTHREADS], tid_now[NTHREADS], tls_ok[NTHREADS], sum_ok[NTHREADS];
static volatile int generation, ack[NTHREADS];
static volatile unsigned long long pend[NTHREADS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static __thread int my_index = -1;

static uint64_t checksum(const unsigned char *p, size_t n)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < n; i += 8)
		h = (h ^ *(const uint64_t *)(p + i)) * 1099511628211ULL;
	return h;
}

static void fill(unsigned char *p, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i += 8) {
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
		*(uint64_t *)(p + i) = seed;
	}
}

static void *thread_main(void *arg)
{
	int i = (int)(intptr_t)arg;
	my_index = i;
	unsigned char *buf = malloc(BUF);
	if (!buf)
		die("malloc");
	fill(buf, BUF, (uint64_t)getpid() * 131 + i);
	uint64_t sum = checksum(buf, BUF);
	char name[16];
	snprintf(name, sizeof name, "wl-%d", i);
	pthread_setname_np(pthread_self(), name);
	if (i == 5 && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 7) < 0)
		die("setpriority");
	if (i == 3) {
		sigset_t winch;
		sigemptyset(&winch);
		sigaddset(&winch, SIGWINCH);
		pthread_sigmask(SIG_BLOCK, &winch, NULL);
		if (syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGWINCH) < 0)
			die("tgkill");
	}
	tid_first[i] = tid_now[i] = (int)syscall(SYS_gettid);
	int seen = 0;
	for (;;) {
		counter[i]++;
		tid_now[i] = (int)syscall(SYS_gettid);
		int gen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
		if (gen != seen) {
			tls_ok[i] = my_index == i;
			sum_ok[i] = checksum(buf, BUF) == sum;
			sigset_t p;
			sigpending(&p);
			unsigned long long bits = 0;
			for (int s = 1; s < 64; s++)
				if (sigismember(&p, s))
					bits |= 1ULL << s;
			pend[i] = bits;
			seen = gen;
			__atomic_store_n(&ack[i], gen, __ATOMIC_RELEASE);
		}
		if (i < 6) {
			struct timespec ts = {0, 2 * 1000 * 1000};
			nanosleep(&ts, NULL);
		} else if (i == 6) {
			pthread_mutex_lock(&lock);
			while (generation == seen)
				pthread_cond_wait(&wake, &lock);
			pthread_mutex_unlock(&lock);
		} else {
			struct timespec ts = {0, 300 * 1000 * 1000};
			clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
		}
	}
	return NULL;
}

static void check(void)
{
	pthread_mutex_lock(&lock);
	int gen = ++generation;
	pthread_cond_broadcast(&wake);
	pthread_mutex_unlock(&lock);
	for (int waited = 0; waited < 5000; waited++) {
		int all = 1;
		for (int i = 0; i < NTHREADS; i++)
			all &= __atomic_load_n(&ack[i], __ATOMIC_ACQUIRE) == gen;
		if (all)
			break;
		usleep(1000);
	}
	char text[4096], *p = text, *end = text + sizeof text;
	int ok = checksum(dataset, DATASET) == dataset_sum;
	for (int i = 0; i < NTHREADS; i++)
		ok &= ack[i] == gen && tls_ok[i] && sum_ok[i] && tid_now[i] == tid_first[i];
	p += snprintf(p, end - p, "%s\n", ok ? "ok" : "bad");
	for (int i = 0; i < NTHREADS; i++)
		p += snprintf(p, end - p, "thread %d tid %d now %d tls %d sum %d count %llu ack %d pend %llu\n", i,
			      tid_first[i], tid_now[i], tls_ok[i], sum_ok[i], (unsigned long long)counter[i], ack[i] == gen,
			      pend[i]);
	p += snprintf(p, end - p, "dataset %d\n", checksum(dataset, DATASET) == dataset_sum);
	write_own_file("check", text);
}

static void run(void)
{
	sigset_t mask, old;
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &mask, &old); /* threads leave the protocol signals to main */
	pthread_t t[NTHREADS];
	for (int i = 0; i < NTHREADS; i++)
		if (pthread_create(&t[i], NULL, thread_main, (void *)(intptr_t)i))
			die("pthread_create");
	for (int i = 0; i < NTHREADS; i++)
		while (!tid_first[i])
			usleep(1000);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: threadwl OUTDIR CHILDREN\n");
		return 2;
	}
	outdir = argv[1];
	int children = atoi(argv[2]);
	catch_usr1_term();
	dataset = malloc(DATASET);
	if (!dataset)
		die("malloc");
	fill(dataset, DATASET, 7);
	dataset_sum = checksum(dataset, DATASET);
	int pipefd[2];
	if (pipe(pipefd) < 0)
		die("pipe");
	pid_t pids[64];
	int n = children < 64 ? children : 64;
	for (int c = 0; c < n; c++) {
		pids[c] = fork();
		if (pids[c] < 0)
			die("fork");
		if (pids[c] == 0) {
			close(pipefd[0]);
			run();
			if (write(pipefd[1], "r", 1) != 1)
				die("write");
			close(pipefd[1]);
			goto loop;
		}
	}
	close(pipefd[1]);
	for (int c = 0; c < n; c++) {
		char ch;
		if (read(pipefd[0], &ch, 1) != 1)
			die("child not ready");
	}
	close(pipefd[0]);
	run();
	char text[2048], *p = text, *end = text + sizeof text;
	p += snprintf(p, end - p, "%d", (int)getpid());
	for (int c = 0; c < n; c++)
		p += snprintf(p, end - p, " %d", (int)pids[c]);
	snprintf(p, end - p, "\n");
	write_file("ready", text);
loop:
	while (!got_term) {
		if (got_usr1) {
			got_usr1 = 0;
			check();
		}
		usleep(5000);
	}
	return 0;
}
