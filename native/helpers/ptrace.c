/* ptrace and friends, returning -errno instead of setting errno. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

long cow_ptrace(long request, int pid, unsigned long addr, unsigned long data)
{
	long r = syscall(SYS_ptrace, request, pid, addr, data);
	return r < 0 ? -errno : r;
}

/* PTRACE_PEEK* return the word through *out: -1 is a valid word. */
long cow_ptrace_peek(long request, int pid, unsigned long addr, unsigned long *out)
{
	return cow_ptrace(request, pid, addr, (unsigned long)out);
}

long cow_process_vm_readv(int pid, void *local, unsigned long len, unsigned long remote)
{
	struct iovec l = { local, len }, r = { (void *)remote, len };
	long n = syscall(SYS_process_vm_readv, pid, &l, 1, &r, 1, 0);
	return n < 0 ? -errno : n;
}

long cow_process_vm_writev(int pid, const void *local, unsigned long len, unsigned long remote)
{
	struct iovec l = { (void *)local, len }, r = { (void *)remote, len };
	long n = syscall(SYS_process_vm_writev, pid, &l, 1, &r, 1, 0);
	return n < 0 ? -errno : n;
}

long cow_syscall6(long nr, long a, long b, long c, long d, long e, long f)
{
	long r = syscall(nr, a, b, c, d, e, f);
	return r < 0 ? -errno : r;
}
