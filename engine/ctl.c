/* The control socket: the agent's side of the engine (docs/dataplane.md, "The
 * control protocol"). Requests are lines `verb key=value ...` (values
 * percent-encoded); each gets one line back, `ok {json}` or `error {json}`, in
 * order. A connection that sent `watch` also gets `event {json}` lines (path
 * state changes, log lines). A device's listening socket comes with its `device`
 * line (SCM_RIGHTS). Commands are in cmds.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl.h"
#include "engine.h"
#include "sb.h"

#define LINE_MAX_ 65536
#define OUT_MAX (64u << 20)

static list_t ctls = { &ctls, &ctls };
static struct ev lev;
static double last_ctl;

static void ctl_free(void *p) {
	struct ctl *c = p;
	free(c->in);
	free(c->out);
	free(c);
}

void ctl_close(struct ctl *c) {
	if (c->closed)
		return;
	c->closed = true;
	for (int i = 0; i < c->nfds; i++)
		close(c->fds[i]);
	c->nfds = 0;
	ev_close(&c->ev, false);
	list_del(&c->link);
	last_ctl = now();
	defer_free(c, ctl_free);
}

static void ctl_flush(struct ctl *c) {
	while (c->ooff < c->olen) {
		ssize_t w = send(c->ev.fd, c->out + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				ev_mod(&c->ev, EPOLLIN | EPOLLOUT);
				return;
			}
			ctl_close(c);
			return;
		}
		c->ooff += (size_t)w;
	}
	c->ooff = c->olen = 0;
	ev_mod(&c->ev, EPOLLIN);
}

void ctl_send(struct ctl *c, const char *head, const char *json) {
	size_t hl = strlen(head), jl = strlen(json), need = hl + 1 + jl + 1;
	if (c->closed)
		return;
	if (c->olen + need > OUT_MAX) { /* a watcher that never reads */
		ctl_close(c);
		return;
	}
	if (c->olen + need > c->ocap) {
		size_t cap = c->ocap ? c->ocap : 4096;
		while (cap < c->olen + need)
			cap *= 2;
		char *o = realloc(c->out, cap);
		if (!o) {
			ctl_close(c);
			return;
		}
		c->out = o;
		c->ocap = cap;
	}
	memcpy(c->out + c->olen, head, hl);
	c->out[c->olen + hl] = ' ';
	memcpy(c->out + c->olen + hl + 1, json, jl);
	c->out[c->olen + need - 1] = '\n';
	c->olen += need;
	ctl_flush(c);
}

void emit(const char *json) {
	list_for(pos, &ctls) {
		struct ctl *c = container_of(pos, struct ctl, link);
		if (c->watch)
			ctl_send(c, "event", json);
	}
}

size_t json_str(char *out, size_t cap, const char *s) {
	struct sb b = { 0 };
	sb_str(&b, s);
	size_t n = 0;
	if (b.b && cap) {
		n = b.len < cap - 1 ? b.len : cap - 1;
		memcpy(out, b.b, n);
		out[n] = 0;
		if (n < b.len && n >= 2) { /* truncated: keep it a string */
			out[n - 2] = '"';
			out[n - 1] = 0;
			n--;
		}
	} else if (cap) {
		snprintf(out, cap, "\"\"");
	}
	sb_free(&b);
	return n;
}

void logmsg(const char *level, const char *fmt, ...) {
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fprintf(stderr, "%s: %s\n", level, msg);
	struct sb b = { 0 };
	sb_printf(&b, "{\"ev\":\"log\",\"level\":");
	sb_str(&b, level);
	sb_printf(&b, ",\"msg\":");
	sb_str(&b, msg);
	sb_printf(&b, "}");
	if (b.b)
		emit(b.b);
	sb_free(&b);
}

static void ctl_lines(struct ctl *c) {
	size_t start = 0;
	for (size_t i = 0; i < c->ilen && !c->closed; i++) {
		if (c->in[i] != '\n')
			continue;
		c->in[i] = 0;
		ctl_command(c, c->in + start);
		start = i + 1;
	}
	if (c->closed)
		return;
	memmove(c->in, c->in + start, c->ilen - start);
	c->ilen -= start;
	if (c->ilen >= LINE_MAX_) /* no line is that long */
		ctl_close(c);
}

static void ctl_cb(struct ev *ev, uint32_t events) {
	struct ctl *c = container_of(ev, struct ctl, ev);
	if (events & EPOLLOUT)
		ctl_flush(c);
	if (c->closed || !(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		return;
	union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int) * 8)]; } cm;
	struct iovec iov = { c->in + c->ilen, LINE_MAX_ + 1 - c->ilen };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b,
			     .msg_controllen = sizeof cm.b };
	ssize_t n = recvmsg(ev->fd, &mh, MSG_CMSG_CLOEXEC);
	if (n <= 0) {
		if (n == 0 || (errno != EAGAIN && errno != EINTR))
			ctl_close(c);
		return;
	}
	for (struct cmsghdr *h = CMSG_FIRSTHDR(&mh); h; h = CMSG_NXTHDR(&mh, h)) {
		if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
			continue;
		int k = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		int *fds = (int *)(void *)CMSG_DATA(h);
		for (int i = 0; i < k; i++) {
			if (c->nfds < (int)(sizeof c->fds / sizeof c->fds[0]))
				c->fds[c->nfds++] = fds[i];
			else
				close(fds[i]);
		}
	}
	c->ilen += (size_t)n;
	ctl_lines(c);
}

int ctl_take_fd(struct ctl *c) {
	if (!c->nfds)
		return -1;
	int fd = c->fds[0];
	memmove(c->fds, c->fds + 1, (size_t)(c->nfds - 1) * sizeof c->fds[0]);
	c->nfds--;
	return fd;
}

static void ctl_accept(struct ev *ev, uint32_t events) {
	(void)events;
	int fd = accept4(ev->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;
	struct ctl *c = calloc(1, sizeof *c);
	if (c)
		c->in = malloc(LINE_MAX_ + 1);
	if (!c || !c->in || ev_add(&c->ev, fd, EPOLLIN, ctl_cb)) {
		if (c)
			free(c->in);
		free(c);
		close(fd);
		return;
	}
	list_add_tail(&ctls, &c->link);
}

int ctl_listen(const char *path) {
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof a.sun_path)
		return -1;
	strcpy(a.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	unlink(path);
	mode_t old = umask(077);
	int rc = bind(fd, (struct sockaddr *)&a, sizeof a);
	umask(old);
	if (rc < 0 || listen(fd, 16) < 0 || ev_add(&lev, fd, EPOLLIN, ctl_accept) < 0) {
		close(fd);
		return -1;
	}
	last_ctl = now();
	return 0;
}

/* Seconds since the last control connection went away (0 while one is open). */
double ctl_idle(void) { return list_empty(&ctls) ? now() - last_ctl : 0; }
