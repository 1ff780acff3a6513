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

struct req {
	list_t flink; /* the front's outstanding requests */
	list_t olink; /* the front's reply queue */
	struct front *fr; /* NULL once the client is gone */
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

struct dev {
	list_t link;
	char name[128];
	uint64_t size;
	struct seg *segs; int nsegs;
	struct ev lev; /* the listening socket */
	list_t fronts; int nfronts;
	bool seen, retired;
};
struct dev *dev_find(const char *name);
void dev_free(struct dev *d);
bool dev_same_mapping(const struct dev *d, const struct seg *segs, int n);
void dev_retire(struct dev *d);
void dev_client_gone(struct dev *d);
void dev_listen(struct dev *d, int fd);
void dev_submit(struct dev *d, struct req *r);
void dev_relink(void); /* segments find their maps again */

/* ---- the client side of QEMU (front.c) --------------------------------------------- */
void front_accept(struct dev *d, int fd);
void front_reply(struct req *r);
void front_close_dev(struct dev *d);
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
