/* Copies of origin chunks into a snapshot's exception store (store.c commits them).
 *
 * A first write to an origin chunk costs an origin read, a store write and a commit
 * (FLUSH, then the area write with FUA) before the write itself may go. Done chunk
 * by chunk, a 1 MiB write over 4 KiB chunks was 256 reads and 256 writes, each a
 * round trip through the array: that, not the data, was the snapshot's penalty.
 * So the work of one loop iteration is gathered, and sent once nothing else of the
 * iteration is left (cow_flush() calls store_kicks()):
 *
 *  - the chunks that need a copy, from every request evaluated in the iteration,
 *    are cut in runs adjacent on both sides (origin chunks and store chunks, which
 *    the store hands out in order): one origin read per run;
 *  - the runs read in the iteration are written with one store write per group
 *    adjacent in the store (runs of several requests: random writes that arrived
 *    together land side by side in the store);
 *  - the copies written in the iteration are named in one commit.
 *
 * Nothing waits for a later iteration: the batches are what arrived together. The
 * commit protocol is unchanged (data; FLUSH; area with FUA; then the origin writes
 * waiting for those chunks), so no acknowledged write depends on an exception that
 * is not durable, and a copy whose commit was lost is simply not in the store. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "nbd.h"

#define MAX_RUN (8u << 20) /* bytes of one copy read or write (the array takes 32 MiB) */

struct copy { /* adjacent chunks copied together */
	list_t link; /* the store's runs (to read) or copied (to write) list */
	struct store *st;
	struct copy *next; /* the next of a write group */
	uint64_t chunk, new_chunk; /* the first; then n in a row on both sides */
	uint32_t n, cap, len; /* chunks; bytes read */
	bool fua; /* written with FUA */
	uint8_t *buf; /* the old data, once read */
	struct pend **p;
};

static list_t kicks = { &kicks, &kicks };

bool store_kicked(void) { return !list_empty(&kicks); }

void store_kick(struct store *st) {
	if (st->kicked)
		return;
	st->kicked = true;
	st->inflight++; /* kept until its kick is done */
	list_add_tail(&kicks, &st->klink);
}

/* A copy whose store was invalidated or deleted: its pends are dead (drop_pends). */
static void copy_free(struct copy *c) {
	for (uint32_t i = 0; i < c->n; i++)
		free(c->p[i]);
	free(c->p);
	free(c->buf);
	free(c);
}

static void free_list(list_t *l) {
	while (!list_empty(l)) {
		struct copy *c = list_first(l, struct copy, link);
		list_del(&c->link);
		copy_free(c);
	}
}

void copies_drop(struct store *st) {
	if (st->run) {
		copy_free(st->run);
		st->run = NULL;
	}
	free_list(&st->runs);
	free_list(&st->copied);
}

static bool run_add(struct store *st, struct pend *p) {
	struct copy *c = st->run;
	if (c && !(p->chunk == c->chunk + c->n && p->new_chunk == c->new_chunk + c->n
		   && (uint64_t)(c->n + 1) * st->chunk <= MAX_RUN)) {
		list_add_tail(&st->runs, &c->link);
		st->run = c = NULL;
	}
	if (!c) {
		if (!(c = calloc(1, sizeof *c)))
			return false;
		list_init(&c->link);
		c->st = st;
		c->chunk = p->chunk;
		c->new_chunk = p->new_chunk;
		st->run = c;
	}
	if (c->n == c->cap) {
		uint32_t cap = c->cap ? c->cap * 2 : 8;
		struct pend **np = realloc(c->p, cap * sizeof *np);
		if (!np)
			return false;
		c->p = np;
		c->cap = cap;
	}
	c->p[c->n++] = p;
	return true;
}

/* The copy of origin chunk ``chunk`` into the store: the one in progress, or a new
 * one (sent at the end of the iteration). NULL when the store cannot take it (it is
 * then invalidated). */
struct pend *store_need(struct store *st, uint64_t chunk) {
	uint64_t v;
	if (hmap_get(&st->pend, chunk, &v))
		return (struct pend *)(uintptr_t)v;
	if (st->state != S_READY)
		return NULL;
	if ((st->next_free + 1) * st->chunk > st->size) {
		store_invalidate(st, "it is full (unable to allocate an exception)");
		return NULL;
	}
	struct pend *p = calloc(1, sizeof *p);
	if (!p || hmap_put(&st->pend, chunk, (uintptr_t)p)) {
		free(p);
		store_invalidate(st, "out of memory");
		return NULL;
	}
	p->st = st;
	p->chunk = chunk;
	p->new_chunk = st->next_free;
	list_init(&p->link);
	list_init(&p->waiters);
	if (!run_add(st, p)) {
		hmap_del(&st->pend, chunk);
		free(p);
		store_invalidate(st, "out of memory");
		return NULL;
	}
	st->next_free++;
	store_skip_metadata(st);
	st->npend++;
	store_kick(st);
	return p;
}

/* ---- the old data read, then written into the store --------------------------------- */
static void copy_written(void *ctx, struct req *r, uint32_t err) {
	struct copy *c = ctx;
	struct store *st = c->st;
	(void)r;
	bool ok = store_io_end(st, err, "writing a copy into the store");
	st->copy_writes_inflight--;
	while (c) {
		struct copy *next = c->next;
		if (ok) {
			for (uint32_t i = 0; i < c->n; i++) {
				c->p[i]->durable = c->fua;
				list_add_tail(&st->ready, &c->p[i]->link);
			}
			c->n = 0; /* the pends are the store's now */
		}
		copy_free(c);
		c = next;
	}
	if (ok)
		store_kick(st); /* committed with the others of this iteration */
	store_put(st);
}

static void copy_read(void *ctx, struct req *r, uint32_t err) {
	struct copy *c = ctx;
	struct store *st = c->st;
	if (store_io_end(st, err, "reading the origin for a copy")) {
		c->buf = r->buf;
		c->len = r->len;
		r->buf = NULL;
		list_add_tail(&st->copied, &c->link);
		store_kick(st);
	} else {
		copy_free(c);
	}
	store_put(st);
}

static void read_runs(struct store *st) {
	if (st->run) {
		list_add_tail(&st->runs, &st->run->link);
		st->run = NULL;
	}
	while (!list_empty(&st->runs) && st->state == S_READY) {
		struct copy *c = list_first(&st->runs, struct copy, link);
		uint64_t at = c->chunk * st->chunk, want = (uint64_t)c->n * st->chunk;
		uint32_t len = st->osize - at < want ? (uint32_t)(st->osize - at) : (uint32_t)want;
		struct req *rd = io_new(NBD_CMD_READ, 0, at, len);
		if (!rd) {
			store_invalidate(st, "out of memory");
			return;
		}
		list_del(&c->link);
		st->inflight++;
		st->copy_reads++;
		io_submit(st->org, st->norg, rd, copy_read, c);
	}
}

static struct copy *lowest(list_t *l) {
	struct copy *best = NULL;
	list_for(pos, l) {
		struct copy *c = container_of(pos, struct copy, link);
		if (!best || c->new_chunk < best->new_chunk)
			best = c;
	}
	return best;
}

static struct copy *following(list_t *l, uint64_t new_chunk) {
	list_for(pos, l) {
		struct copy *c = container_of(pos, struct copy, link);
		if (c->new_chunk == new_chunk)
			return c;
	}
	return NULL;
}

/* The copies read: one store write per group adjacent in the store. A store that is
 * idle otherwise (no commit, no other copy on its way: a lone writer) writes its one
 * group with FUA, and its commit needs no FLUSH: a round trip less for each first
 * write at queue depth 1; busier, the copies are written plainly and one FLUSH before
 * the area write makes them all durable. */
static void write_copies(struct store *st) {
	bool idle = !st->meta_busy && !st->copy_writes_inflight && list_empty(&st->ready);
	while (!list_empty(&st->copied) && st->state == S_READY) {
		struct copy *first = lowest(&st->copied), *c = first, *n;
		uint64_t bytes = (uint64_t)c->n * st->chunk;
		while ((n = following(&st->copied, c->new_chunk + c->n)) &&
		       bytes + (uint64_t)n->n * st->chunk <= MAX_RUN) {
			c->next = n;
			bytes += (uint64_t)n->n * st->chunk;
			c = n;
		}
		c->next = NULL;
		struct req *w = io_new(NBD_CMD_WRITE, 0, first->new_chunk * st->chunk, (uint32_t)bytes);
		if (!w) { /* the group is still in the list: dropped with the rest */
			store_invalidate(st, "out of memory");
			return;
		}
		uint64_t pos = 0;
		for (c = first; c; c = c->next) {
			uint64_t size = (uint64_t)c->n * st->chunk;
			list_del(&c->link);
			memcpy(w->buf + pos, c->buf, c->len);
			memset(w->buf + pos + c->len, 0, size - c->len); /* past the origin's end */
			free(c->buf);
			c->buf = NULL;
			pos += size;
		}
		bool fua = idle && list_empty(&st->copied); /* the only group */
		for (c = first; c; c = c->next)
			c->fua = fua;
		w->flags = fua ? NBD_CMD_FLAG_FUA : 0;
		idle = false;
		st->copy_writes_inflight++;
		st->inflight++;
		st->copy_writes++;
		io_submit(st->cow, st->ncow, w, copy_written, first);
	}
}

/* The work gathered in this iteration, sent: whether there was any. */
bool store_kicks(void) {
	if (list_empty(&kicks))
		return false;
	while (!list_empty(&kicks)) {
		struct store *st = list_first(&kicks, struct store, klink);
		list_del(&st->klink);
		st->kicked = false;
		if (st->state == S_READY) {
			read_runs(st);
			write_copies(st);
			store_commit(st);
		}
		st->inflight--;
		store_put(st);
	}
	return true;
}
