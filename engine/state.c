/* The sessions this engine has at the array, kept in a file so that an engine
 * started after a crash (kill -9) fences them before it sends anything: a write
 * the dead engine had sent may still be queued at the array on a half-open
 * connection, and the client (QEMU) resends it through the new engine; without
 * the fence the old copy could land later, over newer data. Written (temp file,
 * fdatasync, rename) whenever a path's session starts or ends, before anything
 * is sent on a new session. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"

struct orphan { char wwid[128]; uint64_t token; };
static struct orphan *orphans;
static int norphans;
static char file[4096];

void state_load(const char *dir) {
	snprintf(file, sizeof file, "%s/sessions", dir);
	FILE *f = fopen(file, "re");
	if (!f)
		return;
	char line[300], wwid[128];
	uint64_t token;
	while (fgets(line, sizeof line, f)) {
		if (sscanf(line, "%127s %" SCNx64, wwid, &token) != 2 || !token)
			continue;
		struct orphan *o = realloc(orphans, (size_t)(norphans + 1) * sizeof *o);
		if (!o)
			break;
		orphans = o;
		snprintf(orphans[norphans].wwid, sizeof orphans[norphans].wwid, "%s", wwid);
		orphans[norphans++].token = token;
	}
	fclose(f);
	if (norphans)
		logmsg("info", "%d session(s) of a previous engine to fence before any I/O", norphans);
}

/* A new map takes the sessions a previous engine had on its LUN: its debt. */
void state_adopt(struct map *m) {
	for (int i = 0; i < norphans;) {
		if (strcmp(orphans[i].wwid, m->id)) {
			i++;
			continue;
		}
		struct dead *d = calloc(1, sizeof *d);
		if (d) {
			d->token = orphans[i].token;
			snprintf(d->dev, sizeof d->dev, "previous engine");
			list_init(&d->held);
			d->since = now();
			d->failed_back = true; /* nothing new reaches the array before the fence */
			list_add_tail(&m->dead, &d->link);
			m->ndead++;
		}
		orphans[i] = orphans[--norphans];
	}
}

void state_save(void) {
	if (!file[0])
		return;
	char tmp[4200];
	snprintf(tmp, sizeof tmp, "%s.tmp", file);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		logmsg("warning", "cannot write %s", tmp);
		return;
	}
	FILE *f = fdopen(fd, "w");
	if (!f) {
		close(fd);
		return;
	}
	list_for(pos, &all_maps) {
		struct map *m = container_of(pos, struct map, link);
		for (int i = 0; i < m->npaths; i++)
			if (m->paths[i]->has_session)
				fprintf(f, "%s %016" PRIx64 "\n", m->id, m->paths[i]->session);
		list_for(dp, &m->dead)
			fprintf(f, "%s %016" PRIx64 "\n", m->id, container_of(dp, struct dead, link)->token);
	}
	for (int i = 0; i < norphans; i++)
		fprintf(f, "%s %016" PRIx64 "\n", orphans[i].wwid, orphans[i].token);
	bool ok = fflush(f) == 0 && fdatasync(fd) == 0;
	fclose(f);
	if (!ok || rename(tmp, file) < 0)
		logmsg("warning", "cannot write %s", file);
}
