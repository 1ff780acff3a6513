/* The segment table of a device: the pure part of request routing. A device is
 * a list of segments [start, start + len) each mapped onto a map at moff: a map
 * is one segment, a linear LV several (on several maps), and a snapshot will be
 * the same machinery with a copy-on-write segment type. */
#define _GNU_SOURCE
#include <stddef.h>

#include "engine.h"

/* The spans of [off, off + len) in segment order; -1 if a byte of it is in no
 * segment or more than max spans would be needed. len 0: no span. */
int seg_split(const struct seg *segs, int nsegs, uint64_t off, uint32_t len,
	      struct span *out, int max) {
	int n = 0;
	uint64_t pos = off, end = off + len;
	if (end < off)
		return -1; /* overflow */
	int lo = 0, hi = nsegs - 1, i = -1;
	while (lo <= hi) { /* the last segment starting at or before off */
		int mid = lo + (hi - lo) / 2;
		if (segs[mid].start <= off) {
			i = mid;
			lo = mid + 1;
		} else {
			hi = mid - 1;
		}
	}
	while (pos < end) {
		if (i < 0 || i >= nsegs || n >= max)
			return -1;
		const struct seg *s = &segs[i];
		if (pos < s->start || pos - s->start >= s->len)
			return -1; /* a hole */
		uint64_t take = s->start + s->len - pos;
		if (take > end - pos)
			take = end - pos;
		out[n].seg = i;
		out[n].moff = s->moff + (pos - s->start);
		out[n].len = (uint32_t)take;
		out[n].boff = (uint32_t)(pos - off);
		n++;
		pos += take;
		i++;
	}
	return n;
}

/* NULL if the table covers [0, size) exactly, in order, without overlap; else why. */
const char *seg_check(const struct seg *segs, int nsegs, uint64_t size) {
	uint64_t pos = 0;
	for (int i = 0; i < nsegs; i++) {
		if (segs[i].start != pos)
			return "segments must cover the device in order, without holes";
		if (segs[i].len == 0)
			return "an empty segment";
		if (segs[i].start + segs[i].len < segs[i].start)
			return "a segment overflows";
		if (segs[i].moff + segs[i].len < segs[i].moff)
			return "a segment's map offset overflows";
		pos += segs[i].len;
	}
	if (pos != size)
		return "segments do not add up to the device's size";
	return NULL;
}
