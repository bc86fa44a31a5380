/* Frame ids for cow-collect: pagemap entries -> dense frame ids, through one hash table of
 * page identities (PFN, or a swap entry tagged with bit 60) for the whole tree.  The same
 * loop in Python costs about a microsecond per page; this is the hot loop of collect's
 * read phase.  Bits as in stages/linux/pagemap.py. */
#include <stdint.h>
#include <stdlib.h>

#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
#define PM_FILE (1ULL << 61)
#define PM_PFN ((1ULL << 55) - 1)
#define SWAP_KEY (1ULL << 60)

struct cow_frames {
	uint64_t *keys; /* key + 1; 0 = empty slot */
	uint32_t *ids;
	unsigned long mask; /* slots - 1, slots a power of two */
	unsigned long used;
	unsigned long count; /* ids given so far */
	uint64_t *key_of; /* key_of[id]: the key + 1 of each id given (0 unused) */
	unsigned long key_of_size;
};

static unsigned long slot_of(uint64_t key, unsigned long mask)
{
	return (unsigned long)((key * 0x9E3779B97F4A7C15ULL) >> 20) & mask;
}

static int grow(struct cow_frames *t)
{
	unsigned long slots = (t->mask + 1) * 2, mask = slots - 1;
	uint64_t *keys = calloc(slots, sizeof *keys);
	uint32_t *ids = malloc(slots * sizeof *ids);
	if (!keys || !ids) {
		free(keys);
		free(ids);
		return -1;
	}
	for (unsigned long i = 0; i <= t->mask; i++) {
		if (!t->keys[i])
			continue;
		unsigned long s = slot_of(t->keys[i], mask);
		while (keys[s])
			s = (s + 1) & mask;
		keys[s] = t->keys[i];
		ids[s] = t->ids[i];
	}
	free(t->keys);
	free(t->ids);
	t->keys = keys;
	t->ids = ids;
	t->mask = mask;
	return 0;
}

void cow_frames_free(struct cow_frames *t)
{
	if (!t)
		return;
	free(t->keys);
	free(t->ids);
	free(t->key_of);
	free(t);
}

static int remember_key(struct cow_frames *t, unsigned long id, uint64_t k)
{
	if (id >= t->key_of_size) {
		unsigned long size = t->key_of_size ? t->key_of_size * 2 : 1UL << 16;
		uint64_t *bigger = realloc(t->key_of, size * sizeof *bigger);
		if (!bigger)
			return -1;
		t->key_of = bigger;
		t->key_of_size = size;
	}
	t->key_of[id] = k;
	return 0;
}

struct cow_frames *cow_frames_new(void)
{
	struct cow_frames *t = calloc(1, sizeof *t);
	if (!t)
		return NULL;
	t->mask = (1UL << 16) - 1;
	t->keys = calloc(t->mask + 1, sizeof *t->keys);
	t->ids = malloc((t->mask + 1) * sizeof *t->ids);
	if (!t->keys || !t->ids) {
		cow_frames_free(t);
		return NULL;
	}
	return t;
}

unsigned long cow_frames_count(const struct cow_frames *t)
{
	return t->count;
}

long cow_frames_assign(struct cow_frames *t, const uint64_t *entries, unsigned long n, uint64_t zero_pfn,
		       int file_backed, uint32_t *frames, uint32_t *runs, unsigned long *nruns)
{
	long present = 0;
	unsigned long r = 0, run_next = (unsigned long)-1;
	uint32_t last = 0; /* the id of the last present page */
	for (unsigned long i = 0; i < n; i++) {
		uint64_t e = entries[i], key;
		frames[i] = 0;
		if (e & PM_PRESENT) {
			if (file_backed && (e & PM_FILE))
				continue; /* unmodified file page: the file gives it back */
			key = e & PM_PFN;
			if (key == zero_pfn)
				continue;
		} else if (e & PM_SWAPPED) {
			key = SWAP_KEY | (e & PM_PFN);
		} else {
			continue;
		}
		uint64_t k = key + 1;
		/* a forked child maps its parent's frames in its parent's order: the frame after
		 * the last one seen is most often the next page's, found without a hash probe (a
		 * cache miss in a table of megabytes) */
		if (last && last < t->count && t->key_of[last + 1] == k) {
			frames[i] = ++last;
			present++;
			continue;
		}
		if ((t->used + 1) * 2 > t->mask + 1 && grow(t) < 0)
			return -1;
		unsigned long s = slot_of(k, t->mask);
		while (t->keys[s] && t->keys[s] != k)
			s = (s + 1) & t->mask;
		if (!t->keys[s]) {
			if (remember_key(t, t->count + 1, k) < 0)
				return -1;
			t->keys[s] = k;
			t->ids[s] = (uint32_t)++t->count;
			t->used++;
			/* new ids at adjacent pages form runs: read later with one pread each */
			if (i == run_next) {
				runs[2 * r - 1]++;
			} else {
				runs[2 * r] = (uint32_t)i;
				runs[2 * r + 1] = 1;
				r++;
			}
			run_next = i + 1;
		}
		frames[i] = last = t->ids[s];
		present++;
	}
	*nruns = r;
	return present;
}
