/* A growable string buffer (JSON replies and events). */
#ifndef SV_SB_H
#define SV_SB_H
#include <stddef.h>
struct sb { char *b; size_t len, cap; int oom; };
void sb_printf(struct sb *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sb_str(struct sb *s, const char *str); /* a JSON string literal */
void sb_free(struct sb *s);
#endif
