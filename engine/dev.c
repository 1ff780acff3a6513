/* Devices: what a client opens. A device has a listening socket (given by the
 * agent, kept by it across engine restarts so a client's reconnect waits in its
 * backlog) and a segment table; a request becomes one part per segment it
 * touches (seg.c), a FLUSH one part per map of the device. An origin with
 * snapshots and a snapshot go through cow.c first. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "engine.h"
#include "nbd.h"

#define MAX_SPANS 256

list_t all_devs = { &all_devs, &all_devs };

struct dev *dev_find(const char *name) {
	list_for(pos, &all_devs) {
		struct dev *d = container_of(pos, struct dev, link);
		if (!strcmp(d->name, name))
			return d;
	}
	return NULL;
}

static void dev_accept(struct ev *ev, uint32_t events) {
	struct dev *d = container_of(ev, struct dev, lev);
	(void)events;
	for (int i = 0; i < 16; i++) {
		int fd = accept4(ev->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		front_accept(d, fd);
	}
}

void dev_listen(struct dev *d, int fd) {
	ev_close(&d->lev, false);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); /* the agent's socket may block */
	if (ev_add(&d->lev, fd, EPOLLIN, dev_accept) < 0)
		logmsg("warning", "device %s: cannot watch its socket: %s", d->name, strerror(errno));
}

static void free_dev(void *p) {
	struct dev *d = p;
	free(d->segs);
	free(d);
}

void dev_free(struct dev *d) {
	cow_dev_gone(d);
	ev_close(&d->lev, false);
	front_close_dev(d);
	list_del(&d->link);
	defer_free(d, free_dev);
}

void dev_client_gone(struct dev *d) {
	if (--d->nfronts == 0 && d->retired)
		defer_free(d, free_dev);
}

/* Whether a new table keeps every byte of the device where it was (it may grow). */
bool dev_same_mapping(const struct dev *d, const struct seg *segs, int n) {
	if (n < d->nsegs)
		return false;
	for (int i = 0; i < d->nsegs; i++) {
		const struct seg *a = &d->segs[i], *b = &segs[i];
		bool last = i == d->nsegs - 1;
		if (a->start != b->start || a->moff != b->moff || strcmp(a->map_id, b->map_id) ||
		    (last ? b->len < a->len : b->len != a->len))
			return false;
	}
	return true;
}

/* The name now means another mapping (a LUN's alias given to another WWID): the
 * clients that opened the old one are not moved to other data under their feet;
 * their requests fail (EIO) until they disconnect.
 * New clients get the new device. */
void dev_retire(struct dev *d) {
	logmsg("warning", "device %s now maps other data: its %d open client(s) get EIO",
	       d->name, d->nfronts);
	cow_dev_gone(d);
	ev_close(&d->lev, false);
	list_del(&d->link);
	d->retired = true;
	free(d->segs);
	d->segs = NULL;
	d->nsegs = 0;
	if (!d->nfronts)
		defer_free(d, free_dev);
}

void dev_relink(void) {
	list_for(pos, &all_devs) {
		struct dev *d = container_of(pos, struct dev, link);
		for (int i = 0; i < d->nsegs; i++)
			d->segs[i].map = map_find(d->segs[i].map_id);
	}
	store_relink();
}

static void init_part(struct part *p, struct req *r, struct map *m, uint64_t off,
		      uint32_t len, uint32_t boff) {
	memset(p, 0, sizeof *p);
	list_init(&p->link);
	p->req = r;
	p->map = m;
	p->off = off;
	p->len = len;
	p->boff = boff;
	p->cmd = r->cmd;
	p->flags = r->flags;
}

/* A request over one or more segment tables (a snapshot's reads go to its store and
 * to its origin): its parts, one per segment touched (a FLUSH: one per map), sent
 * to their maps. 0, or -1 when it cannot be split (it is then ended with EIO). */
int spans_submit(struct req *r, const struct xspan *xs, int nxs) {
	int n = 0, cap = 0;
	struct part *parts = NULL;
	struct span sp[MAX_SPANS];
	for (int x = 0; x < nxs; x++) {
		const struct xspan *s = &xs[x];
		if (r->cmd == NBD_CMD_FLUSH) {
			for (int i = 0; i < s->nsegs; i++) {
				struct map *m = s->segs[i].map;
				int j = 0;
				while (j < n && parts[j].map != m)
					j++;
				if (j < n)
					continue;
				if (n == cap) {
					cap = cap ? cap * 2 : 4;
					struct part *np = realloc(parts, (size_t)cap * sizeof *np);
					if (!np)
						goto fail;
					parts = np;
				}
				init_part(&parts[n++], r, m, 0, 0, 0);
			}
			continue;
		}
		int k = seg_split(s->segs, s->nsegs, s->off, s->len, sp, MAX_SPANS);
		if (k <= 0)
			goto fail;
		if (n + k > cap) {
			cap = (n + k) * 2;
			struct part *np = realloc(parts, (size_t)cap * sizeof *np);
			if (!np)
				goto fail;
			parts = np;
		}
		for (int i = 0; i < k; i++)
			init_part(&parts[n++], r, s->segs[sp[i].seg].map, sp[i].moff, sp[i].len,
				  s->boff + sp[i].boff);
	}
	if (!n)
		goto fail;
	if (r->parts != &r->one)
		free(r->parts);
	if (n == 1) {
		r->one = parts[0];
		free(parts);
		parts = &r->one;
	}
	r->parts = parts;
	r->nparts = r->pending = n;
	for (int i = 0; i < n; i++) { /* the list links point into the final array */
		list_init(&parts[i].link);
		parts[i].req = r;
	}
	for (int i = 0; i < n; i++) {
		struct part *p = &r->parts[i];
		if (p->map)
			map_submit(p->map, p);
		else
			part_done(p, NBD_EIO); /* its map is gone */
	}
	return 0;
fail:
	free(parts);
	r->err = NBD_EIO;
	r->pending = 0;
	req_finish(r);
	return -1;
}

int segs_submit(const struct seg *segs, int nsegs, struct req *r) {
	struct xspan x = { segs, nsegs, r->off, r->len, 0 };
	return spans_submit(r, &x, 1);
}

void dev_submit(struct dev *d, struct req *r) {
	if (d->ncows || d->snap) {
		cow_submit(d, r);
		return;
	}
	segs_submit(d->segs, d->nsegs, r);
}
