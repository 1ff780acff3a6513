/* The event loop: one epoll set, a 10 ms tick for timers, batched writes flushed
 * once per iteration, and objects freed only after the iteration that dropped
 * them (an event for a closed fd may still be in the batch). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

#define TICK 0.01
static int epfd = -1;
static double cur;
static double next_tick;
static volatile int stopping;
static struct { void *obj; void (*fn)(void *); } *grave;
static size_t ngrave, capgrave;

void now_refresh(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	cur = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double now(void) { return cur; }

int ev_add(struct ev *ev, int fd, uint32_t mask, ev_cb *cb) {
	struct epoll_event e = { .events = mask, .data.ptr = ev };
	ev->fd = fd;
	ev->mask = mask;
	ev->cb = cb;
	if (epfd < 0) {
		epfd = epoll_create1(EPOLL_CLOEXEC);
		if (epfd < 0)
			return -1;
	}
	return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e);
}

void ev_mod(struct ev *ev, uint32_t mask) {
	if (ev->fd < 0 || ev->mask == mask)
		return;
	struct epoll_event e = { .events = mask, .data.ptr = ev };
	ev->mask = mask;
	epoll_ctl(epfd, EPOLL_CTL_MOD, ev->fd, &e);
}

void ev_close(struct ev *ev, bool reset) {
	if (ev->fd < 0)
		return;
	epoll_ctl(epfd, EPOLL_CTL_DEL, ev->fd, NULL);
	if (reset) {
		/* Reset, do not close: a closed socket keeps retransmitting what it had
		 * queued once the link returns, and the array would then apply a write
		 * already resent elsewhere, over newer data. */
		struct linger l = { .l_onoff = 1, .l_linger = 0 };
		setsockopt(ev->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
	}
	close(ev->fd);
	ev->fd = -1;
}

int ev_release(struct ev *ev) {
	int fd = ev->fd;
	if (fd >= 0)
		epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
	ev->fd = -1;
	return fd;
}

void defer_free(void *obj, void (*fn)(void *)) {
	if (ngrave == capgrave) {
		size_t cap = capgrave ? capgrave * 2 : 16;
		void *g = realloc(grave, cap * sizeof *grave);
		if (!g) { /* cannot defer: leak it rather than risk a use after free */
			return;
		}
		grave = g;
		capgrave = cap;
	}
	grave[ngrave].obj = obj;
	grave[ngrave].fn = fn;
	ngrave++;
}

static void bury(void) {
	for (size_t i = 0; i < ngrave; i++)
		grave[i].fn(grave[i].obj);
	ngrave = 0;
}

void loop_stop(void) { stopping = 1; }

int loop_run(void) {
	struct epoll_event evs[64];
	now_refresh();
	next_tick = cur + TICK;
	while (!stopping) {
		int timeout = (int)((next_tick - cur) * 1000.0) + 1;
		if (timeout < 0)
			timeout = 0;
		int n = epoll_wait(epfd, evs, 64, timeout);
		if (n < 0 && errno != EINTR)
			return -1;
		now_refresh();
		for (int i = 0; i < n; i++) {
			struct ev *ev = evs[i].data.ptr;
			if (ev->fd >= 0)
				ev->cb(ev, evs[i].events);
		}
		if (cur >= next_tick) {
			next_tick = cur + TICK;
			engine_tick();
		}
		engine_flush();
		bury();
	}
	return 0;
}
