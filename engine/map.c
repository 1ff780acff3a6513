/* A map: one LUN, its paths, the path selector and the no-path queue (the
 * semantics of dm-multipath's, as docs/dataplane.md and docs/lab.md state them).
 *
 * Every part ends: completed, resent within a bound (max_tries paths), or failed
 * with the error the policy gives (no_path_retry). A failed path's reads and
 * flushes are resent at once; its writes only after the array fenced the path's
 * session (fence.c): until then they are held, and with no path left to fence
 * through they wait or fail as no_path_retry says, never resent unfenced. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "nbd.h"
#include "sb.h"

#define MAX_PATHS 64

list_t all_maps = { &all_maps, &all_maps };

struct map *map_find(const char *id) {
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		if (!strcmp(m->id, id))
			return m;
	}
	return NULL;
}

struct map *map_new(const char *id) {
	struct map *m = calloc(1, sizeof *m);
	if (!m)
		return NULL;
	snprintf(m->id, sizeof m->id, "%s", id);
	list_init(&m->queue);
	list_init(&m->dead);
	m->s.multibus = true;
	m->s.npr = NPR_QUEUE;
	m->s.polling = 5.0;
	m->s.io_timeout = 30.0;
	m->s.fence_timeout = 5.0;
	m->s.max_tries = 5;
	m->s.hold_mask = (1u << NBD_CMD_WRITE) | (1u << NBD_CMD_WRITE_ZEROES) | (1u << NBD_CMD_TRIM);
	list_add_tail(&all_maps, &m->link);
	state_adopt(m); /* sessions a previous engine left at the array: fenced first */
	return m;
}

void map_free(void *p) {
	struct map *m = p;
	free(m->paths);
	free(m);
}

int map_ready(const struct map *m, struct path **out, int max) {
	int n = 0;
	for (int i = 0; i < m->npaths && n < max; i++)
		if (m->paths[i]->state == P_READY)
			out[n++] = m->paths[i];
	return n;
}

static struct path *choose(struct map *m) {
	struct path *ready[MAX_PATHS];
	int n = map_ready(m, ready, MAX_PATHS);
	if (!n)
		return NULL;
	if (m->s.multibus) { /* round-robin over every ready path */
		m->rr = (m->rr + 1) % (unsigned)n;
		return ready[m->rr];
	}
	struct path *cur = m->current; /* failover: the first path group that works */
	if (cur && cur->state == P_READY && (m->s.failback_manual || cur == ready[0]))
		return cur;
	m->current = ready[0];
	return ready[0];
}

/* A write was failed to the guest while its copy may still run at the array (or a
 * previous engine's session may still hold some): nothing new reaches the array
 * until that session is fenced. */
bool map_debt(const struct map *m) {
	list_for(pos, &m->dead) {
		if (container_of(pos, struct dead, link)->failed_back)
			return true;
	}
	return false;
}

static void fail_part(struct map *m, struct part *p) {
	m->io_errors++;
	part_done(p, NBD_EIO);
}

void map_submit(struct map *m, struct part *p) {
	if (m->closed) {
		fail_part(m, p);
		return;
	}
	struct path *path = map_debt(m) ? NULL : choose(m);
	if (path) {
		path_send(path, p);
		return;
	}
	struct path *any[1];
	if (m->s.npr == NPR_FAIL && !map_ready(m, any, 1)) {
		fail_part(m, p);
		return;
	}
	if (!p->queued_at)
		p->queued_at = now();
	list_add_tail(&m->queue, &p->link);
	m->nqueue++;
}

void map_resend(struct map *m, struct part *p) {
	if (p->tries >= m->s.max_tries) {
		m->retries_exhausted++;
		logmsg("warning", "%s: a request failed on %d paths: EIO", m->id, p->tries);
		fail_part(m, p);
	} else {
		map_submit(m, p);
	}
}

static void drain(struct map *m) {
	while (m->nqueue && !map_debt(m)) {
		struct path *path = choose(m);
		if (!path)
			break;
		struct part *p = list_first(&m->queue, struct part, link);
		list_del(&p->link);
		m->nqueue--;
		path_send(path, p);
	}
}

/* A path became ready, or failed: then `taken` holds what was in flight on it. */
void map_path_changed(struct map *m, struct path *p, bool had_session, uint64_t token,
		      list_t *taken) {
	if (taken) {
		if (p == m->fencing_via && m->fencing) { /* fenced through a dead path */
			nbdc_cancel(m->fencing);
			map_fenced(m, false, "the path failed");
		}
		int n = 0, held = 0;
		list_for(pos, taken) {
			struct part *pt = container_of(pos, struct part, link);
			pt->tries++;
			n++;
			if (m->s.hold_mask & (1u << pt->cmd))
				held++;
		}
		if (m->closed) {
			while (!list_empty(taken))
				fail_part(m, list_first(taken, struct part, link));
			return;
		}
		if (n)
			logmsg("info", "%s: %d request(s) of failed path %s: %d resent, %d held for the "
			       "fence of session %016llx", m->id, n, p->dev, n - held, held,
			       (unsigned long long)token);
		struct dead *d = NULL;
		if (held) {
			d = calloc(1, sizeof *d);
			if (d && had_session) {
				d->token = token;
				snprintf(d->dev, sizeof d->dev, "%s", p->dev);
				list_init(&d->held);
				d->since = now();
				list_add_tail(&m->dead, &d->link);
				m->ndead++;
			} else { /* cannot happen: a path is ready only with an id */
				free(d);
				d = NULL;
			}
		}
		while (!list_empty(taken)) {
			struct part *pt = list_first(taken, struct part, link);
			list_del(&pt->link);
			if (m->s.hold_mask & (1u << pt->cmd)) {
				if (d) {
					list_add_tail(&d->held, &pt->link);
					d->nheld++;
				} else {
					fail_part(m, pt);
				}
			} else {
				map_resend(m, pt);
			}
		}
		state_save();
	}
	if (m->ndead && !m->closed)
		map_fence_kick(m);
	drain(m);
}

/* no_path_retry N: queued (and held) parts fail after N polling intervals without
 * a path; fail: at once. Held writes fail only while no path is left to fence
 * through; their session stays to fence (the map's debt). */
static void expire(struct map *m) {
	if (m->s.npr == NPR_QUEUE)
		return;
	double t = now();
	double limit = m->s.npr == NPR_COUNT ? m->s.npr_n * m->s.polling : -1;
	if (limit >= 0) {
		while (m->nqueue) {
			struct part *p = list_first(&m->queue, struct part, link);
			if (t - p->queued_at < limit)
				break;
			list_del(&p->link);
			m->nqueue--;
			fail_part(m, p);
		}
	}
	struct path *any[1];
	if (map_ready(m, any, 1))
		return;
	list_for(pos, &m->dead) {
		struct dead *d = container_of(pos, struct dead, link);
		if (d->nheld && (limit < 0 || t - d->since >= limit)) {
			logmsg("warning", "%s: %d write(s) of unfenced session %016llx failed (no path)",
			       m->id, d->nheld, (unsigned long long)d->token);
			d->failed_back = true;
			while (!list_empty(&d->held))
				fail_part(m, list_first(&d->held, struct part, link));
			d->nheld = 0;
		}
	}
}

/* A part unanswered for io_timeout on a path whose link is up fails the path. */
static void check_timeouts(struct map *m) {
	double t = now();
	for (int i = 0; i < m->npaths; i++) {
		struct path *p = m->paths[i];
		if (p->state != P_READY)
			continue;
		double sent = path_oldest(p);
		if (sent > 0 && t - sent > m->s.io_timeout) {
			char why[96];
			snprintf(why, sizeof why, "I/O timeout: a request unanswered for %.1f s", t - sent);
			path_fail(p, why);
		}
	}
}

void map_tick(struct map *m) {
	expire(m);
	check_timeouts(m);
	map_fence_tick(m);
	for (int i = 0; i < m->npaths; i++)
		path_tick(m->paths[i]);
}

/* The map goes away: whatever waits fails with EIO. */
void map_close(struct map *m) {
	m->closed = true;
	if (m->fencing) {
		nbdc_cancel(m->fencing);
		m->fencing = NULL;
		m->fencing_via = NULL;
	}
	while (m->nqueue) {
		struct part *p = list_first(&m->queue, struct part, link);
		list_del(&p->link);
		m->nqueue--;
		fail_part(m, p);
	}
	while (!list_empty(&m->dead)) {
		struct dead *d = list_first(&m->dead, struct dead, link);
		while (!list_empty(&d->held))
			fail_part(m, list_first(&d->held, struct part, link));
		list_del(&d->link);
		free(d);
	}
	m->ndead = 0;
}

void map_stats(struct map *m, struct sb *o) {
	int held = 0;
	list_for(pos, &m->dead) held += container_of(pos, struct dead, link)->nheld;
	sb_printf(o, "{\"id\":");
	sb_str(o, m->id);
	sb_printf(o, ",\"queued\":%d,\"held\":%d,\"unfenced\":[", m->nqueue + held, held);
	bool first = true;
	list_for(pos, &m->dead) {
		sb_printf(o, "%s\"%016llx\"", first ? "" : ",",
			  (unsigned long long)container_of(pos, struct dead, link)->token);
		first = false;
	}
	sb_printf(o, "],\"io_errors\":%llu,\"retries_exhausted\":%llu,\"fences\":%llu,"
		  "\"fence_failures\":%llu,\"current\":",
		  (unsigned long long)m->io_errors, (unsigned long long)m->retries_exhausted,
		  (unsigned long long)m->fences, (unsigned long long)m->fence_failures);
	struct path *cur = m->current;
	if (!m->s.multibus && !(cur && cur->state == P_READY)) {
		struct path *r[1];
		cur = map_ready(m, r, 1) ? r[0] : NULL;
	}
	if (cur && !m->s.multibus)
		sb_str(o, cur->id);
	else
		sb_printf(o, "null");
	sb_printf(o, ",\"paths\":[");
	for (int i = 0; i < m->npaths; i++) {
		struct path *p = m->paths[i];
		static const char *names[] = { "faulty", "faulty", "ready" };
		sb_printf(o, "%s{\"id\":", i ? "," : "");
		sb_str(o, p->id);
		sb_printf(o, ",\"state\":\"%s\",\"connecting\":%s,\"link\":%s,\"reason\":",
			  names[p->state], p->state == P_CONNECTING ? "true" : "false",
			  p->link ? "true" : "false");
		sb_str(o, p->reason);
		if (p->has_session)
			sb_printf(o, ",\"session\":\"%016llx\"", (unsigned long long)p->session);
		else
			sb_printf(o, ",\"session\":null");
		sb_printf(o, ",\"inflight\":%d,\"read_bytes\":%llu,\"written_bytes\":%llu,"
			  "\"requests\":%llu,\"failures\":%llu}", p->ninflight,
			  (unsigned long long)p->read_bytes, (unsigned long long)p->written_bytes,
			  (unsigned long long)p->requests, (unsigned long long)p->failures);
	}
	sb_printf(o, "]}");
}
