/* A client's request and its parts: one part per segment it touches (a FLUSH:
 * one per map of the device). The request is answered when every part ended,
 * with the first error a part got; a request with a hook (the engine's own I/O,
 * copy-on-write bookkeeping) runs it instead. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "nbd.h"

struct req *req_new(struct front *fr, uint64_t cookie, uint16_t cmd, uint16_t flags,
		    uint64_t off, uint32_t len) {
	struct req *r = calloc(1, sizeof *r);
	if (!r)
		return NULL;
	list_init(&r->flink);
	list_init(&r->olink);
	list_init(&r->plink);
	r->fr = fr;
	r->cookie = cookie;
	r->cmd = cmd;
	r->flags = flags;
	r->off = off;
	r->len = len;
	if ((cmd == NBD_CMD_READ || cmd == NBD_CMD_WRITE) && len) {
		r->buf = malloc(len);
		if (!r->buf) {
			free(r);
			return NULL;
		}
	}
	return r;
}

void req_free(struct req *r) {
	list_del(&r->flink);
	list_del(&r->olink);
	list_del(&r->plink);
	free(r->track);
	if (r->parts != &r->one)
		free(r->parts);
	free(r->buf);
	free(r);
}

void part_done(struct part *p, uint32_t err) {
	struct req *r = p->req;
	p->path = NULL;
	list_del(&p->link);
	if (err && !r->err)
		r->err = err;
	if (--r->pending > 0)
		return;
	req_finish(r);
}

void req_finish(struct req *r) {
	if (r->done)
		r->done(r);
	else if (r->fr)
		front_reply(r);
	else
		req_free(r); /* its client went away meanwhile */
}
