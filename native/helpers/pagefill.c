/*
 * Filling a restored process's staging pages from cow-apply (stages/apply/fill.py).
 *
 * A write step is a list of (page, frame) pairs; frame f's bytes are at spool + offsets[f]
 * in cow-apply.  Two ways in:
 *  - UFFDIO_COPY on a userfaultfd of the target's mm, for pages it does not have yet: the
 *    kernel allocates the page and copies into it, no zero-fill and no fault per page;
 *    consecutive pages from consecutive spool bytes go in one ioctl.
 *  - process_vm_writev, for pages the target may already have (written before, or shared
 *    copy-on-write with its parent or children: the write gives the target its own copy),
 *    and for ranges without a userfaultfd (private file mappings).
 * `present` (one byte per page of the range) says which pages the target may have: set for
 * every page written here, copied from the parent at fork by the caller.  Two threads may
 * fill different pages of one step at once (the GIL is released during the call).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define IOV_BATCH 1024

/* The handshake on a userfaultfd cow-apply took from a target (pidfd_getfd). */
long cow_uffd_api(int uffd)
{
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	return ioctl(uffd, UFFDIO_API, &api) < 0 ? -errno : 0;
}

/* Missing-page registration of [start, start + len) in the userfaultfd's mm. */
long cow_uffd_register(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = UFFDIO_REGISTER_MODE_MISSING };
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	return (reg.ioctls & ((uint64_t)1 << _UFFDIO_COPY)) ? 0 : -EOPNOTSUPP;
}

struct pvw_batch {
	int pid;
	long n;
	uint64_t bytes; /* written by process_vm_writev so far */
	struct iovec local[IOV_BATCH], remote[IOV_BATCH];
};

static long pvw_flush(struct pvw_batch *b)
{
	size_t want = 0;
	for (long i = 0; i < b->n; i++)
		want += b->local[i].iov_len;
	if (b->n) {
		long w = syscall(SYS_process_vm_writev, b->pid, b->local, b->n, b->remote, b->n, 0);
		if (w < 0)
			return -errno;
		if ((size_t)w != want)
			return -EFAULT;
		b->bytes += want;
	}
	b->n = 0;
	return 0;
}

/* Queue len bytes local -> remote, merged into the last entry when both sides continue it. */
static long pvw_add(struct pvw_batch *b, uint64_t local, uint64_t remote, uint64_t len)
{
	if (b->n) {
		struct iovec *l = &b->local[b->n - 1], *r = &b->remote[b->n - 1];
		if ((uint64_t)(uintptr_t)l->iov_base + l->iov_len == local &&
		    (uint64_t)(uintptr_t)r->iov_base + r->iov_len == remote) {
			l->iov_len += len;
			r->iov_len += len;
			return 0;
		}
		if (b->n == IOV_BATCH) {
			long e = pvw_flush(b);
			if (e)
				return e;
		}
	}
	b->local[b->n].iov_base = (void *)(uintptr_t)local;
	b->local[b->n].iov_len = len;
	b->remote[b->n].iov_base = (void *)(uintptr_t)remote;
	b->remote[b->n].iov_len = len;
	b->n++;
	return 0;
}

/* UFFDIO_COPY of len bytes; a page the target has after all (EEXIST) and everything after
 * it in this run go by process_vm_writev instead. */
static long uffd_copy(int uffd, struct pvw_batch *b, uint64_t local, uint64_t remote, uint64_t len)
{
	while (len) {
		struct uffdio_copy cp = { .dst = remote, .src = local, .len = len, .mode = 0 };
		long r = ioctl(uffd, UFFDIO_COPY, &cp);
		uint64_t done = cp.copy > 0 ? (uint64_t)cp.copy : 0;
		if (r == 0 && done == len)
			return 0;
		if (r < 0 && errno != EAGAIN && errno != EEXIST)
			return -errno;
		local += done;
		remote += done;
		len -= done;
		if (r < 0 && errno == EEXIST)
			return pvw_add(b, local, remote, len);
	}
	return 0;
}

/* Write the n (page, frame) pairs of one step into the range at remote_base (npages pages).
 * uffd < 0: everything by process_vm_writev.  Returns the pages written, or -errno
 * (-ERANGE: a page or frame out of bounds, nothing written for it); *overwritten: how many
 * of them went by process_vm_writev. */
long cow_fill_pages(int pid, int uffd, uint64_t spool, const uint64_t *offsets, uint64_t nframes,
		    const uint32_t *pairs, long n, uint64_t remote_base, uint8_t *present, uint64_t npages,
		    long page, uint64_t *overwritten)
{
	struct pvw_batch b; /* 32 KiB: on the stack, as two threads may fill at once */
	uint64_t run_local = 0, run_remote = 0, run_len = 0;
	long e = 0;

	b.pid = pid;
	b.n = 0;
	b.bytes = 0;
	for (long i = 0; i < n; i++) {
		uint32_t pg = pairs[2 * i], frame = pairs[2 * i + 1];
		if (pg >= npages || frame == 0 || frame >= nframes)
			return -ERANGE;
		uint64_t local = spool + offsets[frame], remote = remote_base + (uint64_t)pg * page;
		if (uffd >= 0 && !present[pg]) {
			if (run_len && run_local + run_len == local && run_remote + run_len == remote) {
				run_len += page;
			} else {
				if (run_len && (e = uffd_copy(uffd, &b, run_local, run_remote, run_len)))
					return e;
				run_local = local;
				run_remote = remote;
				run_len = page;
			}
		} else if ((e = pvw_add(&b, local, remote, page))) {
			return e;
		}
		present[pg] = 1;
	}
	if (run_len && (e = uffd_copy(uffd, &b, run_local, run_remote, run_len)))
		return e;
	if ((e = pvw_flush(&b)))
		return e;
	*overwritten = b.bytes / page;
	return n;
}

/* Runs of at least min_pages consecutive pages in this step that the target may have
 * (present[] set): the caller drops them first (MADV_DONTNEED in the target) so that they
 * are filled like new pages, without the copy-on-write copy of the old content that an
 * overwrite makes.  Writes [first page, count] pairs to out (max pairs); returns how many. */
long cow_present_runs(const uint32_t *pairs, long n, const uint8_t *present, uint64_t npages, long min_pages,
		      uint64_t *out, long max)
{
	long found = 0;
	uint64_t first = 0, count = 0;
	for (long i = 0; i <= n; i++) {
		int more = i < n && pairs[2 * i] < npages && present[pairs[2 * i]];
		if (more && count && pairs[2 * i] == first + count) {
			count++;
			continue;
		}
		if (count >= (uint64_t)min_pages && found < max) {
			out[2 * found] = first;
			out[2 * found + 1] = count;
			found++;
		}
		count = 0;
		if (more) {
			first = pairs[2 * i];
			count = 1;
		}
	}
	return found;
}
