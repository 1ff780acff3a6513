/* sanvisor-engine: the per-request block data plane (docs/dataplane.md).
 *
 * Devices (what QEMU opens: an NBD server on a unix socket the agent gives us)
 * are lists of segments; each segment maps a range of the device onto a map at
 * an offset. A map is one LUN: its paths (NBD connections to the array through
 * the host's HBAs), the path selector, the no-path queue and the fence state.
 * A client request becomes one part per segment it touches; a part is routed by
 * its map, resent on another path when one dies (writes only after a fence).
 * One thread, one epoll loop; the agent drives it over a control socket. */
#ifndef SV_ENGINE_H
#define SV_ENGINE_H
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- intrusive lists ---------------------------------------------------------- */
typedef struct list { struct list *prev, *next; } list_t;
static inline void list_init(list_t *l) { l->prev = l->next = l; }
static inline bool list_empty(const list_t *l) { return l->next == l; }
static inline void list_add_tail(list_t *head, list_t *n) {
	n->prev = head->prev; n->next = head; head->prev->next = n; head->prev = n;
}
static inline void list_del(list_t *n) {
	n->prev->next = n->next; n->next->prev = n->prev; n->prev = n->next = n;
}
#define container_of(p, type, member) ((type *)(void *)((char *)(p) - offsetof(type, member)))
#define list_first(head, type, member) container_of((head)->next, type, member)
#define list_for(pos, head) for (list_t *pos = (head)->next, *pos##_n = pos->next; \
	pos != (head); pos = pos##_n, pos##_n = pos->next)

/* ---- the event loop (loop.c) ---------------------------------------------------- */
struct ev;
typedef void ev_cb(struct ev *ev, uint32_t events);
struct ev { int fd; uint32_t mask; ev_cb *cb; };
int ev_add(struct ev *ev, int fd, uint32_t mask, ev_cb *cb);
void ev_mod(struct ev *ev, uint32_t mask);
void ev_close(struct ev *ev, bool reset); /* unregister and close (reset: RST a socket) */
int ev_release(struct ev *ev); /* unregister; the caller keeps the fd */
void defer_free(void *obj, void (*fn)(void *)); /* freed after this loop iteration */
double now(void); /* monotonic seconds, read once per iteration */
void now_refresh(void);
int loop_run(void);
void loop_stop(void);

/* ---- logging and events to the agent (ctl.c) ------------------------------------ */
void logmsg(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void emit(const char *json); /* an event line to every watching control connection */
size_t json_str(char *out, size_t cap, const char *s); /* a JSON string literal */

/* ---- requests and parts (req.c) -------------------------------------------------- */
struct front;
struct map;
struct path;
struct req;

struct part {
	list_t link; /* in a map's queue, a path's in-flight list, or a dead session's */
	struct req *req;
	struct map *map;
	uint64_t off; /* on the map */
	uint32_t len, boff; /* length; offset of its data in req->buf */
	uint16_t cmd, flags;
	int tries; /* paths it was in flight on when they failed */
	double queued_at, sent_at;
	struct path *path; /* while in flight */
	uint64_t cookie;
	uint32_t slot;
	bool sent; /* fully written to the path's socket */
	uint8_t wire[28];
};

struct dev;
struct req {
	list_t flink; /* the front's outstanding requests */
	list_t olink; /* the front's reply queue */
	struct front *fr; /* NULL once the client is gone */
	/* copy-on-write devices (cow.c): the device a parked request waits on (NULL once
	 * the device went), how many waits it has, and a hook run when its parts end
	 * (instead of the reply: internal I/O, a snapshot's tracked reads) */
	struct dev *dev;
	list_t plink; /* the device's parked requests, or the retry queue */
	int parked;
	void (*done)(struct req *r);
	void (*iocb)(void *ctx, struct req *r, uint32_t err); /* the engine's own I/O */
	void *ctx;
	uint64_t *track; int ntrack; /* origin chunks a snapshot read holds */
	struct store *tstore;
	uint64_t cookie, off;
	uint32_t len;
	uint16_t cmd, flags;
	uint8_t *buf; /* a write's payload, a read's data */
	int pending, nparts;
	uint32_t err;
	uint8_t rhdr[16];
	struct part *parts;
	struct part one;
};
struct req *req_new(struct front *fr, uint64_t cookie, uint16_t cmd, uint16_t flags,
		    uint64_t off, uint32_t len);
void req_free(struct req *r);
void req_finish(struct req *r); /* its hook, else its reply (or freed: no client) */
void part_done(struct part *p, uint32_t err);

/* ---- maps and paths (map.c, path.c, fence.c) ------------------------------------- */
enum npr { NPR_QUEUE, NPR_FAIL, NPR_COUNT };
struct settings {
	bool multibus, failback_manual;
	int npr, npr_n; /* no_path_retry queue | fail | N */
	double polling, io_timeout, fence_timeout;
	int max_tries;
	uint32_t hold_mask; /* commands held for a fence before a resend (1 << cmd) */
};

struct dead {
	list_t link;
	uint64_t token;
	char dev[32];
	list_t held; /* parts */
	int nheld;
	double since;
	bool failed_back, in_batch;
};

struct nbdc;
struct map {
	list_t link;
	char id[128]; /* the WWID */
	uint64_t size;
	struct settings s;
	struct path **paths; /* in the agent's order */
	int npaths;
	list_t queue; int nqueue;
	list_t dead; int ndead;
	unsigned rr;
	struct path *current;
	uint64_t io_errors, retries_exhausted, fences, fence_failures;
	struct nbdc *fencing; struct path *fencing_via;
	int turn;
	double fence_wait_until;
	bool closed, seen;
};

enum pstate { P_FAULTY, P_CONNECTING, P_READY };
struct path {
	struct ev ev;
	list_t dlink; bool dirty;
	struct map *map;
	char id[64], dev[32], ifname[16], export_[256];
	struct sockaddr_in src, dst;
	int index;
	enum pstate state;
	bool link, ctl_link; /* link up; its state comes from the agent (no ifname) */
	uint64_t session; bool has_session;
	char reason[160];
	struct nbdc *conn;
	double next_probe;
	bool seen;
	/* transmission */
	list_t inflight; int ninflight;
	struct part *txp; uint32_t tx_off;
	struct part **slots; uint32_t nslots, *freeslots, nfree, gen;
	uint8_t *rx; uint32_t rx_len, rx_pos;
	uint8_t rhdr[16]; uint32_t rhdr_len;
	struct part *rxp; uint32_t rx_left;
	uint64_t read_bytes, written_bytes, requests, failures;
};

struct map *map_find(const char *id);
struct map *map_new(const char *id);
void map_free(void *m);
void map_submit(struct map *m, struct part *p);
void map_resend(struct map *m, struct part *p); /* after a failure: bounded by max_tries */
void map_path_changed(struct map *m, struct path *p, bool had_session, uint64_t token,
		      list_t *taken);
void map_tick(struct map *m);
void map_close(struct map *m);
bool map_debt(const struct map *m);
int map_ready(const struct map *m, struct path **out, int max);
void map_fence_kick(struct map *m);
void map_fence_tick(struct map *m);
void map_fenced(struct map *m, bool ok, const char *why);
struct sb;
void map_stats(struct map *m, struct sb *out);

struct path *path_new(struct map *m, const char *id);
void path_free(void *p);
void path_send(struct path *p, struct part *pt);
void path_fail(struct path *p, const char *why);
void path_tick(struct path *p);
void path_set_link(struct path *p, bool up, const char *why);
void path_flush(struct path *p);
void path_mark_dirty(struct path *p);
double path_oldest(const struct path *p);
void path_ready(struct path *p, int fd, uint64_t session);
void path_connect_failed(struct path *p, const char *why);

/* the NBD client handshakes of nbdc.c: GO (a path) and X_FENCE (a fence) */
struct nbdc *nbdc_go(struct path *p, double timeout);
struct nbdc *nbdc_fence(struct map *m, struct path *via, const uint64_t *tokens, int n,
			double timeout);
void nbdc_cancel(struct nbdc *c);
void nbdc_tick_all(void);

/* ---- devices (dev.c, seg.c) -------------------------------------------------------- */
struct seg { uint64_t start, len, moff; char map_id[128]; struct map *map; };
struct span { int seg; uint64_t moff; uint32_t len, boff; };
int seg_split(const struct seg *segs, int nsegs, uint64_t off, uint32_t len,
	      struct span *out, int max);
const char *seg_check(const struct seg *segs, int nsegs, uint64_t size);

struct store;
#define MAX_COWS 16 /* snapshots of one origin */
struct dev {
	list_t link;
	char name[128];
	uint64_t size;
	struct seg *segs; int nsegs;
	struct ev lev; /* the listening socket */
	list_t fronts; int nfronts;
	bool seen, retired;
	/* copy-on-write (cow.c): an origin's snapshot stores, or a snapshot's own store */
	struct store *cows[MAX_COWS]; int ncows;
	struct store *snap;
	list_t parked; /* requests waiting (for a copy, a load, a drain) */
	list_t busy; /* its origin writes in flight (their hook counts them) */
	bool snap_gone; /* its store was deleted: every request fails */
	list_t suspw; /* writes waiting for the writes in flight before a new snapshot */
	int wr_inflight;
	bool suspended;
};
struct dev *dev_find(const char *name);
void dev_free(struct dev *d);
bool dev_same_mapping(const struct dev *d, const struct seg *segs, int n);
void dev_retire(struct dev *d);
void dev_client_gone(struct dev *d);
void dev_listen(struct dev *d, int fd);
void dev_submit(struct dev *d, struct req *r);
void dev_relink(void); /* segments find their maps again */
struct xspan { const struct seg *segs; int nsegs; uint64_t off; uint32_t len, boff; };
int spans_submit(struct req *r, const struct xspan *xs, int n); /* 0, or -1: r ended (EIO) */
int segs_submit(const struct seg *segs, int nsegs, struct req *r);

/* ---- snapshots: exception stores (store.c) and copy-on-write devices (cow.c) ------ */
struct hmap { uint64_t *k, *v; uint32_t cap, n; }; /* u64 -> u64, open addressing */
bool hmap_get(const struct hmap *h, uint64_t key, uint64_t *val);
int hmap_put(struct hmap *h, uint64_t key, uint64_t val);
void hmap_del(struct hmap *h, uint64_t key);
void hmap_free(struct hmap *h);

enum sstate { S_LOADING, S_READY, S_INVALID };
struct pend { /* an origin chunk being copied into a store */
	list_t link; /* the store's ready list, or its commit batch */
	struct store *st;
	uint64_t chunk, new_chunk;
	list_t waiters;
	bool dead, durable; /* durable: its copy was written with FUA (no FLUSH needed) */
};
struct store {
	list_t link;
	char id[128];
	uint64_t size; /* bytes of the COW LV */
	uint32_t chunk; /* bytes */
	struct seg *cow; int ncow; /* the COW LV */
	struct seg *org; int norg; /* its origin */
	uint64_t osize;
	enum sstate state;
	bool seen, gone, meta_busy, zeroed_next;
	uint64_t next_free, area, load_area;
	uint32_t used; /* entries in the current area */
	uint8_t *abuf; /* the current area, as on disk once committed */
	struct hmap exc; /* origin chunk -> COW chunk, committed */
	struct hmap pend; /* origin chunk -> struct pend * */
	struct hmap track; /* origin chunk -> snapshot reads in flight on the origin */
	list_t ready, batch, loadw, trackw;
	struct copy *run; /* copies gathered in this iteration (copy.c) */
	list_t runs, copied, klink;
	bool kicked, batch_durable;
	int copy_writes_inflight;
	int inflight, npend;
	uint64_t copies, merged_waits, copy_reads, copy_writes, commits;
	char why[160];
};
extern list_t all_stores;
struct store *store_find(const char *id);
const char *store_set(const char *id, uint64_t size, uint32_t chunk, struct seg *cow, int ncow,
		      struct seg *org, int norg);
void store_del(struct store *st);
void store_relink(void);
struct pend *store_need(struct store *st, uint64_t chunk); /* existing or a new copy; NULL: invalid */
void store_invalidate(struct store *st, const char *why);
void store_untrack(struct store *st, uint64_t chunk);
void store_put(struct store *st); /* frees a deleted store once its I/O ended */
void store_stats(struct store *st, struct sb *out);
uint64_t store_cow_offset(const struct store *st, uint64_t cow_chunk);
/* between store.c and copy.c: an I/O's end (false: the store is invalid), the next
 * free chunk past an area, the commit of the copies written; the work gathered in a
 * loop iteration (store_kick), sent by store_kicks() at its end */
bool store_io_end(struct store *st, uint32_t err, const char *what);
void store_skip_metadata(struct store *st);
void store_commit(struct store *st);
void store_kick(struct store *st);
bool store_kicks(void);
bool store_kicked(void);
void copies_drop(struct store *st);

/* waiting: a request parks on a list; wake_all() releases a list's waits */
void park(list_t *on, struct req *r); /* a wait; aborts when out of memory */
void wake_all(list_t *on);
void cow_submit(struct dev *d, struct req *r);
void cow_attach(struct dev *d);
void cow_dev_gone(struct dev *d);
void cow_flush(void); /* deferred work: completions and retries, until none is left */
bool cow_busy(void);
/* internal I/O: a request of the engine's own (a copy, an area write) */
typedef void io_cb(void *ctx, struct req *r, uint32_t err);
struct req *io_new(uint16_t cmd, uint16_t flags, uint64_t off, uint32_t len);
void io_submit(const struct seg *segs, int nsegs, struct req *r, io_cb *cb, void *ctx);

/* ---- the client side of QEMU (front.c) --------------------------------------------- */
void front_accept(struct dev *d, int fd);
void front_reply(struct req *r);
void front_close_dev(struct dev *d);
void front_drain_dev(struct dev *d); /* answer what was asked, then close: clients reconnect */
void front_tick_all(void);
void front_flush_all(void);
extern list_t all_fronts;
extern double handshake_timeout;

/* ---- link events (link.c), persisted sessions (state.c), control (ctl.c) ----------- */
int link_open(void);
bool link_sysfs_up(const char *ifname);
void link_refresh_all(void);
void link_poll_carriers(void);
extern double carrier_poll; /* seconds between reads of ready paths' carriers */
void state_load(const char *dir);
void state_save(void);
void state_adopt(struct map *m);
int ctl_listen(const char *path);
bool ctl_connected(void);

/* ---- the engine's globals ------------------------------------------------------------- */
extern list_t all_maps, all_devs, dirty_paths;
void engine_flush(void); /* writes batched during this iteration */
void engine_tick(void);
extern double idle_exit; /* seconds without a control connection nor a client */
extern double link_poll;
#endif
