/* A u64 -> u64 hash table (open addressing, linear probing, deletion by backward
 * shift): a store's exceptions (origin chunk -> COW chunk), its copies in progress
 * and its tracked reads. UINT64_MAX is never a key (chunk numbers are far below). */
#define _GNU_SOURCE
#include <stdlib.h>

#include "engine.h"

#define EMPTY UINT64_MAX

static uint32_t slot(uint64_t key, uint32_t cap) {
	key ^= key >> 33;
	key *= 0xff51afd7ed558ccdULL;
	key ^= key >> 33;
	return (uint32_t)key & (cap - 1);
}

bool hmap_get(const struct hmap *h, uint64_t key, uint64_t *val) {
	if (!h->cap)
		return false;
	for (uint32_t i = slot(key, h->cap);; i = (i + 1) & (h->cap - 1)) {
		if (h->k[i] == EMPTY)
			return false;
		if (h->k[i] == key) {
			if (val)
				*val = h->v[i];
			return true;
		}
	}
}

static int grow(struct hmap *h) {
	uint32_t cap = h->cap ? h->cap * 2 : 64;
	uint64_t *k = malloc(cap * sizeof *k), *v = malloc(cap * sizeof *v);
	if (!k || !v) {
		free(k);
		free(v);
		return -1;
	}
	for (uint32_t i = 0; i < cap; i++)
		k[i] = EMPTY;
	for (uint32_t i = 0; i < h->cap; i++) {
		if (h->k[i] == EMPTY)
			continue;
		uint32_t j = slot(h->k[i], cap);
		while (k[j] != EMPTY)
			j = (j + 1) & (cap - 1);
		k[j] = h->k[i];
		v[j] = h->v[i];
	}
	free(h->k);
	free(h->v);
	h->k = k;
	h->v = v;
	h->cap = cap;
	return 0;
}

int hmap_put(struct hmap *h, uint64_t key, uint64_t val) {
	if ((h->n + 1) * 4 > h->cap * 3 && grow(h))
		return -1;
	uint32_t i = slot(key, h->cap);
	while (h->k[i] != EMPTY && h->k[i] != key)
		i = (i + 1) & (h->cap - 1);
	if (h->k[i] == EMPTY)
		h->n++;
	h->k[i] = key;
	h->v[i] = val;
	return 0;
}

void hmap_del(struct hmap *h, uint64_t key) {
	if (!h->cap)
		return;
	uint32_t i = slot(key, h->cap), mask = h->cap - 1;
	while (h->k[i] != key) {
		if (h->k[i] == EMPTY)
			return;
		i = (i + 1) & mask;
	}
	h->n--;
	for (uint32_t j = (i + 1) & mask; h->k[j] != EMPTY; j = (j + 1) & mask) {
		uint32_t home = slot(h->k[j], h->cap);
		/* move j back into the hole at i if its home is not in (i, j] */
		if (((j - home) & mask) >= ((j - i) & mask)) {
			h->k[i] = h->k[j];
			h->v[i] = h->v[j];
			i = j;
		}
	}
	h->k[i] = EMPTY;
}

void hmap_free(struct hmap *h) {
	free(h->k);
	free(h->v);
	h->k = h->v = NULL;
	h->cap = h->n = 0;
}
