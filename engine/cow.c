/* Copy-on-write devices: an origin with snapshots, and a snapshot (store.c keeps
 * the exception stores). Classic dm-snapshot semantics:
 *
 *  - an origin's write (WRITE, WRITE_ZEROES, TRIM) waits until every chunk it
 *    touches is in every valid store of the origin (copied there before its first
 *    overwrite), and until no snapshot read of those chunks is still reading the
 *    origin; reads and flushes go straight through;
 *  - a snapshot reads a chunk from its store if the store has it, else from the
 *    origin (such reads are tracked: see above); a write to a chunk not yet in the
 *    store first copies the origin's chunk there, then writes over the copy;
 *  - a new snapshot of an origin takes effect once the origin's writes in flight
 *    have ended (dm's suspend), and once its store is loaded from disk.
 *
 * A request that must wait is parked (a count of waits; it is evaluated again when
 * they are all released). Completions of the engine's own I/O and parked requests
 * released are run from cow_flush(), once per loop iteration, never from inside
 * another callback. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "nbd.h"

struct waitnode { list_t link; struct req *r; };
static list_t done_q = { &done_q, &done_q }; /* internal I/O ended */
static list_t retry_q = { &retry_q, &retry_q }; /* parked requests released */

static bool is_write(uint16_t cmd) {
	return cmd == NBD_CMD_WRITE || cmd == NBD_CMD_WRITE_ZEROES || cmd == NBD_CMD_TRIM;
}

/* ---- waiting ---------------------------------------------------------------------- */
void park(list_t *on, struct req *r) {
	struct waitnode *w = malloc(sizeof *w);
	if (!w) { /* no way to wait safely: the agent starts another engine, which loses no
		   * acknowledged write (clients resend what was not answered) */
		logmsg("warning", "out of memory in a copy-on-write: exiting");
		abort();
	}
	w->r = r;
	list_add_tail(on, &w->link);
	r->parked++;
}

void wake_all(list_t *on) {
	while (!list_empty(on)) {
		struct waitnode *w = list_first(on, struct waitnode, link);
		list_del(&w->link);
		if (--w->r->parked == 0) {
			list_del(&w->r->plink);
			list_add_tail(&retry_q, &w->r->plink);
		}
		free(w);
	}
}

/* The evaluation of ``r`` parked it (its waits are counted in r->parked, which the
 * evaluation held at 1 meanwhile): kept on its device until released. */
static bool hold(struct dev *d, struct req *r) {
	if (--r->parked == 0)
		return false;
	r->pending = 1; /* a client that goes away leaves it to us */
	list_add_tail(&d->parked, &r->plink);
	return true;
}

static void fail(struct req *r) {
	r->err = NBD_EIO;
	r->pending = 0;
	req_finish(r);
}

/* ---- internal I/O ------------------------------------------------------------------- */
static void io_done(struct req *r) {
	list_add_tail(&done_q, &r->plink);
}

struct req *io_new(uint16_t cmd, uint16_t flags, uint64_t off, uint32_t len) {
	return req_new(NULL, 0, cmd, flags, off, len);
}

void io_submit(const struct seg *segs, int nsegs, struct req *r, io_cb *cb, void *ctx) {
	r->done = io_done;
	r->iocb = cb;
	r->ctx = ctx;
	segs_submit(segs, nsegs, r);
}

bool cow_busy(void) { return !list_empty(&done_q) || !list_empty(&retry_q) || store_kicked(); }

void cow_flush(void) {
	while (cow_busy()) {
		if (!list_empty(&done_q)) {
			struct req *r = list_first(&done_q, struct req, plink);
			list_del(&r->plink);
			if (r->iocb)
				r->iocb(r->ctx, r, r->err);
			req_free(r);
			continue;
		}
		if (list_empty(&retry_q)) { /* the copies this iteration gathered (copy.c) */
			store_kicks();
			continue;
		}
		struct req *r = list_first(&retry_q, struct req, plink);
		list_del(&r->plink);
		r->pending = 0;
		if (!r->fr) /* its client went away: never executed, so never answered */
			req_free(r);
		else if (!r->dev)
			fail(r);
		else
			dev_submit(r->dev, r);
	}
}

/* ---- origins ------------------------------------------------------------------------ */
static void origin_write_done(struct req *r) {
	struct dev *d = r->dev;
	r->done = NULL;
	list_del(&r->plink);
	if (d && --d->wr_inflight == 0 && d->suspended) {
		d->suspended = false;
		wake_all(&d->suspw);
	}
	req_finish(r);
}

static void origin_eval(struct dev *d, struct req *r) {
	if (!is_write(r->cmd)) {
		segs_submit(d->segs, d->nsegs, r);
		return;
	}
	r->parked = 1;
	if (d->suspended) {
		park(&d->suspw, r);
	} else {
		for (int i = 0; i < d->ncows; i++) {
			struct store *st = d->cows[i];
			if (st->state == S_LOADING) {
				park(&st->loadw, r);
				continue;
			}
			uint64_t last = (r->off + r->len - 1) / st->chunk, n;
			for (uint64_t c = r->off / st->chunk; c <= last && st->state == S_READY; c++) {
				if (hmap_get(&st->exc, c, NULL)) {
					if (hmap_get(&st->track, c, &n) && n)
						park(&st->trackw, r);
					continue;
				}
				struct pend *p = store_need(st, c);
				if (p)
					park(&p->waiters, r);
			}
		}
	}
	if (hold(d, r))
		return;
	d->wr_inflight++;
	list_add_tail(&d->busy, &r->plink);
	r->done = origin_write_done;
	segs_submit(d->segs, d->nsegs, r);
}

/* ---- snapshots ---------------------------------------------------------------------- */
static void snap_read_done(struct req *r) {
	struct store *st = r->tstore;
	r->done = NULL;
	if (st) {
		for (int i = 0; i < r->ntrack; i++)
			store_untrack(st, r->track[i]);
		st->inflight--;
		r->tstore = NULL;
		store_put(st); /* a deleted store goes with its last I/O */
	}
	req_finish(r);
}

/* The pieces of a snapshot request: chunk by chunk, the store's copy or the origin,
 * neighbours on the same side and contiguous made one span. */
static void snap_dispatch(struct store *st, struct req *r) {
	uint64_t first = r->off / st->chunk, last = (r->off + r->len - 1) / st->chunk;
	uint64_t nchunks = last - first + 1;
	struct xspan *xs = malloc(nchunks * sizeof *xs);
	uint64_t *track = is_write(r->cmd) ? NULL : malloc(nchunks * sizeof *track);
	int n = 0, nt = 0;
	if (!xs || (!is_write(r->cmd) && !track)) {
		free(xs);
		free(track);
		fail(r);
		return;
	}
	for (uint64_t c = first; c <= last; c++) {
		uint64_t lo = c * st->chunk > r->off ? c * st->chunk : r->off;
		uint64_t hi = (c + 1) * st->chunk < r->off + r->len ? (c + 1) * st->chunk : r->off + r->len;
		uint64_t nc;
		const struct seg *segs;
		int nsegs;
		uint64_t at;
		if (hmap_get(&st->exc, c, &nc)) {
			segs = st->cow, nsegs = st->ncow, at = store_cow_offset(st, nc) + (lo - c * st->chunk);
		} else if (track) {
			segs = st->org, nsegs = st->norg, at = lo;
			track[nt++] = c;
		} else { /* a write's chunks were all copied first: cannot happen */
			free(xs);
			fail(r);
			return;
		}
		struct xspan *prev = n ? &xs[n - 1] : NULL;
		if (prev && prev->segs == segs && prev->off + prev->len == at)
			prev->len += (uint32_t)(hi - lo);
		else
			xs[n++] = (struct xspan){ segs, nsegs, at, (uint32_t)(hi - lo), (uint32_t)(lo - r->off) };
	}
	for (int i = 0; i < nt; i++) {
		uint64_t v = 0;
		hmap_get(&st->track, track[i], &v);
		if (hmap_put(&st->track, track[i], v + 1)) {
			nt = i; /* untracked pieces must not be read from the origin */
			for (int j = 0; j < nt; j++)
				store_untrack(st, track[j]);
			free(xs);
			free(track);
			fail(r);
			return;
		}
	}
	if (nt) {
		r->track = track, r->ntrack = nt, r->tstore = st;
		st->inflight++;
	} else {
		free(track);
	}
	r->done = snap_read_done;
	spans_submit(r, xs, n);
	free(xs);
}

static void snap_eval(struct dev *d, struct req *r) {
	struct store *st = d->snap;
	if (!st || st->state == S_INVALID) {
		fail(r);
		return;
	}
	if (r->cmd == NBD_CMD_FLUSH) {
		struct xspan xs[2] = { { st->cow, st->ncow, 0, 0, 0 }, { st->org, st->norg, 0, 0, 0 } };
		spans_submit(r, xs, 2);
		return;
	}
	r->parked = 1;
	if (st->state == S_LOADING) {
		park(&st->loadw, r);
	} else if (is_write(r->cmd)) {
		uint64_t last = (r->off + r->len - 1) / st->chunk;
		for (uint64_t c = r->off / st->chunk; c <= last && st->state == S_READY; c++) {
			if (hmap_get(&st->exc, c, NULL))
				continue;
			struct pend *p = store_need(st, c);
			if (p)
				park(&p->waiters, r);
		}
	}
	if (hold(d, r))
		return;
	if (st->state != S_READY) {
		fail(r);
		return;
	}
	snap_dispatch(st, r);
}

void cow_submit(struct dev *d, struct req *r) {
	r->dev = d;
	if (d->snap || d->snap_gone)
		snap_eval(d, r);
	else
		origin_eval(d, r);
}

/* A device got snapshot stores it did not have: the writes in flight end first. */
void cow_attach(struct dev *d) {
	if (d->wr_inflight)
		d->suspended = true;
}

/* The device goes: its parked requests fail when released, its writes in flight
 * end without it. */
void cow_dev_gone(struct dev *d) {
	while (!list_empty(&d->parked)) {
		struct req *r = list_first(&d->parked, struct req, plink);
		list_del(&r->plink);
		r->dev = NULL;
	}
	while (!list_empty(&d->busy)) {
		struct req *r = list_first(&d->busy, struct req, plink);
		list_del(&r->plink);
		r->dev = NULL;
	}
	d->wr_inflight = 0;
	d->suspended = false;
	wake_all(&d->suspw);
}
