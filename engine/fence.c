/* Fencing, the host's side: a failed path's writes are resent only once the
 * array has confirmed that the failed session can execute nothing any more
 * (docs/lab.md, "Fencing"). The map fences its dead sessions, all of them in one
 * message (at most NBD_MAX_FENCE), through a ready path, over a new connection
 * from that path's HBA (nbdc.c), with a timeout per attempt; an attempt that
 * fails, or whose path fails under it, is retried through another ready path.
 * On the ack the held writes are resent. */
#define _GNU_SOURCE
#include <math.h>
#include <stdlib.h>

#include "engine.h"
#include "nbd.h"

#define MAX_PATHS 64

void map_fence_kick(struct map *m) {
	m->fence_wait_until = 0;
	map_fence_tick(m);
}

void map_fence_tick(struct map *m) {
	if (m->closed || !m->ndead || m->fencing || now() < m->fence_wait_until)
		return;
	struct path *ready[MAX_PATHS];
	int n = map_ready(m, ready, MAX_PATHS);
	if (!n) {
		m->fence_wait_until = INFINITY; /* until a path changes (a kick) */
		return;
	}
	struct path *via = ready[(unsigned)m->turn % (unsigned)n];
	uint64_t tokens[NBD_MAX_FENCE];
	int k = 0;
	list_for(pos, &m->dead) {
		struct dead *d = container_of(pos, struct dead, link);
		d->in_batch = k < NBD_MAX_FENCE;
		if (d->in_batch)
			tokens[k++] = d->token;
	}
	m->fencing_via = via;
	m->fencing = nbdc_fence(m, via, tokens, k, m->s.fence_timeout);
	if (!m->fencing)
		map_fenced(m, false, "cannot open a connection");
}

/* The end of a fence attempt (ok: the array acknowledged it). */
void map_fenced(struct map *m, bool ok, const char *why) {
	struct path *via = m->fencing_via;
	m->fencing = NULL;
	m->fencing_via = NULL;
	if (!ok) {
		m->fence_failures++;
		m->turn++;
		logmsg("warning", "%s: fencing through %s failed: %s", m->id, via ? via->dev : "?", why);
		struct path *ready[MAX_PATHS];
		int n = map_ready(m, ready, MAX_PATHS), others = 0;
		for (int i = 0; i < n; i++)
			others += ready[i] != via;
		m->fence_wait_until = others ? 0 : now() + m->s.polling;
		return; /* retried by the next tick, or at once by a kick */
	}
	list_t resend;
	list_init(&resend);
	int fenced = 0;
	list_for(pos, &m->dead) {
		struct dead *d = container_of(pos, struct dead, link);
		if (!d->in_batch)
			continue;
		logmsg("info", "%s: session %016llx fenced through %s", m->id,
		       (unsigned long long)d->token, via ? via->dev : "?");
		while (!list_empty(&d->held)) {
			struct part *p = list_first(&d->held, struct part, link);
			list_del(&p->link);
			list_add_tail(&resend, &p->link);
		}
		list_del(&d->link);
		m->ndead--;
		free(d);
		fenced++;
	}
	m->fences += (uint64_t)fenced;
	state_save();
	while (!list_empty(&resend)) {
		struct part *p = list_first(&resend, struct part, link);
		list_del(&p->link);
		map_resend(m, p);
	}
	map_path_changed(m, NULL, false, 0, NULL); /* drain; fence what is left */
}
