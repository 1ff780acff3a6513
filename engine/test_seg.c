/* Unit test of the segment table (seg.c): requests that cross segment
 * boundaries are split at them, in order, each span on its map at its offset;
 * holes, overflows and tables that do not cover the device are refused. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

static int failures;
#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #c); failures++; } } while (0)

static struct seg S(uint64_t start, uint64_t len, uint64_t moff, const char *map) {
	struct seg s = { .start = start, .len = len, .moff = moff };
	snprintf(s.map_id, sizeof s.map_id, "%s", map);
	return s;
}

int main(void) {
	/* an LV: 4 MiB on map A at 8 MiB, 2 MiB on map B at 0, 4 MiB on A at 1 MiB */
	const uint64_t M = 1 << 20;
	struct seg t[] = { S(0, 4 * M, 8 * M, "A"), S(4 * M, 2 * M, 0, "B"), S(6 * M, 4 * M, M, "A") };
	struct span sp[8];
	CHECK(seg_check(t, 3, 10 * M) == NULL);
	CHECK(seg_check(t, 3, 11 * M) != NULL); /* does not add up */
	struct seg gap[] = { S(0, M, 0, "A"), S(2 * M, M, 0, "B") };
	CHECK(seg_check(gap, 2, 3 * M) != NULL);
	struct seg empty[] = { S(0, 0, 0, "A") };
	CHECK(seg_check(empty, 1, 0) != NULL);
	struct seg wrap[] = { S(0, M, UINT64_MAX - 10, "A") };
	CHECK(seg_check(wrap, 1, M) != NULL);

	/* inside one segment: one span */
	int n = seg_split(t, 3, 4096, 8192, sp, 8);
	CHECK(n == 1 && sp[0].seg == 0 && sp[0].moff == 8 * M + 4096 && sp[0].len == 8192 && sp[0].boff == 0);
	/* across the first boundary: split there */
	n = seg_split(t, 3, 4 * M - 4096, 12288, sp, 8);
	CHECK(n == 2);
	CHECK(sp[0].seg == 0 && sp[0].moff == 12 * M - 4096 && sp[0].len == 4096 && sp[0].boff == 0);
	CHECK(sp[1].seg == 1 && sp[1].moff == 0 && sp[1].len == 8192 && sp[1].boff == 4096);
	/* across all three */
	n = seg_split(t, 3, 3 * M, 4 * M, sp, 8);
	CHECK(n == 3);
	CHECK(sp[0].seg == 0 && sp[0].len == M && sp[0].moff == 11 * M && sp[0].boff == 0);
	CHECK(sp[1].seg == 1 && sp[1].len == 2 * M && sp[1].moff == 0 && sp[1].boff == M);
	CHECK(sp[2].seg == 2 && sp[2].len == M && sp[2].moff == M && sp[2].boff == 3 * M);
	/* exactly on a boundary: no empty span */
	n = seg_split(t, 3, 4 * M, 2 * M, sp, 8);
	CHECK(n == 1 && sp[0].seg == 1 && sp[0].moff == 0 && sp[0].len == 2 * M);
	/* the last byte; one past the end; overflow; too many spans */
	n = seg_split(t, 3, 10 * M - 1, 1, sp, 8);
	CHECK(n == 1 && sp[0].seg == 2 && sp[0].moff == 5 * M - 1);
	CHECK(seg_split(t, 3, 10 * M - 1, 2, sp, 8) == -1);
	CHECK(seg_split(t, 3, UINT64_MAX - 1, 4096, sp, 8) == -1);
	CHECK(seg_split(t, 3, 0, 10 * M, sp, 2) == -1);
	CHECK(seg_split(t, 3, 0, 0, sp, 8) == 0);
	/* spans of a split cover the request exactly, in order (every offset, 1 KiB) */
	for (uint64_t off = 0; off < 10 * M; off += 1021 * 97) {
		for (uint32_t len = 1; off + len <= 10 * M && len < 3 * M; len = len * 3 + 511) {
			n = seg_split(t, 3, off, len, sp, 8);
			uint32_t sum = 0;
			for (int i = 0; i < n; i++) {
				CHECK(sp[i].boff == sum);
				sum += sp[i].len;
			}
			CHECK(n > 0 && sum == len);
		}
	}
	if (failures)
		return 1;
	printf("test-seg: 1 passed, 0 failed\n");
	return 0;
}
