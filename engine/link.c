/* Link events: the kernel tells us (netlink, RTNLGRP_LINK, in the network
 * namespace the agent started us in) when an HBA's link changes, so a dead path
 * fails at once, not at the next poll. A link is up when its operstate is "up"
 * (or "unknown": drivers without one) and it has carrier (IFF_LOWER_UP), as
 * paths.link_up reads /sys/class/net. Paths without an interface (the loopback
 * lab) get their link state from the agent.
 *
 * The kernel sends an interface taken down at once, but a lost carrier (the
 * switch side of a veth, a NIC's cable) goes through its link watch, which may
 * hold the event up to a second: so the carrier of every ready path's HBA is
 * also read every carrier_poll (10 ms; one pread on a kept sysfs file). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine.h"

#define LOWER_UP 0x10000 /* IFF_LOWER_UP: the carrier */
#define OPER_UNKNOWN 0
#define OPER_UP 6

static struct ev nl;
double carrier_poll = 0.01;
static struct { char ifname[16]; int fd; } carriers[64];
static int ncarriers;

static void update(const char *ifname, bool up) {
	char why[64];
	snprintf(why, sizeof why, "link down on %s", ifname);
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		for (int i = 0; i < m->npaths; i++) {
			struct path *p = m->paths[i];
			if (!p->ctl_link && !strcmp(p->ifname, ifname) && p->link != up) {
				path_set_link(p, up, why);
				if (up)
					path_tick(p);
			}
		}
	}
}

static bool read_line(const char *path, char *buf, size_t cap) {
	FILE *f = fopen(path, "re");
	if (!f)
		return false;
	bool ok = fgets(buf, (int)cap, f) != NULL;
	fclose(f);
	buf[strcspn(buf, "\n")] = 0;
	return ok;
}

bool link_sysfs_up(const char *ifname) {
	char path[128], state[32], carrier[8];
	if (!*ifname || strchr(ifname, '/'))
		return false;
	snprintf(path, sizeof path, "/sys/class/net/%s/operstate", ifname);
	if (!read_line(path, state, sizeof state))
		return false;
	snprintf(path, sizeof path, "/sys/class/net/%s/carrier", ifname);
	if (!read_line(path, carrier, sizeof carrier))
		return false;
	return (!strcmp(state, "up") || !strcmp(state, "unknown")) && !strcmp(carrier, "1");
}

void link_refresh_all(void) {
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		for (int i = 0; i < m->npaths; i++) {
			struct path *p = m->paths[i];
			if (!p->ctl_link && p->ifname[0])
				update(p->ifname, link_sysfs_up(p->ifname));
		}
	}
}

static void on_msg(const struct nlmsghdr *h) {
	if (h->nlmsg_type != RTM_NEWLINK && h->nlmsg_type != RTM_DELLINK)
		return;
	if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct ifinfomsg)))
		return;
	const struct ifinfomsg *ifi = NLMSG_DATA(h);
	const char *name = NULL;
	int oper = -1;
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *ifi));
	for (const struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
		if (a->rta_type == IFLA_IFNAME && RTA_PAYLOAD(a) > 0 &&
		    memchr(RTA_DATA(a), 0, RTA_PAYLOAD(a)))
			name = RTA_DATA(a);
		else if (a->rta_type == IFLA_OPERSTATE && RTA_PAYLOAD(a) >= 1)
			oper = *(const unsigned char *)RTA_DATA(a);
	}
	if (!name)
		return;
	bool up = h->nlmsg_type == RTM_NEWLINK && (ifi->ifi_flags & LOWER_UP) &&
		  (oper == OPER_UP || oper == OPER_UNKNOWN || oper < 0);
	update(name, up);
}

static void nl_cb(struct ev *ev, uint32_t events) {
	(void)events;
	char buf[16384] __attribute__((aligned(4)));
	for (int round = 0; round < 8; round++) {
		ssize_t n = recv(ev->fd, buf, sizeof buf, 0);
		if (n < 0) {
			if (errno == ENOBUFS) { /* events were lost: read the state again */
				link_refresh_all();
				continue;
			}
			return;
		}
		int len = (int)n;
		for (const struct nlmsghdr *h = (const struct nlmsghdr *)buf; NLMSG_OK(h, len);
		     h = NLMSG_NEXT(h, len))
			on_msg(h);
	}
}

static int carrier_fd(const char *ifname) {
	for (int i = 0; i < ncarriers; i++)
		if (!strcmp(carriers[i].ifname, ifname))
			return carriers[i].fd;
	if (ncarriers == 64 || strchr(ifname, '/'))
		return -1;
	char path[96];
	snprintf(path, sizeof path, "/sys/class/net/%s/carrier", ifname);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	snprintf(carriers[ncarriers].ifname, sizeof carriers[0].ifname, "%s", ifname);
	carriers[ncarriers++].fd = fd;
	return fd;
}

static void carrier_forget(const char *ifname) { /* the interface went: open it again */
	for (int i = 0; i < ncarriers; i++)
		if (!strcmp(carriers[i].ifname, ifname)) {
			close(carriers[i].fd);
			carriers[i] = carriers[--ncarriers];
			return;
		}
}

/* The carrier of each ready path's interface; a lost one fails its paths. */
void link_poll_carriers(void) {
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		for (int i = 0; i < m->npaths; i++) {
			struct path *p = m->paths[i];
			if (p->ctl_link || !p->ifname[0] || p->state != P_READY)
				continue;
			char buf[8];
			int fd = carrier_fd(p->ifname);
			ssize_t n = fd < 0 ? -1 : pread(fd, buf, sizeof buf, 0);
			if (n < 1 || buf[0] != '1') {
				if (n < 0)
					carrier_forget(p->ifname);
				update(p->ifname, false);
			}
		}
	}
}

int link_open(void) {
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0)
		return -1;
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK, .nl_groups = RTMGRP_LINK };
	int rcv = 1 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || ev_add(&nl, fd, EPOLLIN, nl_cb) < 0) {
		close(fd);
		return -1;
	}
	return 0;
}
