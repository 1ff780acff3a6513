/* The device's NBD server for a client (QEMU) on a unix socket: the fixed
 * newstyle handshake, then requests routed through the device's segments.
 *
 * What the spec forbids is refused here, never passed to the paths (where the
 * array would cut the path's connection): a read longer than the advertised
 * maximum payload, an unknown command or flag get EINVAL; a request past the end
 * EINVAL (ENOSPC for writes); a write whose payload exceeds the maximum (the spec
 * lets a server treat a payload over 2^25 bytes as denial of service) closes the
 * connection, as does any malformed request or option, an option over 64 KiB, or
 * a handshake not finished within handshake_timeout (`set`). A client that does not read
 * its replies stops being read (its outstanding requests are bounded): nothing a
 * client sends costs more than its own connection. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "engine.h"
#include "nbd.h"

#define ICAP (NBD_MAX_OPTION + 16 + 4096)
#define MAX_OUTSTANDING 512
#define MAX_OUTSTANDING_BYTES (192u << 20)
#define READ_ROUNDS 16
#define TFLAGS (NBD_TF_HAS_FLAGS | NBD_TF_SEND_FLUSH | NBD_TF_SEND_FUA | NBD_TF_SEND_TRIM \
		| NBD_TF_SEND_WRITE_ZEROES)

enum fstate { F_FLAGS, F_OPTIONS, F_TRANS, F_CLOSING };
struct front {
	struct ev ev;
	list_t link, alink, dlink;
	struct dev *dev;
	enum fstate st;
	bool no_zeroes, dirty, paused, closed;
	uint8_t *in;
	size_t ilen;
	struct req *rxr; /* a write whose payload is still arriving */
	uint32_t rx_left;
	list_t reqs, out;
	int nreqs;
	size_t bytes, out_off;
	uint8_t *hs;
	size_t hlen, hcap, hoff;
	double deadline;
};

list_t all_fronts = { &all_fronts, &all_fronts };
double handshake_timeout = 10.0; /* seconds a client has to finish its handshake */
static list_t dirty_fronts = { &dirty_fronts, &dirty_fronts };
static void front_cb(struct ev *ev, uint32_t events);
static void front_write(struct front *fr);
static void front_close(struct front *fr, const char *why);
static void front_parse(struct front *fr);

static void mark_dirty(struct front *fr) {
	if (!fr->dirty && !fr->closed) {
		fr->dirty = true;
		list_add_tail(&dirty_fronts, &fr->dlink);
	}
}

static void hs_put(struct front *fr, const void *data, size_t len) {
	if (fr->hlen + len > fr->hcap) {
		size_t cap = fr->hcap ? fr->hcap * 2 : 1024;
		while (cap < fr->hlen + len)
			cap *= 2;
		uint8_t *b = realloc(fr->hs, cap);
		if (!b)
			return; /* the client gets a truncated handshake and gives up */
		fr->hs = b;
		fr->hcap = cap;
	}
	memcpy(fr->hs + fr->hlen, data, len);
	fr->hlen += len;
	mark_dirty(fr);
}

static void opt_reply(struct front *fr, uint32_t opt, uint32_t type, const void *data,
		      uint32_t len) {
	uint8_t h[20];
	put64(h, NBD_REP_MAGIC);
	put32(h + 8, opt);
	put32(h + 12, type);
	put32(h + 16, len);
	hs_put(fr, h, sizeof h);
	if (len)
		hs_put(fr, data, len);
}

static void free_front(void *p) {
	struct front *fr = p;
	free(fr->in);
	free(fr->hs);
	free(fr);
}

static void front_close(struct front *fr, const char *why) {
	if (fr->closed)
		return;
	if (why)
		logmsg("info", "a client of %s: connection closed: %s", fr->dev ? fr->dev->name : "?", why);
	fr->closed = true;
	ev_close(&fr->ev, false);
	while (!list_empty(&fr->reqs)) {
		struct req *r = list_first(&fr->reqs, struct req, flink);
		list_del(&r->flink);
		r->fr = NULL;
		if (r->pending <= 0)
			req_free(r); /* answered (waiting to be written) or never dispatched */
	}
	list_del(&fr->link);
	list_del(&fr->alink);
	list_del(&fr->dlink);
	if (fr->dev)
		dev_client_gone(fr->dev);
	defer_free(fr, free_front);
}

void front_accept(struct dev *d, int fd) {
	struct front *fr = calloc(1, sizeof *fr);
	if (fr)
		fr->in = malloc(ICAP);
	if (!fr || !fr->in || ev_add(&fr->ev, fd, EPOLLIN, front_cb)) {
		if (fr)
			free(fr->in);
		free(fr);
		close(fd);
		return;
	}
	/* replies of 1 MiB reads in one send, not in the default 208 KiB slices */
	int sndbuf = 4 << 20;
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) < 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
	fr->dev = d;
	list_init(&fr->reqs);
	list_init(&fr->out);
	list_init(&fr->dlink);
	list_add_tail(&d->fronts, &fr->link);
	list_add_tail(&all_fronts, &fr->alink);
	d->nfronts++;
	fr->st = F_FLAGS;
	fr->deadline = now() + handshake_timeout;
	uint8_t hello[18];
	put64(hello, NBD_MAGIC);
	put64(hello + 8, NBD_IHAVEOPT);
	put16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	hs_put(fr, hello, sizeof hello);
}

void front_close_dev(struct dev *d) {
	while (!list_empty(&d->fronts)) {
		struct front *fr = container_of(d->fronts.next, struct front, link);
		d->nfronts--;
		fr->dev = NULL;
		list_del(&fr->link);
		front_close(fr, NULL);
	}
}

/* Every client of the device answered and disconnected, as a restarting engine
 * would (QEMU reconnects, and then learns the device's new size: an LV extended
 * under a running guest). What a client had sent in full is answered first; a
 * write still arriving is dropped unanswered (the client sends it again). */
void front_drain_dev(struct dev *d) {
	list_for(pos, &d->fronts) {
		struct front *fr = container_of(pos, struct front, link);
		if (fr->closed || fr->st == F_CLOSING)
			continue;
		if (fr->rxr) {
			struct req *r = fr->rxr;
			fr->rxr = NULL;
			fr->nreqs--;
			fr->bytes -= r->len;
			req_free(r);
		}
		fr->st = F_CLOSING;
		fr->paused = false;
		ev_mod(&fr->ev, fr->ev.mask & ~(uint32_t)EPOLLIN);
		mark_dirty(fr);
	}
}

static void front_tick(struct front *fr) {
	if (fr->st < F_TRANS && now() > fr->deadline)
		front_close(fr, "handshake not finished in time");
}

void front_reply(struct req *r) {
	struct front *fr = r->fr;
	put32(r->rhdr, NBD_SIMPLE_REPLY_MAGIC);
	put32(r->rhdr + 4, r->err);
	put64(r->rhdr + 8, r->cookie);
	list_add_tail(&fr->out, &r->olink);
	mark_dirty(fr);
}

/* The NBD error for a request the array must not see, else 0. */
static uint32_t check(const struct dev *d, uint16_t cmd, uint16_t flags, uint64_t off,
		      uint32_t len) {
	uint16_t allowed;
	switch (cmd) {
	case NBD_CMD_READ: case NBD_CMD_WRITE: case NBD_CMD_FLUSH: case NBD_CMD_TRIM:
		allowed = NBD_CMD_FLAG_FUA; /* a no-op where nothing is written */
		break;
	case NBD_CMD_WRITE_ZEROES:
		allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;
		break;
	default:
		return NBD_EINVAL; /* not offered (CACHE, BLOCK_STATUS...) or unknown */
	}
	if (flags & ~allowed)
		return NBD_EINVAL;
	if (cmd == NBD_CMD_READ && len > NBD_MAX_REQUEST)
		return NBD_EINVAL;
	if (cmd != NBD_CMD_FLUSH && (len > d->size || off > d->size - len))
		return cmd == NBD_CMD_WRITE || cmd == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
	return 0;
}

/* The client broke a MUST of the protocol: nothing more is read from it; what it
 * asked before is answered, then the connection is closed. */
static void violation(struct front *fr, const char *why) {
	logmsg("info", "a client of %s: %s: closing its connection", fr->dev ? fr->dev->name : "?",
	       why);
	fr->st = F_CLOSING;
	ev_mod(&fr->ev, fr->ev.mask & ~(uint32_t)EPOLLIN);
	mark_dirty(fr);
}

static void pause_if_full(struct front *fr) {
	if (!fr->paused && (fr->nreqs >= MAX_OUTSTANDING || fr->bytes >= MAX_OUTSTANDING_BYTES)) {
		fr->paused = true;
		ev_mod(&fr->ev, fr->ev.mask & ~(uint32_t)EPOLLIN);
	}
}

static void dispatch(struct front *fr, struct req *r) {
	if (r->err || (!r->len && r->cmd != NBD_CMD_FLUSH) || !fr->dev)
		front_reply(r); /* refused here, or nothing to do */
	else
		dev_submit(fr->dev, r);
}

/* The option haggling; false when the connection must close. */
static bool on_option(struct front *fr, uint32_t opt, const uint8_t *data, uint32_t len) {
	const char *name = fr->dev ? fr->dev->name : "";
	size_t nl = strlen(name);
	if (opt == NBD_OPT_EXPORT_NAME) {
		if (len && (len != nl || memcmp(data, name, nl)))
			return false; /* the spec: no error reply possible */
		uint8_t info[10 + 124] = { 0 };
		put64(info, fr->dev->size);
		put16(info + 8, TFLAGS);
		hs_put(fr, info, fr->no_zeroes ? 10 : sizeof info);
		fr->st = F_TRANS;
		return true;
	}
	if (opt == NBD_OPT_GO || opt == NBD_OPT_INFO) {
		if (len < 6) {
			opt_reply(fr, opt, NBD_REP_ERR_INVALID, "malformed GO/INFO", 17);
			return true;
		}
		uint32_t n = get32(data);
		if (n > len - 6 || len != 4 + n + 2 + 2u * get16(data + 4 + n)) {
			opt_reply(fr, opt, NBD_REP_ERR_INVALID, "malformed GO/INFO", 17);
			return true;
		}
		if (n && (n != nl || memcmp(data + 4, name, nl))) {
			opt_reply(fr, opt, NBD_REP_ERR_UNKNOWN, "no such multipath device", 24);
			return true;
		}
		uint8_t ex[12], bs[14];
		put16(ex, NBD_INFO_EXPORT);
		put64(ex + 2, fr->dev->size);
		put16(ex + 10, TFLAGS);
		put16(bs, NBD_INFO_BLOCK_SIZE);
		put32(bs + 2, 1);
		put32(bs + 6, 4096);
		put32(bs + 10, NBD_MAX_REQUEST);
		opt_reply(fr, opt, NBD_REP_INFO, ex, sizeof ex);
		opt_reply(fr, opt, NBD_REP_INFO, bs, sizeof bs);
		opt_reply(fr, opt, NBD_REP_ACK, NULL, 0);
		if (opt == NBD_OPT_GO)
			fr->st = F_TRANS;
		return true;
	}
	if (opt == NBD_OPT_LIST) {
		uint8_t buf[4 + 128];
		put32(buf, (uint32_t)nl);
		memcpy(buf + 4, name, nl);
		opt_reply(fr, opt, NBD_REP_SERVER, buf, (uint32_t)(4 + nl));
		opt_reply(fr, opt, NBD_REP_ACK, NULL, 0);
		return true;
	}
	if (opt == NBD_OPT_ABORT) {
		opt_reply(fr, opt, NBD_REP_ACK, NULL, 0);
		fr->st = F_CLOSING; /* closed once the ack is written */
		return true;
	}
	opt_reply(fr, opt, NBD_REP_ERR_UNSUP, NULL, 0);
	return true;
}

/* Consume what is staged in fr->in (handshake or requests). */
static void front_parse(struct front *fr) {
	size_t pos = 0;
	while (!fr->closed && !fr->paused && !fr->rxr) {
		size_t avail = fr->ilen - pos;
		const uint8_t *b = fr->in + pos;
		if (fr->st == F_CLOSING) {
			pos = fr->ilen; /* after DISC or ABORT: nothing more is read */
			break;
		}
		if (fr->st == F_FLAGS) {
			if (avail < 4)
				break;
			uint32_t flags = get32(b);
			if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
				violation(fr, "unknown client flags");
				break;
			}
			fr->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
			fr->st = F_OPTIONS;
			pos += 4;
			continue;
		}
		if (fr->st == F_OPTIONS) {
			if (avail < 16)
				break;
			uint32_t len = get32(b + 12);
			if (get64(b) != NBD_IHAVEOPT || len > NBD_MAX_OPTION) {
				violation(fr, "a malformed option");
				break;
			}
			if (avail < 16 + (size_t)len)
				break;
			if (!on_option(fr, get32(b + 8), b + 16, len)) {
				violation(fr, "EXPORT_NAME of another export");
				break;
			}
			pos += 16 + len;
			continue;
		}
		if (avail < NBD_REQUEST_SIZE)
			break;
		uint16_t flags = get16(b + 4), cmd = get16(b + 6);
		uint64_t cookie = get64(b + 8), off = get64(b + 16);
		uint32_t len = get32(b + 24);
		if (get32(b) != NBD_REQUEST_MAGIC || (cmd == NBD_CMD_WRITE && len > NBD_MAX_REQUEST)) {
			violation(fr, "a malformed request, or a write over the maximum payload");
			break;
		}
		pos += NBD_REQUEST_SIZE;
		if (cmd == NBD_CMD_DISC) {
			fr->st = F_CLOSING; /* closed once every reply is written */
			continue;
		}
		uint32_t err = check(fr->dev, cmd, flags, off, len);
		bool buf = cmd == NBD_CMD_WRITE || (cmd == NBD_CMD_READ && !err);
		struct req *r = req_new(fr, cookie, cmd, flags, off, buf ? len : 0);
		if (!r) {
			front_close(fr, "out of memory");
			return;
		}
		r->len = len;
		r->err = err;
		list_add_tail(&fr->reqs, &r->flink);
		fr->nreqs++;
		fr->bytes += len * buf;
		if (cmd == NBD_CMD_WRITE && len) {
			size_t take = fr->ilen - pos < len ? fr->ilen - pos : len;
			memcpy(r->buf, fr->in + pos, take);
			pos += take;
			if (take < len) {
				fr->rxr = r;
				fr->rx_left = len - (uint32_t)take;
				break;
			}
		}
		dispatch(fr, r);
		pause_if_full(fr);
	}
	if (fr->closed)
		return;
	if (fr->st == F_CLOSING)
		pos = fr->ilen; /* nothing more is read */
	memmove(fr->in, fr->in + pos, fr->ilen - pos);
	fr->ilen -= pos;
	if (fr->st == F_CLOSING)
		mark_dirty(fr); /* to close once the output is written */
}

static void front_read(struct front *fr) {
	bool drained = false; /* a short read: the socket had no more (epoll says when it has) */
	for (int round = 0; round < READ_ROUNDS && !fr->closed && !fr->paused && !drained; round++) {
		ssize_t n;
		if (fr->rxr) {
			struct req *r = fr->rxr;
			n = recv(fr->ev.fd, r->buf + (r->len - fr->rx_left), fr->rx_left, 0);
			drained = n > 0 && (uint32_t)n < fr->rx_left;
			if (n > 0) {
				fr->rx_left -= (uint32_t)n;
				if (!fr->rx_left) {
					fr->rxr = NULL;
					dispatch(fr, r);
					pause_if_full(fr);
					front_parse(fr);
				}
				continue;
			}
		} else {
			if (fr->st == F_CLOSING) { /* drain and drop */
				uint8_t sink[4096];
				n = recv(fr->ev.fd, sink, sizeof sink, 0);
			} else {
				n = recv(fr->ev.fd, fr->in + fr->ilen, ICAP - fr->ilen, 0);
				drained = n > 0 && (size_t)n < ICAP - fr->ilen;
			}
			if (n > 0) {
				if (fr->st != F_CLOSING) {
					fr->ilen += (size_t)n;
					front_parse(fr);
				}
				continue;
			}
		}
		if (n == 0) { /* the client is done sending: answer what it asked, then close */
			if (fr->rxr) { /* a write cut short: never executed */
				struct req *r = fr->rxr;
				fr->rxr = NULL;
				fr->nreqs--;
				fr->bytes -= r->len;
				req_free(r);
			}
			fr->st = F_CLOSING;
			ev_mod(&fr->ev, fr->ev.mask & ~(uint32_t)EPOLLIN);
			mark_dirty(fr);
		} else if (errno != EAGAIN && errno != EINTR) {
			front_close(fr, "receive error");
		}
		return;
	}
}

static void front_write(struct front *fr) {
	if (fr->dirty) {
		list_del(&fr->dlink);
		fr->dirty = false;
	}
	if (fr->closed)
		return;
	while (fr->hoff < fr->hlen) {
		ssize_t w = send(fr->ev.fd, fr->hs + fr->hoff, fr->hlen - fr->hoff, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				goto blocked;
			front_close(fr, "send error");
			return;
		}
		fr->hoff += (size_t)w;
	}
	fr->hoff = fr->hlen = 0;
	while (!list_empty(&fr->out)) {
		struct iovec iov[64];
		int n = 0;
		size_t off = fr->out_off;
		for (list_t *l = fr->out.next; l != &fr->out && n < 62; l = l->next) {
			struct req *r = container_of(l, struct req, olink);
			size_t dlen = r->cmd == NBD_CMD_READ && !r->err ? r->len : 0;
			if (off < NBD_REPLY_SIZE) {
				iov[n].iov_base = r->rhdr + off;
				iov[n++].iov_len = NBD_REPLY_SIZE - off;
				if (dlen) {
					iov[n].iov_base = r->buf;
					iov[n++].iov_len = dlen;
				}
			} else {
				iov[n].iov_base = r->buf + (off - NBD_REPLY_SIZE);
				iov[n++].iov_len = dlen - (off - NBD_REPLY_SIZE);
			}
			off = 0;
		}
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w = sendmsg(fr->ev.fd, &mh, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				goto blocked;
			front_close(fr, "send error");
			return;
		}
		size_t left = (size_t)w;
		while (left && !list_empty(&fr->out)) {
			struct req *r = list_first(&fr->out, struct req, olink);
			size_t total = NBD_REPLY_SIZE + (r->cmd == NBD_CMD_READ && !r->err ? r->len : 0);
			size_t rest = total - fr->out_off;
			if (left < rest) {
				fr->out_off += left;
				break;
			}
			left -= rest;
			fr->out_off = 0;
			fr->nreqs--;
			fr->bytes -= r->buf ? r->len : 0;
			req_free(r);
		}
	}
	ev_mod(&fr->ev, fr->ev.mask & ~(uint32_t)EPOLLOUT);
	if (fr->paused && fr->nreqs < MAX_OUTSTANDING / 2 && fr->bytes < MAX_OUTSTANDING_BYTES / 2) {
		fr->paused = false;
		ev_mod(&fr->ev, fr->ev.mask | EPOLLIN);
		front_parse(fr); /* requests already staged */
		if (fr->closed)
			return;
	}
	if (fr->st == F_CLOSING && !fr->nreqs && list_empty(&fr->out) && fr->hoff == fr->hlen)
		front_close(fr, NULL);
	return;
blocked:
	ev_mod(&fr->ev, fr->ev.mask | EPOLLOUT);
}

static void front_cb(struct ev *ev, uint32_t events) {
	struct front *fr = container_of(ev, struct front, ev);
	if (events & (EPOLLERR | EPOLLHUP)) { /* gone both ways: nobody to answer */
		front_close(fr, NULL);
		return;
	}
	if (events & EPOLLOUT)
		front_write(fr);
	if (!fr->closed && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		front_read(fr);
}

void front_flush_all(void) {
	while (!list_empty(&dirty_fronts))
		front_write(list_first(&dirty_fronts, struct front, dlink));
}

void front_tick_all(void) {
	list_for(pos, &all_fronts) front_tick(container_of(pos, struct front, alink));
}
