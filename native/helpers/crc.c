/* CRC-32 (zlib's: reflected 0xEDB88320, inverted in and out) of every page of a buffer, with
 * PCLMULQDQ folding: several times faster than zlib's table code, and called without the GIL.
 * Folding keeps the data's remainder modulo the CRC polynomial in 128 bits (four lanes of
 * 128 bits while 64 bytes at a time go in); the last 16 bytes then go through the table.
 * Fold constants: x^(512+32), x^(512-32), x^(128+32), x^(128-32) mod P, bit-reflected and
 * shifted left by one (the reflected carry-less product is one bit short). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __x86_64__
#include <immintrin.h>
#endif

#define POLY 0xEDB88320u
#define PAGE 4096

static uint32_t table[256];
/* shift[k][b]: the crc register after b << 8k went through PAGE more bytes of zeros, so that
 * crc32(A + B) = shift(crc32(A)) ^ crc32(B) for a page B (zlib's crc32_combine, fixed length) */
static uint32_t shift[4][256];
static int have_clmul;

static uint32_t raw_bytes(uint32_t crc, const uint8_t *p, size_t n)
{
	while (n--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

static uint32_t shift_page(uint32_t crc)
{
	return shift[0][crc & 0xff] ^ shift[1][(crc >> 8) & 0xff] ^ shift[2][(crc >> 16) & 0xff] ^
	       shift[3][crc >> 24];
}

__attribute__((constructor)) static void init(void)
{
	static const uint8_t zeros[PAGE];
	for (uint32_t b = 0; b < 256; b++) {
		uint32_t c = b;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (c & 1 ? POLY : 0);
		table[b] = c;
	}
	/* raw (uninverted) register arithmetic is linear: build each table from its 8 bits */
	for (int k = 0; k < 4; k++) {
		uint32_t basis[8];
		for (int bit = 0; bit < 8; bit++)
			basis[bit] = raw_bytes(1u << (8 * k + bit), zeros, PAGE);
		for (uint32_t b = 0; b < 256; b++) {
			uint32_t v = 0;
			for (int bit = 0; bit < 8; bit++)
				if (b & (1u << bit))
					v ^= basis[bit];
			shift[k][b] = v;
		}
	}
#ifdef __x86_64__
	__builtin_cpu_init();
	have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
}

#ifdef __x86_64__
__attribute__((target("pclmul,sse4.1"))) static inline __m128i fold(__m128i x, __m128i k, __m128i data)
{
	__m128i lo = _mm_clmulepi64_si128(x, k, 0x00), hi = _mm_clmulepi64_si128(x, k, 0x11);
	return _mm_xor_si128(_mm_xor_si128(lo, hi), data);
}

/* the raw crc (register 0 in, not inverted out) of n bytes, n a multiple of 64, n >= 64;
 * ``first`` is xor-ed into the first 4 bytes */
__attribute__((target("pclmul,sse4.1"))) static uint32_t raw_clmul(const uint8_t *p, size_t n, uint32_t first)
{
	const __m128i k512 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
	const __m128i k128 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
	__m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)first));
	__m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
	__m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
	__m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
	for (p += 64, n -= 64; n; p += 64, n -= 64) {
		x0 = fold(x0, k512, _mm_loadu_si128((const __m128i *)p));
		x1 = fold(x1, k512, _mm_loadu_si128((const __m128i *)(p + 16)));
		x2 = fold(x2, k512, _mm_loadu_si128((const __m128i *)(p + 32)));
		x3 = fold(x3, k512, _mm_loadu_si128((const __m128i *)(p + 48)));
	}
	x1 = fold(x0, k128, x1);
	x2 = fold(x1, k128, x2);
	x3 = fold(x2, k128, x3);
	uint8_t last[16];
	_mm_storeu_si128((__m128i *)last, x3);
	return raw_bytes(0, last, 16);
}
#endif

static uint32_t crc_page(const uint8_t *p)
{
#ifdef __x86_64__
	if (have_clmul)
		return ~raw_clmul(p, PAGE, 0xffffffffu);
#endif
	return ~raw_bytes(0xffffffffu, p, PAGE);
}

/* zlib's crc32(crc, buf, n) of any length: the stream envelope's checksum of a record */
uint32_t cow_crc32(uint32_t crc, const void *buf, unsigned long n)
{
	const uint8_t *p = buf;
	uint32_t reg = ~crc;
#ifdef __x86_64__
	if (have_clmul && n >= 64) {
		unsigned long whole = n & ~63ul;
		reg = raw_clmul(p, whole, reg); /* a starting register is the same as xor-ing it into the first bytes */
		p += whole;
		n -= whole;
	}
#endif
	return ~raw_bytes(reg, p, n);
}

uint32_t cow_crc32_pages(const void *buf, unsigned long npages, uint32_t *crcs)
{
	const uint8_t *p = buf;
	uint32_t all = 0;
	for (unsigned long i = 0; i < npages; i++) {
		crcs[i] = crc_page(p + i * PAGE);
		all = shift_page(all) ^ crcs[i];
	}
	return all;
}

uint32_t cow_crc32_combine_pages(const uint32_t *crcs, unsigned long n)
{
	uint32_t all = 0;
	for (unsigned long i = 0; i < n; i++)
		all = shift_page(all) ^ crcs[i];
	return all;
}

/* The crc index of cow-collect's equal-page search: crc -> the first frame id seen with it
 * (open addressing; an id is never 0, so 0 marks a free slot). */
struct cow_crc_index {
	uint32_t *crcs, *ids;
	unsigned long mask, used;
};

void cow_crc_index_free(struct cow_crc_index *t)
{
	if (!t)
		return;
	free(t->crcs);
	free(t->ids);
	free(t);
}

static int index_alloc(struct cow_crc_index *t, unsigned long slots)
{
	t->crcs = malloc(slots * sizeof *t->crcs);
	t->ids = calloc(slots, sizeof *t->ids);
	t->mask = slots - 1;
	return t->crcs && t->ids ? 0 : -1;
}

static unsigned long index_slot(uint32_t crc, unsigned long mask)
{
	return (unsigned long)(((uint64_t)crc * 0x9E3779B97F4A7C15ULL) >> 24) & mask;
}

/* expected: how many crcs will be added (at most): slots for all at the load factor that
 * index_grow keeps, so that no growth rehashes the table on the way (at a million pages,
 * the rehashes of the doublings from 2^16 slots cost cow-collect's writer ~0.1 s) */
struct cow_crc_index *cow_crc_index_new(unsigned long expected)
{
	unsigned long slots = 1UL << 16;
	while (slots < 2 * expected + 2 && slots < (1UL << 33))
		slots *= 2;
	struct cow_crc_index *t = calloc(1, sizeof *t);
	if (!t || index_alloc(t, slots) < 0) {
		cow_crc_index_free(t);
		return NULL;
	}
	return t;
}

static int index_grow(struct cow_crc_index *t)
{
	struct cow_crc_index bigger = { 0 };
	if (index_alloc(&bigger, (t->mask + 1) * 2) < 0) {
		free(bigger.crcs);
		free(bigger.ids);
		return -1;
	}
	for (unsigned long i = 0; i <= t->mask; i++) {
		if (!t->ids[i])
			continue;
		unsigned long s = index_slot(t->crcs[i], bigger.mask);
		while (bigger.ids[s])
			s = (s + 1) & bigger.mask;
		bigger.crcs[s] = t->crcs[i];
		bigger.ids[s] = t->ids[i];
	}
	free(t->crcs);
	free(t->ids);
	t->crcs = bigger.crcs;
	t->ids = bigger.ids;
	t->mask = bigger.mask;
	return 0;
}

long cow_crc_index_add(struct cow_crc_index *t, const uint32_t *crcs, unsigned long n, uint32_t first,
		       uint32_t *earlier)
{
	long found = 0;
	for (unsigned long i = 0; i < n; i++) {
		if ((t->used + 1) * 2 > t->mask + 1 && index_grow(t) < 0)
			return -1;
		unsigned long s = index_slot(crcs[i], t->mask);
		while (t->ids[s] && t->crcs[s] != crcs[i])
			s = (s + 1) & t->mask;
		if (t->ids[s]) {
			earlier[i] = t->ids[s];
			found++;
		} else {
			t->crcs[s] = crcs[i];
			t->ids[s] = first + (uint32_t)i;
			t->used++;
			earlier[i] = 0;
		}
	}
	return found;
}
