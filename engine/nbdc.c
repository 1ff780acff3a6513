/* The NBD client handshakes the engine makes to the array, non-blocking: GO on a
 * path (asking for the session id the array fences by: a path without one is
 * never used) and X_FENCE (a new connection through a path that works, naming
 * the dead sessions; the array acks once none of them can execute anything). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine.h"
#include "nbd.h"

enum { K_GO, K_FENCE };
enum { C_CONNECT, C_GREET, C_SEND, C_REPLY };
#define REPLY_MAX 65536u

struct nbdc {
	struct ev ev;
	list_t link;
	int kind, state;
	struct path *path; /* GO: the path; FENCE: the path it goes through */
	struct map *map;
	uint8_t out[32 + 8 * NBD_MAX_FENCE + 300];
	size_t olen, ooff;
	uint8_t *in;
	size_t ilen, need;
	uint8_t hdr[20];
	bool have_hdr;
	double deadline, timeout;
	uint64_t session;
	bool got_session;
};

static list_t all_nbdc = { &all_nbdc, &all_nbdc };
static void nbdc_cb(struct ev *ev, uint32_t events);

static struct nbdc *start(int kind, struct path *p, double timeout) {
	struct nbdc *c = calloc(1, sizeof *c);
	if (!c)
		return NULL;
	c->in = malloc(REPLY_MAX + 20);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (!c->in || fd < 0)
		goto fail;
	struct sockaddr_in src = p->src;
	src.sin_port = 0;
	if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0)
		goto fail;
	if (connect(fd, (struct sockaddr *)&p->dst, sizeof p->dst) < 0 && errno != EINPROGRESS)
		goto fail;
	if (ev_add(&c->ev, fd, EPOLLOUT, nbdc_cb) < 0)
		goto fail;
	c->kind = kind;
	c->path = p;
	c->state = C_CONNECT;
	c->timeout = timeout;
	c->deadline = now() + timeout;
	c->need = 18;
	list_add_tail(&all_nbdc, &c->link);
	return c;
fail:
	snprintf(p->reason, sizeof p->reason, "cannot connect: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
	free(c->in);
	free(c);
	return NULL;
}

static void option(struct nbdc *c, uint32_t opt, const uint8_t *data, uint32_t len) {
	put32(c->out, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	put64(c->out + 4, NBD_IHAVEOPT);
	put32(c->out + 12, opt);
	put32(c->out + 16, len);
	memcpy(c->out + 20, data, len);
	c->olen = 20 + len;
}

struct nbdc *nbdc_go(struct path *p, double timeout) {
	size_t nlen = strlen(p->export_);
	uint8_t data[300];
	if (nlen > 256)
		return NULL;
	struct nbdc *c = start(K_GO, p, timeout);
	if (!c)
		return NULL;
	put32(data, (uint32_t)nlen);
	memcpy(data + 4, p->export_, nlen);
	put16(data + 4 + nlen, 1);
	put16(data + 6 + nlen, NBD_INFO_X_SESSION);
	option(c, NBD_OPT_GO, data, (uint32_t)(8 + nlen));
	return c;
}

struct nbdc *nbdc_fence(struct map *m, struct path *via, const uint64_t *tokens, int n,
			double timeout) {
	uint8_t data[4 + 8 * NBD_MAX_FENCE];
	if (n < 1 || n > NBD_MAX_FENCE)
		return NULL;
	struct nbdc *c = start(K_FENCE, via, timeout);
	if (!c)
		return NULL;
	c->map = m;
	put32(data, (uint32_t)n);
	for (int i = 0; i < n; i++)
		put64(data + 4 + 8 * i, tokens[i]);
	option(c, NBD_OPT_X_FENCE, data, (uint32_t)(4 + 8 * n));
	return c;
}

static void drop(struct nbdc *c, bool close_fd) {
	if (close_fd)
		ev_close(&c->ev, true);
	list_del(&c->link);
	free(c->in);
	c->in = NULL;
	defer_free(c, free);
}

void nbdc_cancel(struct nbdc *c) { drop(c, true); }

static void finish(struct nbdc *c, bool ok, const char *why) {
	if (c->kind == K_GO) { /* success goes through go_ready */
		struct path *p = c->path;
		drop(c, true);
		path_connect_failed(p, why);
		return;
	}
	struct map *m = c->map;
	if (ok) { /* leave option haggling politely, then reset */
		uint8_t abort_[16];
		put64(abort_, NBD_IHAVEOPT);
		put32(abort_ + 8, NBD_OPT_ABORT);
		put32(abort_ + 12, 0);
		ssize_t w = send(c->ev.fd, abort_, sizeof abort_, MSG_NOSIGNAL | MSG_DONTWAIT);
		(void)w;
	}
	drop(c, true);
	map_fenced(m, ok, why);
}

static void go_ready(struct nbdc *c) {
	struct path *p = c->path;
	int fd = ev_release(&c->ev);
	uint64_t session = c->session;
	drop(c, false);
	path_ready(p, fd, session);
}

/* One option reply (header in c->hdr, data in c->in); false when it ended. */
static bool on_reply(struct nbdc *c) {
	uint64_t magic = get64(c->hdr);
	uint32_t opt = get32(c->hdr + 8), type = get32(c->hdr + 12), len = get32(c->hdr + 16);
	char why[512];
	if (magic != NBD_REP_MAGIC) {
		finish(c, false, "garbled option reply from the array");
		return false;
	}
	if (c->kind == K_FENCE) {
		if (opt != NBD_OPT_X_FENCE || len > 4096) {
			finish(c, false, "garbled reply to a fence request");
		} else if (type != NBD_REP_ACK) {
			snprintf(why, sizeof why, "the array refused to fence: %.*s", (int)(len > 150 ? 150 : len),
				 (const char *)c->in);
			finish(c, false, why);
		} else {
			finish(c, true, "");
		}
		return false;
	}
	if (type == NBD_REP_INFO && len == 10 && get16(c->in) == NBD_INFO_X_SESSION) {
		c->session = get64(c->in + 2);
		c->got_session = true;
	} else if (type == NBD_REP_ACK) {
		if (!c->got_session) {
			finish(c, false, "the array gives no session id: it cannot fence");
			return false;
		}
		go_ready(c);
		return false;
	} else if (type & NBD_REP_ERR) {
		snprintf(why, sizeof why, "the array refused LUN %s: %.*s", c->path->export_,
			 (int)(len > 100 ? 100 : len), (const char *)c->in);
		finish(c, false, why);
		return false;
	}
	return true;
}

static void do_send(struct nbdc *c) {
	while (c->ooff < c->olen) {
		ssize_t w = send(c->ev.fd, c->out + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN) {
				ev_mod(&c->ev, EPOLLOUT);
				return;
			}
			finish(c, false, "connection lost during the handshake");
			return;
		}
		c->ooff += (size_t)w;
	}
	c->state = C_REPLY;
	c->ilen = 0;
	c->need = 20;
	c->have_hdr = false;
	ev_mod(&c->ev, EPOLLIN);
}

static void do_read(struct nbdc *c) {
	for (;;) {
		ssize_t n = recv(c->ev.fd, c->in + c->ilen, c->need - c->ilen, 0);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
			finish(c, false, n == 0 ? "the array closed the connection during the handshake"
						: "connection lost during the handshake");
			return;
		}
		if (n < 0)
			return;
		c->ilen += (size_t)n;
		if (c->ilen < c->need)
			continue;
		if (c->state == C_GREET) {
			if (get64(c->in) != NBD_MAGIC || get64(c->in + 8) != NBD_IHAVEOPT) {
				finish(c, false, "not an NBD array");
				return;
			}
			c->state = C_SEND;
			do_send(c);
			return;
		}
		if (!c->have_hdr) {
			memcpy(c->hdr, c->in, 20);
			uint32_t len = get32(c->hdr + 16);
			if (len > REPLY_MAX) {
				finish(c, false, "oversized option reply");
				return;
			}
			c->have_hdr = true;
			c->ilen = 0;
			c->need = len;
			if (len)
				continue;
		}
		if (!on_reply(c))
			return;
		c->have_hdr = false;
		c->ilen = 0;
		c->need = 20;
	}
}

static void nbdc_cb(struct ev *ev, uint32_t events) {
	struct nbdc *c = container_of(ev, struct nbdc, ev);
	if (c->state == C_CONNECT) {
		int err = 0;
		socklen_t l = sizeof err;
		getsockopt(ev->fd, SOL_SOCKET, SO_ERROR, &err, &l);
		if (err || (events & EPOLLERR)) {
			char why[160];
			snprintf(why, sizeof why, "cannot connect: %s", strerror(err ? err : ECONNREFUSED));
			finish(c, false, why);
			return;
		}
		c->state = C_GREET;
		c->ilen = 0;
		c->need = 18;
		if (c->kind == K_GO)
			c->deadline = now() + c->timeout; /* connect, then handshake: each its time */
		ev_mod(ev, EPOLLIN);
		return;
	}
	if (c->state == C_SEND) {
		do_send(c);
		return;
	}
	do_read(c);
}

void nbdc_tick_all(void) {
again:
	list_for(pos, &all_nbdc) {
		struct nbdc *c = container_of(pos, struct nbdc, link);
		if (now() > c->deadline) {
			finish(c, false, c->kind == K_FENCE ? "timed out" : "TimeoutError: timed out");
			goto again; /* finishing may start or end others */
		}
	}
}
