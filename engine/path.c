/* One path to the array: an NBD connection through one HBA (transmission phase).
 *
 * A path forwards its map's parts and hands replies back. It fails when its HBA's
 * link goes down (link.c: the kernel's link events), its connection breaks, the
 * array sends garbage, or a part waits too long for its reply; its in-flight parts
 * then go back to the map, which resends them on another path (writes only once
 * the array has fenced this path's session). A part stays in flight until its
 * reply is complete (a read's data included). A faulty path whose link is up is
 * reconnected every polling_interval (nbdc.c does the handshake). */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "engine.h"
#include "nbd.h"

#define RXCAP (256u << 10)
#define READ_ROUNDS 16

list_t dirty_paths = { &dirty_paths, &dirty_paths };
static void path_cb(struct ev *ev, uint32_t events);

struct path *path_new(struct map *m, const char *id) {
	struct path *p = calloc(1, sizeof *p);
	if (!p)
		return NULL;
	p->rx = malloc(RXCAP);
	if (!p->rx) {
		free(p);
		return NULL;
	}
	p->map = m;
	snprintf(p->id, sizeof p->id, "%s", id);
	snprintf(p->reason, sizeof p->reason, "not connected yet");
	list_init(&p->inflight);
	list_init(&p->dlink);
	p->ev.fd = -1;
	p->state = P_FAULTY;
	p->link = true;
	return p;
}

void path_free(void *obj) {
	struct path *p = obj;
	free(p->slots);
	free(p->freeslots);
	free(p->rx);
	free(p);
}

static struct part *next_part(struct path *p, struct part *pt) {
	return pt->link.next == &p->inflight ? NULL : container_of(pt->link.next, struct part, link);
}

double path_oldest(const struct path *p) {
	if (list_empty(&p->inflight))
		return 0;
	return list_first(&p->inflight, struct part, link)->sent_at;
}

static int slot_get(struct path *p, uint32_t *slot) {
	if (!p->nfree) {
		uint32_t n = p->nslots ? p->nslots * 2 : 64;
		struct part **s = realloc(p->slots, n * sizeof *s);
		if (!s)
			return -1;
		p->slots = s;
		uint32_t *f = realloc(p->freeslots, n * sizeof *f);
		if (!f)
			return -1;
		p->freeslots = f;
		for (uint32_t i = n; i > p->nslots; i--) {
			p->slots[i - 1] = NULL;
			p->freeslots[p->nfree++] = i - 1;
		}
		p->nslots = n;
	}
	*slot = p->freeslots[--p->nfree];
	return 0;
}

void path_mark_dirty(struct path *p) {
	if (!p->dirty) {
		p->dirty = true;
		list_add_tail(&dirty_paths, &p->dlink);
	}
}

void path_send(struct path *p, struct part *pt) {
	uint32_t slot;
	if (p->state != P_READY || slot_get(p, &slot)) { /* out of memory */
		p->map->io_errors++;
		part_done(pt, NBD_EIO);
		return;
	}
	pt->slot = slot;
	pt->cookie = ((uint64_t)++p->gen << 32) | slot;
	p->slots[slot] = pt;
	pt->path = p;
	pt->sent = false;
	pt->sent_at = now();
	uint8_t *w = pt->wire;
	put32(w, NBD_REQUEST_MAGIC);
	put16(w + 4, pt->flags);
	put16(w + 6, pt->cmd);
	put64(w + 8, pt->cookie);
	put64(w + 16, pt->off);
	put32(w + 24, pt->cmd == NBD_CMD_FLUSH ? 0 : pt->len);
	list_add_tail(&p->inflight, &pt->link);
	p->ninflight++;
	p->requests++;
	if (!p->txp) {
		p->txp = pt;
		p->tx_off = 0;
	}
	path_mark_dirty(p);
}

static uint32_t part_bytes(const struct part *pt) {
	return NBD_REQUEST_SIZE + (pt->cmd == NBD_CMD_WRITE ? pt->len : 0);
}

/* Write what is queued, as much as the socket takes. */
void path_flush(struct path *p) {
	if (p->dirty) {
		list_del(&p->dlink);
		p->dirty = false;
	}
	while (p->state == P_READY && p->txp) {
		struct iovec iov[64];
		int n = 0;
		uint32_t off = p->tx_off;
		for (struct part *pt = p->txp; pt && n < 62; pt = next_part(p, pt)) {
			uint32_t plen = pt->cmd == NBD_CMD_WRITE ? pt->len : 0;
			uint8_t *data = pt->req->buf + pt->boff;
			if (off < NBD_REQUEST_SIZE) {
				iov[n].iov_base = pt->wire + off;
				iov[n++].iov_len = NBD_REQUEST_SIZE - off;
				if (plen) {
					iov[n].iov_base = data;
					iov[n++].iov_len = plen;
				}
			} else {
				iov[n].iov_base = data + (off - NBD_REQUEST_SIZE);
				iov[n++].iov_len = plen - (off - NBD_REQUEST_SIZE);
			}
			off = 0;
		}
		ssize_t w = writev(p->ev.fd, iov, n);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				ev_mod(&p->ev, EPOLLIN | EPOLLOUT);
				return;
			}
			char why[96];
			snprintf(why, sizeof why, "connection lost: %s", strerror(errno));
			path_fail(p, why);
			return;
		}
		size_t left = (size_t)w;
		while (left && p->txp) {
			uint32_t rest = part_bytes(p->txp) - p->tx_off;
			if (left >= rest) {
				left -= rest;
				p->txp->sent = true;
				p->txp = next_part(p, p->txp);
				p->tx_off = 0;
			} else {
				p->tx_off += (uint32_t)left;
				left = 0;
			}
		}
	}
	if (p->state == P_READY)
		ev_mod(&p->ev, EPOLLIN);
}

static void complete(struct path *p, struct part *pt, uint32_t err) {
	p->slots[pt->slot] = NULL;
	p->freeslots[p->nfree++] = pt->slot;
	p->ninflight--;
	if (!err && pt->cmd == NBD_CMD_READ)
		p->read_bytes += pt->len;
	else if (!err && pt->cmd == NBD_CMD_WRITE)
		p->written_bytes += pt->len;
	part_done(pt, err);
}

/* One reply header; false when the path failed. */
static bool reply_header(struct path *p, const uint8_t *h) {
	uint64_t cookie = get64(h + 8);
	uint32_t slot = (uint32_t)cookie, err = get32(h + 4);
	struct part *pt = slot < p->nslots ? p->slots[slot] : NULL;
	if (get32(h) != NBD_SIMPLE_REPLY_MAGIC || !pt || pt->cookie != cookie || !pt->sent) {
		path_fail(p, "garbled reply from the array");
		return false;
	}
	if (pt->cmd == NBD_CMD_READ && !err && pt->len) {
		p->rxp = pt; /* its data follows */
		p->rx_left = pt->len;
		return true;
	}
	complete(p, pt, err);
	return p->state == P_READY;
}

/* What is already received: a read's data staged with its header copied into its
 * request, parts whose reply is complete ended, the headers staged parsed. false
 * when the path failed. Run before every receive, and once more when the receive
 * rounds run out (what was received must not wait for another event: there may
 * be none). */
static bool path_staged(struct path *p) {
	while (p->state == P_READY) {
		if (p->rxp && p->rx_pos < p->rx_len) { /* data already staged */
			struct part *pt = p->rxp;
			uint32_t take = p->rx_len - p->rx_pos;
			if (take > p->rx_left)
				take = p->rx_left;
			memcpy(pt->req->buf + pt->boff + (pt->len - p->rx_left), p->rx + p->rx_pos, take);
			p->rx_pos += take;
			p->rx_left -= take;
		}
		if (p->rxp && !p->rx_left) {
			struct part *pt = p->rxp;
			p->rxp = NULL;
			complete(p, pt, 0);
			continue;
		}
		if (p->rxp)
			return true; /* its data is still to come */
		while (p->rx_len - p->rx_pos >= NBD_REPLY_SIZE) {
			const uint8_t *h = p->rx + p->rx_pos;
			p->rx_pos += NBD_REPLY_SIZE;
			if (!reply_header(p, h))
				return false;
			if (p->rxp)
				break;
		}
		if (p->rxp)
			continue;
		memmove(p->rx, p->rx + p->rx_pos, p->rx_len - p->rx_pos);
		p->rx_len -= p->rx_pos;
		p->rx_pos = 0;
		return true;
	}
	return false;
}

/* Replies: headers through the staging buffer, a read's data straight into its
 * request's buffer (once: no other copy in the engine). */
static void path_read(struct path *p) {
	bool drained = false; /* a short read: the socket had no more (epoll says when it has) */
	for (int round = 0; round < READ_ROUNDS; round++) {
		if (!path_staged(p) || drained)
			return;
		ssize_t n;
		size_t want;
		if (p->rxp) {
			struct part *pt = p->rxp;
			want = p->rx_left;
			n = recv(p->ev.fd, pt->req->buf + pt->boff + (pt->len - p->rx_left), want, 0);
			if (n > 0)
				p->rx_left -= (uint32_t)n;
		} else {
			want = RXCAP - p->rx_len;
			n = recv(p->ev.fd, p->rx + p->rx_len, want, 0);
			if (n > 0)
				p->rx_len += (uint32_t)n;
		}
		drained = n > 0 && (size_t)n < want;
		if (n == 0) {
			path_fail(p, "connection lost: closed by the array");
			return;
		}
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			char why[96];
			snprintf(why, sizeof why, "connection lost: %s", strerror(errno));
			path_fail(p, why);
			return;
		}
	}
	path_staged(p);
}

static void path_cb(struct ev *ev, uint32_t events) {
	struct path *p = container_of(ev, struct path, ev);
	if (events & EPOLLOUT)
		path_flush(p);
	if (p->state == P_READY && (events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
		path_read(p);
}

/* The handshake (nbdc.c) gave us a connection and its session id. */
void path_ready(struct path *p, int fd, uint64_t session) {
	p->conn = NULL;
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (ev_add(&p->ev, fd, EPOLLIN, path_cb)) {
		close(fd);
		p->state = P_FAULTY;
		snprintf(p->reason, sizeof p->reason, "epoll: %s", strerror(errno));
		return;
	}
	p->state = P_READY;
	p->session = session;
	p->has_session = true;
	p->reason[0] = 0;
	p->rx_len = p->rx_pos = 0;
	p->rxp = NULL;
	p->next_probe = 0; /* after a failure, the first reconnect is at once */
	logmsg("info", "path %s (%s) is ready: session %016llx", p->id, p->dev,
	       (unsigned long long)session);
	char ev[256], id[140];
	json_str(id, sizeof id, p->id);
	snprintf(ev, sizeof ev, "{\"ev\":\"path\",\"id\":%s,\"state\":\"ready\","
		 "\"session\":\"%016llx\"}", id, (unsigned long long)session);
	emit(ev);
	state_save(); /* before anything is sent on it */
	map_path_changed(p->map, p, false, 0, NULL);
}

void path_connect_failed(struct path *p, const char *why) {
	p->conn = NULL;
	p->state = P_FAULTY;
	snprintf(p->reason, sizeof p->reason, "%s", why);
}

void path_fail(struct path *p, const char *why) {
	if (p->state != P_READY) {
		if (p->conn) { /* a connection attempt: abandoned */
			nbdc_cancel(p->conn);
			p->conn = NULL;
			p->state = P_FAULTY;
			snprintf(p->reason, sizeof p->reason, "%s", why);
		}
		return;
	}
	logmsg("warning", "path %s (%s) failed: %s", p->id, p->dev, why);
	p->state = P_FAULTY;
	snprintf(p->reason, sizeof p->reason, "%s", why);
	p->failures++;
	ev_close(&p->ev, true); /* a reset (loop.c says why) */
	list_t taken;
	list_init(&taken);
	while (!list_empty(&p->inflight)) {
		struct part *pt = list_first(&p->inflight, struct part, link);
		list_del(&pt->link);
		pt->path = NULL;
		list_add_tail(&taken, &pt->link);
	}
	p->ninflight = 0;
	p->nfree = 0;
	for (uint32_t i = p->nslots; i > 0; i--) {
		p->slots[i - 1] = NULL;
		p->freeslots[p->nfree++] = i - 1;
	}
	p->txp = NULL;
	p->tx_off = 0;
	p->rxp = NULL;
	p->rx_len = p->rx_pos = 0;
	bool had = p->has_session;
	uint64_t token = p->session;
	p->has_session = false;
	char ev[512], esc[200], id[140];
	json_str(esc, sizeof esc, why);
	json_str(id, sizeof id, p->id);
	snprintf(ev, sizeof ev, "{\"ev\":\"path\",\"id\":%s,\"state\":\"faulty\",\"reason\":%s}",
		 id, esc);
	emit(ev);
	map_path_changed(p->map, p, had, token, &taken);
}

void path_set_link(struct path *p, bool up, const char *why) {
	p->link = up;
	if (!up)
		path_fail(p, why);
}

/* Reconnect a faulty path whose link is up, every polling_interval. */
void path_tick(struct path *p) {
	if (p->state != P_FAULTY || !p->link || now() < p->next_probe)
		return;
	p->next_probe = now() + p->map->s.polling;
	p->conn = nbdc_go(p, 2.0);
	if (p->conn)
		p->state = P_CONNECTING;
}
