/* sanvisor-engine --control SOCKET --state DIR [--idle-exit SECONDS]
 *
 * The host's block data plane (docs/dataplane.md), driven by the agent over the
 * control socket. It keeps running when the agent goes (guests keep their I/O);
 * a new agent takes it over through the same socket. With --idle-exit it ends
 * after that long without a control connection and without a client. */
#define _GNU_SOURCE
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "engine.h"

double idle_exit;
double link_poll = 1.0; /* seconds between reads of the links under the events */
static double last_client, last_refresh, last_carrier;

static void on_signal(int sig) {
	(void)sig;
	loop_stop();
}

void engine_tick(void) {
	list_for(pos, &all_maps) map_tick(container_of(pos, struct map, link));
	nbdc_tick_all();
	front_tick_all();
	if (now() - last_carrier >= carrier_poll) {
		last_carrier = now();
		link_poll_carriers();
	}
	if (now() - last_refresh >= link_poll) { /* a safety net under the link events */
		last_refresh = now();
		link_refresh_all();
	}
	if (!list_empty(&all_fronts))
		last_client = now();
	if (idle_exit > 0 && ctl_idle() >= idle_exit && now() - last_client >= idle_exit) {
		logmsg("info", "no agent and no client for %.0f s: exiting", idle_exit);
		loop_stop();
	}
}

void engine_flush(void) {
	do {
		cow_flush();
		while (!list_empty(&dirty_paths))
			path_flush(list_first(&dirty_paths, struct path, dlink));
		front_flush_all();
	} while (cow_busy());
}

int main(int argc, char **argv) {
	const char *control = NULL, *state = NULL;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--control"))
			control = argv[i + 1];
		else if (!strcmp(argv[i], "--state"))
			state = argv[i + 1];
		else if (!strcmp(argv[i], "--idle-exit"))
			idle_exit = atof(argv[i + 1]);
	}
	if (!control || !state) {
		fprintf(stderr, "usage: sanvisor-engine --control SOCKET --state DIR "
				"[--idle-exit SECONDS]\n");
		return 2;
	}
	setvbuf(stderr, NULL, _IOLBF, 0);
	/* request buffers (up to 32 MiB) come from the heap and are reused, not
	 * mapped and faulted in again for every request */
	mallopt(M_MMAP_THRESHOLD, 64 << 20);
	mallopt(M_TRIM_THRESHOLD, 256 << 20);
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa = { .sa_handler = on_signal };
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	now_refresh();
	last_client = last_refresh = now();
	state_load(state);
	if (link_open() < 0)
		logmsg("warning", "no link events (netlink): links are read every second");
	if (ctl_listen(control) < 0) {
		fprintf(stderr, "error: cannot listen on %s\n", control);
		return 1;
	}
	logmsg("info", "engine %d ready on %s", (int)getpid(), control);
	int rc = loop_run();
	unlink(control);
	return rc ? 1 : 0;
}
