/* A snapshot's exception store, in the layout of the kernel's dm-snapshot persistent
 * store (drivers/md/dm-snap-persistent.c; src/sanvisor/storage/lvm/cowstore.py is
 * the Python reference of the same format). The COW LV is cut in chunks:
 *
 *   chunk 0        header: "SnAp" 0x70416e53, valid, version 1, chunk size in sectors
 *   chunk 1        area 0: chunk/16 exceptions {old_chunk, new_chunk} (u64 LE),
 *                  the list ends at the first new_chunk 0
 *   chunks 2..E+1  the data chunks of area 0; then area 1 and its data; ...
 *
 * Loaded from disk when defined (the engine reads the areas itself); a copy is the
 * origin's chunk read, then written to the next free data chunk (copy.c: adjacent
 * chunks together), then named in its area, written whole (a FLUSH, then FUA; no FLUSH
 * when every copy of the batch was written with FUA) once no other area write is in
 * flight: copies that finish meanwhile go in the next write together. An area that fills makes
 * the next one zeroed first. Only then are the writes waiting for the copy let
 * through. A store that cannot take a chunk, or whose I/O fails, is invalidated as
 * dm-snapshot does: its header's valid becomes 0, its snapshot's I/O fails, its
 * origin goes on without it. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "nbd.h"
#include "sb.h"

#define SNAP_MAGIC 0x70416e53u
#define EXC_SIZE 16

list_t all_stores = { &all_stores, &all_stores };
static void load_header(void *ctx, struct req *r, uint32_t err);
static void load_area(void *ctx, struct req *r, uint32_t err);
static void parse_area(struct store *st, const struct req *r);

static uint64_t per_area(const struct store *st) { return st->chunk / EXC_SIZE; }
static uint64_t area_chunk(const struct store *st, uint64_t a) { return 1 + (per_area(st) + 1) * a; }
uint64_t store_cow_offset(const struct store *st, uint64_t c) { return c * st->chunk; }

static void put_le32(uint8_t *p, uint32_t v) {
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static void put_le64(uint8_t *p, uint64_t v) {
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t le32(const uint8_t *p) {
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

void store_skip_metadata(struct store *st) {
	if (st->next_free % (per_area(st) + 1) == 1)
		st->next_free++;
}

struct store *store_find(const char *id) {
	list_for(pos, &all_stores) {
		struct store *st = container_of(pos, struct store, link);
		if (!strcmp(st->id, id))
			return st;
	}
	return NULL;
}

void store_put(struct store *st) {
	if (!st->gone || st->inflight)
		return;
	free(st->cow);
	free(st->org);
	free(st->abuf);
	hmap_free(&st->exc);
	hmap_free(&st->pend);
	hmap_free(&st->track);
	free(st);
}

/* An I/O of the store on its COW LV. Metadata writes are FUA (an area is durable
 * before the origin is overwritten); a copy's data is written plainly and made
 * durable by the FLUSH that precedes the area write naming it (dm-snapshot's
 * commit: data, then a flush, then the area with FUA). */
static void cow_io_f(struct store *st, uint16_t cmd, uint16_t flags, uint64_t off, uint32_t len,
		     const void *data, io_cb *cb, void *ctx) {
	struct req *r = io_new(cmd, flags, off, len);
	if (!r) {
		store_invalidate(st, "out of memory");
		return;
	}
	if (data)
		memcpy(r->buf, data, len);
	st->inflight++;
	io_submit(st->cow, st->ncow, r, cb, ctx);
}

static void cow_io(struct store *st, uint16_t cmd, uint64_t off, uint32_t len, const void *data,
		   io_cb *cb, void *ctx) {
	cow_io_f(st, cmd, cmd == NBD_CMD_WRITE ? NBD_CMD_FLAG_FUA : 0, off, len, data, cb, ctx);
}

static void header(const struct store *st, uint8_t *h, bool valid) {
	memset(h, 0, st->chunk);
	put_le32(h, SNAP_MAGIC);
	put_le32(h + 4, valid ? 1 : 0);
	put_le32(h + 8, 1);
	put_le32(h + 12, st->chunk / 512);
}

static void ready(struct store *st) {
	st->state = S_READY;
	if (st->next_free < 2)
		st->next_free = 2;
	store_skip_metadata(st);
	logmsg("info", "store %s: %u exception(s), chunk %u KiB", st->id, st->exc.n,
	       st->chunk >> 10);
	wake_all(&st->loadw);
}

/* The end of one of the store's I/Os: an error invalidates it. Whether it goes on.
 * Every callback ends with store_put() (a deleted store goes with its last I/O). */
bool store_io_end(struct store *st, uint32_t err, const char *what) {
	st->inflight--;
	if (err && st->state != S_INVALID) {
		char why[96];
		snprintf(why, sizeof why, "I/O error %s", what);
		store_invalidate(st, why);
	}
	return st->state != S_INVALID;
}

/* ---- loading --------------------------------------------------------------------- */
static void new_store_done(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	(void)r;
	if (store_io_end(st, err, "writing a new store's header"))
		ready(st);
	store_put(st);
}

static void new_area_done(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	(void)r;
	uint8_t *h = NULL;
	if (store_io_end(st, err, "zeroing a new store's first area") && !(h = calloc(1, st->chunk)))
		store_invalidate(st, "out of memory");
	if (h) {
		header(st, h, true);
		cow_io(st, NBD_CMD_WRITE, 0, st->chunk, h, new_store_done, st);
		free(h);
	}
	store_put(st);
}

static void load_header(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	if (!store_io_end(st, err, "reading the store's header")) {
		store_put(st);
		return;
	}
	uint32_t magic = le32(r->buf), valid = le32(r->buf + 4), version = le32(r->buf + 8);
	uint32_t sectors = le32(r->buf + 12);
	if (magic == 0) { /* never used: made new, as the kernel does (area 0 first) */
		cow_io(st, NBD_CMD_WRITE, area_chunk(st, 0) * st->chunk, st->chunk, st->abuf,
		       new_area_done, st);
		return;
	}
	if (magic != SNAP_MAGIC)
		store_invalidate(st, "not an exception store (bad magic)");
	else if (!valid)
		store_invalidate(st, "invalidated (it filled up, or an I/O failed)");
	else if (version != 1)
		store_invalidate(st, "an exception store of an unknown version");
	else if ((uint64_t)sectors * 512 != st->chunk)
		store_invalidate(st, "its header's chunk size is not the metadata's");
	else
		cow_io(st, NBD_CMD_READ, area_chunk(st, 0) * st->chunk, st->chunk, NULL, load_area, st);
	store_put(st);
}

static void load_area(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	if (store_io_end(st, err, "reading an area of the store"))
		parse_area(st, r);
	store_put(st);
}

static void parse_area(struct store *st, const struct req *r) {
	uint64_t n = per_area(st), chunks = st->size / st->chunk;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t old = le64(r->buf + i * EXC_SIZE), nc = le64(r->buf + i * EXC_SIZE + 8);
		if (!nc) {
			st->area = st->load_area;
			st->used = (uint32_t)i;
			memcpy(st->abuf, r->buf, st->chunk);
			ready(st);
			return;
		}
		if (nc < 2 || nc >= chunks || old >= (st->osize + st->chunk - 1) / st->chunk) {
			store_invalidate(st, "an exception out of range (a damaged store)");
			return;
		}
		if (hmap_put(&st->exc, old, nc)) {
			store_invalidate(st, "out of memory");
			return;
		}
		if (nc + 1 > st->next_free)
			st->next_free = nc + 1;
	}
	st->load_area++; /* full: on to the next area, if the store has room for one */
	uint64_t at = area_chunk(st, st->load_area) * st->chunk;
	if (at + st->chunk > st->size) {
		st->area = st->load_area;
		st->used = 0;
		memset(st->abuf, 0, st->chunk);
		st->zeroed_next = true;
		ready(st); /* full: its next copy invalidates it */
		return;
	}
	cow_io(st, NBD_CMD_READ, at, st->chunk, NULL, load_area, st);
}

/* ---- definition ------------------------------------------------------------------ */
static bool same_segs(const struct seg *a, int na, const struct seg *b, int nb, bool grow) {
	if (grow ? nb < na : nb != na)
		return false;
	for (int i = 0; i < na; i++) {
		bool last = i == na - 1;
		if (a[i].start != b[i].start || a[i].moff != b[i].moff || strcmp(a[i].map_id, b[i].map_id)
		    || (grow && last ? b[i].len < a[i].len : b[i].len != a[i].len))
			return false;
	}
	return true;
}

/* Define a store, or grow an existing one's COW LV (lvextend of a snapshot). */
const char *store_set(const char *id, uint64_t size, uint32_t chunk, struct seg *cow, int ncow,
		      struct seg *org, int norg) {
	uint64_t osize = 0;
	for (int i = 0; i < norg; i++)
		osize += org[i].len;
	if (chunk < 4096 || chunk > (512u << 10) || (chunk & (chunk - 1)))
		return "store: chunk= must be a power of 2 from 4096 to 524288";
	const char *why = seg_check(cow, ncow, size);
	if (why || !norg || seg_check(org, norg, osize))
		return "store: cow= and org= must each cover their LV in order, without holes";
	if (size < 3ull * chunk)
		return "store: too small for a header, an area and a chunk";
	struct store *st = store_find(id);
	if (st) {
		if (st->chunk != chunk || !same_segs(st->org, st->norg, org, norg, false) ||
		    !same_segs(st->cow, st->ncow, cow, ncow, true))
			return "store: another store under this id (del-store it first)";
		struct seg *c = malloc((size_t)ncow * sizeof *c);
		if (!c)
			return "out of memory";
		memcpy(c, cow, (size_t)ncow * sizeof *c);
		free(st->cow);
		st->cow = c;
		st->ncow = ncow;
		st->size = size;
		st->seen = true;
		store_relink();
		return NULL;
	}
	st = calloc(1, sizeof *st);
	if (!st || !(st->abuf = calloc(1, chunk)) || !(st->cow = malloc((size_t)ncow * sizeof *cow))
	    || !(st->org = malloc((size_t)norg * sizeof *org))) {
		if (st) {
			free(st->abuf);
			free(st->cow);
		}
		free(st);
		return "out of memory";
	}
	snprintf(st->id, sizeof st->id, "%s", id);
	memcpy(st->cow, cow, (size_t)ncow * sizeof *cow);
	memcpy(st->org, org, (size_t)norg * sizeof *org);
	st->ncow = ncow;
	st->norg = norg;
	st->size = size;
	st->osize = osize;
	st->chunk = chunk;
	st->state = S_LOADING;
	st->seen = true;
	list_init(&st->ready);
	list_init(&st->runs);
	list_init(&st->copied);
	list_init(&st->klink);
	list_init(&st->batch);
	list_init(&st->loadw);
	list_init(&st->trackw);
	list_add_tail(&all_stores, &st->link);
	store_relink();
	cow_io(st, NBD_CMD_READ, 0, 512, NULL, load_header, st);
	return NULL;
}

void store_relink(void) {
	list_for(pos, &all_stores) {
		struct store *st = container_of(pos, struct store, link);
		for (int i = 0; i < st->ncow; i++)
			st->cow[i].map = map_find(st->cow[i].map_id);
		for (int i = 0; i < st->norg; i++)
			st->org[i].map = map_find(st->org[i].map_id);
	}
}

static void drop_pends(struct store *st) {
	for (uint32_t i = 0; i < st->pend.cap; i++) {
		if (st->pend.k[i] == UINT64_MAX)
			continue;
		struct pend *p = (struct pend *)(uintptr_t)st->pend.v[i];
		p->dead = true; /* freed by its I/O's end (a copy, or the area write) */
		wake_all(&p->waiters);
	}
	hmap_free(&st->pend);
	st->npend = 0;
	while (!list_empty(&st->ready)) { /* copied, not yet named in an area: forgotten */
		struct pend *p = list_first(&st->ready, struct pend, link);
		list_del(&p->link);
		free(p);
	}
	copies_drop(st); /* gathered, not yet sent: forgotten */
	wake_all(&st->loadw);
	wake_all(&st->trackw);
}

static void invalid_written(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	(void)r;
	(void)err; /* invalid in memory either way */
	st->inflight--;
	store_put(st);
}

void store_invalidate(struct store *st, const char *why) {
	if (st->state == S_INVALID)
		return;
	st->state = S_INVALID;
	snprintf(st->why, sizeof st->why, "%s", why);
	logmsg("warning", "snapshot store %s invalidated: %s (its origin is unharmed)", st->id, why);
	char ev[400], idj[300];
	json_str(idj, sizeof idj, st->id);
	snprintf(ev, sizeof ev, "{\"ev\":\"store\",\"id\":%s,\"valid\":false}", idj);
	emit(ev);
	if (!st->gone) { /* as dm-snapshot: the header says so, the kernel would agree */
		uint8_t *h = calloc(1, st->chunk);
		if (h) {
			header(st, h, false);
			cow_io(st, NBD_CMD_WRITE, 0, st->chunk, h, invalid_written, st);
			free(h);
		}
	}
	drop_pends(st);
}

void store_del(struct store *st) {
	st->gone = true;
	st->state = S_INVALID;
	drop_pends(st);
	list_for(pos, &all_devs) {
		struct dev *d = container_of(pos, struct dev, link);
		for (int i = 0; i < d->ncows; i++)
			if (d->cows[i] == st) {
				memmove(d->cows + i, d->cows + i + 1, (size_t)(d->ncows - i - 1) * sizeof *d->cows);
				d->ncows--;
				break;
			}
		if (d->snap == st) {
			d->snap = NULL;
			d->snap_gone = true;
		}
	}
	list_del(&st->link);
	store_put(st);
}

/* ---- copies ---------------------------------------------------------------------- */
static void area_done(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	(void)r;
	st->meta_busy = false;
	bool ok = store_io_end(st, err, "writing an area of the store");
	while (!list_empty(&st->batch)) {
		struct pend *p = list_first(&st->batch, struct pend, link);
		list_del(&p->link);
		if (ok && hmap_put(&st->exc, p->chunk, p->new_chunk)) {
			store_invalidate(st, "out of memory");
			ok = false;
		}
		if (ok) {
			hmap_del(&st->pend, p->chunk);
			st->npend--;
			st->copies++;
			wake_all(&p->waiters);
		}
		free(p); /* dead or named: nobody else holds it */
	}
	if (ok) {
		if (st->used == per_area(st)) {
			st->area++;
			st->used = 0;
			memset(st->abuf, 0, st->chunk);
			st->zeroed_next = false;
		}
		store_kick(st); /* the copies written meanwhile: committed together */
	}
	store_put(st);
}

static void drop_batch(struct store *st) {
	st->meta_busy = false;
	while (!list_empty(&st->batch)) {
		struct pend *p = list_first(&st->batch, struct pend, link);
		list_del(&p->link);
		free(p);
	}
}

static void area_flushed(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	(void)r;
	if (store_io_end(st, err, "flushing the store's copies"))
		cow_io(st, NBD_CMD_WRITE, area_chunk(st, st->area) * st->chunk, st->chunk, st->abuf,
		       area_done, st);
	else
		drop_batch(st);
	store_put(st);
}

/* The batch's copies made durable (one FLUSH for all, unless each was written with
 * FUA), then the area naming them. */
static void write_area(struct store *st) {
	st->commits++;
	if (st->batch_durable)
		cow_io(st, NBD_CMD_WRITE, area_chunk(st, st->area) * st->chunk, st->chunk, st->abuf,
		       area_done, st);
	else
		cow_io_f(st, NBD_CMD_FLUSH, 0, 0, 0, NULL, area_flushed, st);
}

static void zero_done(void *ctx, struct req *r, uint32_t err) {
	struct store *st = ctx;
	(void)r;
	if (store_io_end(st, err, "zeroing the store's next area")) {
		st->zeroed_next = true;
		write_area(st);
	} else {
		drop_batch(st);
	}
	store_put(st);
}

/* Name the copies done so far in the current area (one write in flight at a time). */
void store_commit(struct store *st) {
	if (st->meta_busy || st->state != S_READY || list_empty(&st->ready))
		return;
	uint64_t room = per_area(st) - st->used;
	st->batch_durable = true;
	while (room-- && !list_empty(&st->ready)) {
		struct pend *p = list_first(&st->ready, struct pend, link);
		list_del(&p->link);
		st->batch_durable = st->batch_durable && p->durable;
		put_le64(st->abuf + st->used * EXC_SIZE, p->chunk);
		put_le64(st->abuf + st->used * EXC_SIZE + 8, p->new_chunk);
		st->used++;
		list_add_tail(&st->batch, &p->link);
	}
	st->meta_busy = true;
	uint64_t next = area_chunk(st, st->area + 1) * st->chunk;
	if (st->used == per_area(st) && !st->zeroed_next && next + st->chunk <= st->size) {
		uint8_t *z = calloc(1, st->chunk); /* the next area reads as empty before this one is full */
		if (!z) {
			st->meta_busy = false;
			store_invalidate(st, "out of memory");
			return;
		}
		cow_io(st, NBD_CMD_WRITE, next, st->chunk, z, zero_done, st);
		free(z);
		return;
	}
	write_area(st);
}

void store_untrack(struct store *st, uint64_t chunk) {
	uint64_t n = 0;
	if (!hmap_get(&st->track, chunk, &n))
		return;
	if (n > 1) {
		hmap_put(&st->track, chunk, n - 1);
		return;
	}
	hmap_del(&st->track, chunk);
	wake_all(&st->trackw);
}

void store_stats(struct store *st, struct sb *o) {
	static const char *names[] = { "loading", "ready", "invalid" };
	sb_printf(o, "{\"id\":");
	sb_str(o, st->id);
	sb_printf(o, ",\"state\":\"%s\",\"valid\":%s,\"chunk\":%u,\"size\":%llu,\"exceptions\":%u,"
		  "\"next_free\":%llu,\"pending\":%d,\"copies\":%llu,\"copy_reads\":%llu,"
		  "\"copy_writes\":%llu,\"commits\":%llu,\"reason\":", names[st->state],
		  st->state == S_INVALID ? "false" : "true", st->chunk, (unsigned long long)st->size,
		  st->exc.n, (unsigned long long)st->next_free, st->npend,
		  (unsigned long long)st->copies, (unsigned long long)st->copy_reads,
		  (unsigned long long)st->copy_writes, (unsigned long long)st->commits);
	sb_str(o, st->why);
	sb_printf(o, "}");
}
