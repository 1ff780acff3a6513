/* The control connections (ctl.c) and their commands (cmds.c). */
#ifndef SV_CTL_H
#define SV_CTL_H
#include <stdbool.h>
#include <stddef.h>

#include "engine.h"

struct ctl {
	struct ev ev;
	list_t link;
	char *in, *out;
	size_t ilen, olen, ocap, ooff;
	int fds[16], nfds;
	bool watch, closed;
};
void ctl_send(struct ctl *c, const char *head, const char *json);
void ctl_close(struct ctl *c);
int ctl_take_fd(struct ctl *c);
void ctl_command(struct ctl *c, char *line);
double ctl_idle(void);
#endif
