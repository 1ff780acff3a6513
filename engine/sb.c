/* A growable string buffer; JSON string escaping. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sb.h"

static int sb_grow(struct sb *s, size_t need) {
	if (s->len + need + 1 <= s->cap)
		return 0;
	size_t cap = s->cap ? s->cap : 256;
	while (cap < s->len + need + 1)
		cap *= 2;
	char *b = realloc(s->b, cap);
	if (!b) {
		s->oom = 1;
		return -1;
	}
	s->b = b;
	s->cap = cap;
	return 0;
}

void sb_printf(struct sb *s, const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || sb_grow(s, (size_t)n))
		return;
	va_start(ap, fmt);
	vsnprintf(s->b + s->len, s->cap - s->len, fmt, ap);
	va_end(ap);
	s->len += (size_t)n;
}

void sb_str(struct sb *s, const char *str) {
	sb_printf(s, "\"");
	for (const unsigned char *p = (const unsigned char *)str; *p; p++) {
		if (*p == '"' || *p == '\\')
			sb_printf(s, "\\%c", *p);
		else if (*p < 0x20 || *p == 0x7f)
			sb_printf(s, "\\u%04x", *p);
		else
			sb_printf(s, "%c", *p);
	}
	sb_printf(s, "\"");
}

void sb_free(struct sb *s) {
	free(s->b);
	s->b = NULL;
	s->len = s->cap = 0;
}
