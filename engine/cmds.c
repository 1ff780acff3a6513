/* The control protocol's commands (docs/dataplane.md): maps, paths, link states,
 * devices and their segment tables, snapshot stores, a sync that removes what was
 * not named, statistics. Everything the agent sends is checked here: a bad line gets an
 * error reply and changes nothing. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"
#include "engine.h"
#include "nbd.h"
#include "sb.h"

#define MAX_ARGS 300
#define MAX_PATHS 64
#define MAX_SEGS 256

struct args { int n; char *k[MAX_ARGS], *v[MAX_ARGS]; };

static int unhex(int ch) {
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	ch = tolower(ch);
	return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

static bool decode(char *s) { /* %XX in place; false if malformed */
	char *o = s;
	for (; *s; s++) {
		if (*s == '%') {
			int a = unhex((unsigned char)s[1]), b = a < 0 ? -1 : unhex((unsigned char)s[2]);
			if (a < 0 || b < 0 || (a == 0 && b == 0))
				return false;
			*o++ = (char)(a * 16 + b);
			s += 2;
		} else {
			*o++ = *s;
		}
	}
	*o = 0;
	return true;
}

static const char *arg(const struct args *a, const char *key) {
	for (int i = 0; i < a->n; i++)
		if (!strcmp(a->k[i], key))
			return a->v[i];
	return NULL;
}

static bool num_u64(const char *s, uint64_t *out) {
	if (!s || !*s || !isdigit((unsigned char)*s))
		return false;
	errno = 0;
	char *end;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end)
		return false;
	*out = v;
	return true;
}

static bool num_pos(const char *s, double *out) {
	if (!s || !*s)
		return false;
	char *end;
	double v = strtod(s, &end);
	if (*end || !isfinite(v) || v <= 0)
		return false;
	*out = v;
	return true;
}

static bool addr(const char *s, struct sockaddr_in *a, bool port) {
	char host[64];
	const char *colon = port ? strrchr(s, ':') : NULL;
	size_t hl = colon ? (size_t)(colon - s) : strlen(s);
	uint64_t p = 0;
	if (hl >= sizeof host || (port && (!colon || !num_u64(colon + 1, &p) || !p || p > 65535)))
		return false;
	memcpy(host, s, hl);
	host[hl] = 0;
	memset(a, 0, sizeof *a);
	a->sin_family = AF_INET;
	a->sin_port = htons((uint16_t)p);
	return inet_pton(AF_INET, host, &a->sin_addr) == 1;
}

static struct path *path_find(const char *id, int *where) {
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		for (int i = 0; i < m->npaths; i++)
			if (!strcmp(m->paths[i]->id, id)) {
				if (where)
					*where = i;
				return m->paths[i];
			}
	}
	return NULL;
}

static void path_remove(struct path *p) {
	struct map *m = p->map;
	int i = 0;
	path_fail(p, "removed by a rescan");
	if (path_find(p->id, &i) == p) {
		memmove(m->paths + i, m->paths + i + 1, (size_t)(m->npaths - i - 1) * sizeof *m->paths);
		m->npaths--;
	}
	if (m->current == p)
		m->current = NULL;
	ev_close(&p->ev, true);
	list_del(&p->dlink);
	p->dirty = false;
	defer_free(p, path_free);
	state_save();
}

static void map_remove(struct map *m) {
	map_close(m);
	while (m->npaths)
		path_remove(m->paths[m->npaths - 1]);
	list_del(&m->link);
	dev_relink();
	defer_free(m, map_free);
	state_save();
}

static int by_index(const void *a, const void *b) {
	const struct path *x = *(struct path *const *)a, *y = *(struct path *const *)b;
	return (x->index > y->index) - (x->index < y->index);
}

static const char *cmd_map(const struct args *a) {
	const char *id = arg(a, "id"), *v;
	struct settings s;
	uint64_t size = 0, n;
	if (!id || !*id || strlen(id) >= sizeof ((struct map *)0)->id)
		return "map: id= is required (at most 127 bytes)";
	struct map *m = map_find(id);
	s = m ? m->s : (struct settings){ .multibus = true, .npr = NPR_QUEUE, .polling = 5,
					   .io_timeout = 30, .fence_timeout = 5, .max_tries = 5,
					   .hold_mask = (1u << NBD_CMD_WRITE) | (1u << NBD_CMD_TRIM)
							| (1u << NBD_CMD_WRITE_ZEROES) };
	if ((v = arg(a, "size")) && !num_u64(v, &size))
		return "map: size= must be a number of bytes";
	if ((v = arg(a, "policy")))
		s.multibus = !strcmp(v, "multibus");
	if ((v = arg(a, "failback")))
		s.failback_manual = !strcmp(v, "manual");
	if ((v = arg(a, "no_path_retry"))) {
		if (!strcmp(v, "queue"))
			s.npr = NPR_QUEUE;
		else if (!strcmp(v, "fail"))
			s.npr = NPR_FAIL;
		else if (num_u64(v, &n) && n < 1000000)
			s.npr = NPR_COUNT, s.npr_n = (int)n;
		else
			return "map: no_path_retry= must be queue, fail or a count";
	}
	if ((v = arg(a, "polling_interval")) && !num_pos(v, &s.polling))
		return "map: polling_interval= must be a positive number of seconds";
	if ((v = arg(a, "io_timeout")) && !num_pos(v, &s.io_timeout))
		return "map: io_timeout= must be a positive number of seconds";
	if ((v = arg(a, "fence_timeout")) && !num_pos(v, &s.fence_timeout))
		return "map: fence_timeout= must be a positive number of seconds";
	if ((v = arg(a, "max_tries"))) {
		if (!num_u64(v, &n) || !n || n > 1000)
			return "map: max_tries= must be 1 to 1000";
		s.max_tries = (int)n;
	}
	if ((v = arg(a, "hold"))) { /* commands held for a fence: "1,4,6"; "-" for none */
		uint32_t mask = 0;
		char buf[64];
		snprintf(buf, sizeof buf, "%s", v);
		for (char *save, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
			if (!strcmp(t, "-"))
				continue;
			if (!num_u64(t, &n) || n > 31)
				return "map: hold= must list command numbers";
			mask |= 1u << n;
		}
		s.hold_mask = mask;
	}
	if (!m) {
		m = map_new(id);
		if (!m)
			return "out of memory";
		dev_relink();
	}
	m->s = s;
	if (arg(a, "size"))
		m->size = size;
	m->seen = true;
	map_fence_kick(m);
	return NULL;
}

static const char *cmd_path(const struct args *a) {
	const char *id = arg(a, "id"), *mid = arg(a, "map"), *v;
	struct sockaddr_in src, dst;
	uint64_t idx = 0, up = 1;
	if (!id || !*id || strlen(id) >= sizeof ((struct path *)0)->id)
		return "path: id= is required (at most 63 bytes)";
	struct map *m = mid ? map_find(mid) : NULL;
	if (!m)
		return "path: map= must name a map";
	if (!(v = arg(a, "src")) || !addr(v, &src, false))
		return "path: src= must be an IPv4 address";
	if (!(v = arg(a, "target")) || !addr(v, &dst, true))
		return "path: target= must be IPv4:port";
	const char *export_ = arg(a, "export"), *ifname = arg(a, "ifname"), *dev = arg(a, "dev");
	if (!export_ || strlen(export_) > 255)
		return "path: export= is required (at most 255 bytes)";
	if (ifname && strlen(ifname) >= 16)
		return "path: ifname= is too long";
	if ((v = arg(a, "index")) && (!num_u64(v, &idx) || idx > 1000000))
		return "path: index= must be a number";
	if ((v = arg(a, "up")) && (!num_u64(v, &up) || up > 1))
		return "path: up= must be 0 or 1";
	struct path *p = path_find(id, NULL);
	if (p && (p->map != m || memcmp(&p->src, &src, sizeof src) || memcmp(&p->dst, &dst, sizeof dst)
		  || strcmp(p->export_, export_))) {
		path_remove(p); /* another path under the same name: a new one */
		p = NULL;
	}
	if (!p) {
		if (m->npaths >= MAX_PATHS)
			return "path: too many paths in this map";
		struct path **ps = realloc(m->paths, (size_t)(m->npaths + 1) * sizeof *ps);
		if (!ps || !(p = path_new(m, id)))
			return "out of memory";
		m->paths = ps;
		m->paths[m->npaths++] = p;
		p->src = src;
		p->dst = dst;
		snprintf(p->export_, sizeof p->export_, "%s", export_);
	}
	p->index = (int)idx;
	snprintf(p->dev, sizeof p->dev, "%s", dev ? dev : id);
	snprintf(p->ifname, sizeof p->ifname, "%s", ifname ? ifname : "");
	p->ctl_link = !p->ifname[0];
	qsort(m->paths, (size_t)m->npaths, sizeof *m->paths, by_index);
	char why[64];
	snprintf(why, sizeof why, "link down on %s", p->ifname[0] ? p->ifname : p->dev);
	path_set_link(p, p->ctl_link ? up != 0 : link_sysfs_up(p->ifname), why);
	p->seen = true;
	path_tick(p);
	return NULL;
}

static const char *cmd_link(const struct args *a) {
	const char *v = arg(a, "up");
	uint64_t up;
	struct path *p = path_find(arg(a, "id") ? arg(a, "id") : "", NULL);
	if (!p)
		return "link: id= must name a path";
	if (!num_u64(v, &up) || up > 1)
		return "link: up= must be 0 or 1";
	path_set_link(p, up != 0, arg(a, "why") ? arg(a, "why") : "link down");
	if (up)
		path_tick(p);
	return NULL;
}

/* The segments named by every ``key=START:LENGTH:MAP_OFFSET:MAP_ID`` of a line. */
static const char *parse_segs(const struct args *a, const char *key, struct seg *segs, int *n) {
	*n = 0;
	for (int i = 0; i < a->n; i++) {
		if (strcmp(a->k[i], key))
			continue;
		char buf[200], *save, *f[4];
		snprintf(buf, sizeof buf, "%s", a->v[i]);
		f[0] = strtok_r(buf, ":", &save);
		f[1] = f[0] ? strtok_r(NULL, ":", &save) : NULL;
		f[2] = f[1] ? strtok_r(NULL, ":", &save) : NULL;
		f[3] = f[2] ? strtok_r(NULL, "", &save) : NULL;
		if (*n >= MAX_SEGS || !f[3] || !num_u64(f[0], &segs[*n].start) ||
		    !num_u64(f[1], &segs[*n].len) || !num_u64(f[2], &segs[*n].moff) ||
		    strlen(f[3]) >= sizeof segs[*n].map_id)
			return "segments must be START:LENGTH:MAP_OFFSET:MAP_ID";
		snprintf(segs[*n].map_id, sizeof segs[*n].map_id, "%s", f[3]);
		segs[*n].map = NULL;
		(*n)++;
	}
	return NULL;
}

static bool segs_equal(const struct seg *a, int na, const struct seg *b, int nb) {
	if (na != nb)
		return false;
	for (int i = 0; i < na; i++)
		if (a[i].start != b[i].start || a[i].len != b[i].len || a[i].moff != b[i].moff ||
		    strcmp(a[i].map_id, b[i].map_id))
			return false;
	return true;
}

/* store id=ID size=BYTES chunk=BYTES cow=SEG... org=SEG...: a snapshot's exception
 * store on its COW LV, and its origin's segments (copies are read there). */
static const char *cmd_store(const struct args *a) {
	static struct seg cow[MAX_SEGS], org[MAX_SEGS];
	const char *id = arg(a, "id");
	uint64_t size, chunk;
	int nc, no;
	if (!id || !*id || strlen(id) >= sizeof ((struct store *)0)->id)
		return "store: id= is required (at most 127 bytes)";
	if (!num_u64(arg(a, "size"), &size) || !num_u64(arg(a, "chunk"), &chunk) || chunk > UINT32_MAX)
		return "store: size= and chunk= must be numbers of bytes";
	if (parse_segs(a, "cow", cow, &nc) || parse_segs(a, "org", org, &no))
		return "store: cow= and org= must be START:LENGTH:MAP_OFFSET:MAP_ID";
	return store_set(id, size, (uint32_t)chunk, cow, nc, org, no);
}

static const char *cmd_device(struct ctl *c, const struct args *a) {
	const char *name = arg(a, "name"), *v;
	uint64_t size;
	struct seg segs[MAX_SEGS];
	int n = 0;
	int fd = (v = arg(a, "fd")) && !strcmp(v, "1") ? ctl_take_fd(c) : -1;
	const char *err = NULL;
	if (!name || !*name || strlen(name) >= sizeof ((struct dev *)0)->name)
		err = "device: name= is required (at most 127 bytes)";
	else if (!num_u64(arg(a, "size"), &size))
		err = "device: size= must be a number of bytes";
	else if (v && !strcmp(v, "1") && fd < 0)
		err = "device: fd=1 but no file descriptor came with the line";
	if (!err && parse_segs(a, "seg", segs, &n))
		err = "device: seg= must be START:LENGTH:MAP_OFFSET:MAP_ID";
	struct store *cows[MAX_COWS], *snap = NULL;
	int ncows = 0;
	for (int i = 0; !err && i < a->n; i++) {
		struct store *st = NULL;
		if (!strcmp(a->k[i], "cow") || !strcmp(a->k[i], "snap")) {
			st = store_find(a->v[i]);
			if (!st)
				err = "device: cow= and snap= must name a store";
			else if (!segs_equal(st->org, st->norg, segs, n))
				err = "device: its segments are not its store's origin";
		}
		if (err || !st)
			continue;
		if (!strcmp(a->k[i], "snap"))
			snap = st;
		else if (ncows < MAX_COWS)
			cows[ncows++] = st;
		else
			err = "device: too many snapshots (at most 16)";
	}
	if (!err && snap && ncows)
		err = "device: an origin (cow=) or a snapshot (snap=), not both";
	if (!err)
		err = seg_check(segs, n, size);
	struct dev *d = err ? NULL : dev_find(name);
	if (d && (!dev_same_mapping(d, segs, n) || d->snap != snap || d->snap_gone)) {
		dev_retire(d);
		d = NULL;
	}
	if (!err && !d) {
		d = calloc(1, sizeof *d);
		if (!d) {
			err = "out of memory";
		} else {
			snprintf(d->name, sizeof d->name, "%s", name);
			list_init(&d->fronts);
			list_init(&d->parked);
			list_init(&d->busy);
			list_init(&d->suspw);
			d->lev.fd = -1;
			list_add_tail(&all_devs, &d->link);
		}
	}
	struct seg *copy = err ? NULL : malloc((size_t)n * sizeof *copy);
	if (!err && !copy)
		err = "out of memory";
	if (err) {
		if (fd >= 0)
			close(fd);
		return err;
	}
	memcpy(copy, segs, (size_t)n * sizeof *copy);
	free(d->segs);
	d->segs = copy;
	d->nsegs = n;
	d->size = size;
	d->seen = true;
	d->snap = snap;
	bool added = false;
	for (int i = 0; i < ncows; i++) {
		int j = 0;
		while (j < d->ncows && d->cows[j] != cows[i])
			j++;
		added |= j == d->ncows;
	}
	for (int i = 0; i < ncows; i++)
		d->cows[i] = cows[i];
	d->ncows = ncows;
	if (added)
		cow_attach(d);
	dev_relink();
	if (fd >= 0)
		dev_listen(d, fd);
	return NULL;
}

static void stats(struct sb *o) {
	sb_printf(o, "{\"pid\":%d,\"maps\":[", (int)getpid());
	bool first = true;
	list_for(pos, &all_maps) {
		sb_printf(o, "%s", first ? "" : ",");
		map_stats(container_of(pos, struct map, link), o);
		first = false;
	}
	sb_printf(o, "],\"devices\":[");
	first = true;
	list_for(pos, &all_devs) {
		struct dev *d = container_of(pos, struct dev, link);
		sb_printf(o, "%s{\"name\":", first ? "" : ",");
		sb_str(o, d->name);
		sb_printf(o, ",\"size\":%llu,\"clients\":%d,\"segments\":%d,\"kind\":\"%s\","
			  "\"parked\":%s,\"stores\":[", (unsigned long long)d->size, d->nfronts,
			  d->nsegs, d->snap || d->snap_gone ? "snapshot" : d->ncows ? "origin" : "linear",
			  list_empty(&d->parked) ? "false" : "true");
		for (int i = 0; i < d->ncows; i++) {
			sb_printf(o, "%s", i ? "," : "");
			sb_str(o, d->cows[i]->id);
		}
		if (d->snap)
			sb_str(o, d->snap->id);
		sb_printf(o, "]}");
		first = false;
	}
	sb_printf(o, "],\"stores\":[");
	first = true;
	list_for(pos, &all_stores) {
		sb_printf(o, "%s", first ? "" : ",");
		store_stats(container_of(pos, struct store, link), o);
		first = false;
	}
	sb_printf(o, "]}");
}

static void sync_end(void) {
	list_for(pos, &all_devs) {
		struct dev *d = container_of(pos, struct dev, link);
		if (!d->seen)
			dev_free(d);
	}
	list_for(pos, &all_stores) {
		struct store *st = container_of(pos, struct store, link);
		if (!st->seen)
			store_del(st);
	}
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		for (int i = m->npaths; i > 0; i--)
			if (!m->paths[i - 1]->seen)
				path_remove(m->paths[i - 1]);
	}
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		if (!m->seen)
			map_remove(m);
	}
}

static void sync_begin(void) {
	list_for(pos, &all_devs) container_of(pos, struct dev, link)->seen = false;
	list_for(pos, &all_stores) container_of(pos, struct store, link)->seen = false;
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		m->seen = false;
		for (int i = 0; i < m->npaths; i++)
			m->paths[i]->seen = false;
	}
}

void ctl_command(struct ctl *c, char *line) {
	struct args a = { 0 };
	char *save, *verb = strtok_r(line, " ", &save);
	const char *err = NULL;
	struct sb out = { 0 };
	for (char *t; !err && (t = strtok_r(NULL, " ", &save));) {
		char *eq = strchr(t, '=');
		if (!eq || a.n >= MAX_ARGS) {
			err = "arguments are key=value";
			break;
		}
		*eq = 0;
		a.k[a.n] = t;
		a.v[a.n] = eq + 1;
		if (!decode(a.v[a.n]))
			err = "a value is not percent-encoded right";
		a.n++;
	}
	if (err || !verb) {
		err = err ? err : "empty line";
	} else if (!strcmp(verb, "hello")) {
		sb_printf(&out, "{\"version\":1,\"pid\":%d}", (int)getpid());
	} else if (!strcmp(verb, "watch")) {
		c->watch = true;
	} else if (!strcmp(verb, "map")) {
		err = cmd_map(&a);
	} else if (!strcmp(verb, "path")) {
		err = cmd_path(&a);
	} else if (!strcmp(verb, "link")) {
		err = cmd_link(&a);
	} else if (!strcmp(verb, "device")) {
		err = cmd_device(c, &a);
	} else if (!strcmp(verb, "del-device")) {
		struct dev *d = dev_find(arg(&a, "name") ? arg(&a, "name") : "");
		if (d)
			dev_free(d);
	} else if (!strcmp(verb, "store")) {
		err = cmd_store(&a);
	} else if (!strcmp(verb, "del-store")) {
		struct store *st = store_find(arg(&a, "id") ? arg(&a, "id") : "");
		if (st)
			store_del(st);
	} else if (!strcmp(verb, "reopen")) {
		struct dev *d = dev_find(arg(&a, "name") ? arg(&a, "name") : "");
		if (!d)
			err = "reopen: name= must name a device";
		else
			front_drain_dev(d);
	} else if (!strcmp(verb, "del-path")) {
		struct path *p = path_find(arg(&a, "id") ? arg(&a, "id") : "", NULL);
		if (p)
			path_remove(p);
	} else if (!strcmp(verb, "del-map")) {
		struct map *m = map_find(arg(&a, "id") ? arg(&a, "id") : "");
		if (m)
			map_remove(m);
	} else if (!strcmp(verb, "fail-path")) {
		struct path *p = path_find(arg(&a, "id") ? arg(&a, "id") : "", NULL);
		if (!p)
			err = "fail-path: id= must name a path";
		else
			path_fail(p, arg(&a, "why") ? arg(&a, "why") : "failed by the agent");
	} else if (!strcmp(verb, "set")) {
		const char *v = arg(&a, "handshake_timeout"), *lp = arg(&a, "link_poll");
		const char *cp = arg(&a, "carrier_poll");
		if (v && !num_pos(v, &handshake_timeout))
			err = "set: handshake_timeout= must be a positive number of seconds";
		else if (lp && !num_pos(lp, &link_poll))
			err = "set: link_poll= must be a positive number of seconds";
		else if (cp && !num_pos(cp, &carrier_poll))
			err = "set: carrier_poll= must be a positive number of seconds";
	} else if (!strcmp(verb, "sync-begin")) {
		sync_begin();
	} else if (!strcmp(verb, "sync-end")) {
		sync_end();
	} else if (!strcmp(verb, "stats")) {
		stats(&out);
	} else if (!strcmp(verb, "quit")) {
		loop_stop();
	} else {
		err = "unknown command";
	}
	if (err) {
		sb_free(&out);
		sb_printf(&out, "{\"message\":");
		sb_str(&out, err);
		sb_printf(&out, "}");
	}
	ctl_send(c, err ? "error" : "ok", out.b ? out.b : "{}");
	sb_free(&out);
}
