"""multipath.conf lines split into words as multipath-tools 0.9.4 splits them.

libmpathutil/parser.c (read_line, alloc_strvec): a line ends at a newline and is
cut at its first carriage return (or NUL); `#` and `!` start a comment outside
double quotes; `{` and `}` are words of their own outside quotes; a double quote
opens or closes a string, in which `""` is a literal quote; bytes outside ASCII
separate words like white space. Quote marks and braces are returned as QUOTE,
OPEN and CLOSE (never words: a line is cut at its first NUL), so `alias "a b"` is
["alias", QUOTE, "a b", QUOTE] and `alias "{"` is ["alias", QUOTE, "{", QUOTE].
"""

from __future__ import annotations

QUOTE, OPEN, CLOSE = '\0"', "\0{", "\0}"
_SPACE = " \t\n\v\f\r"


def lines(text: str) -> list[tuple[int, str]]:
    out = []
    for n, raw in enumerate(text.split("\n"), 1):
        out.append((n, raw.split("\r", 1)[0].split("\0", 1)[0]))
    return out


def _sep(c: str) -> bool:
    return c in _SPACE or ord(c) > 127


def tokenize(s: str) -> list[str]:
    i, n = 0, len(s)
    while i < n and _sep(s[i]):
        i += 1
    if i >= n or s[i] in "!#":
        return []
    words: list[str] = []
    in_string = False
    while True:
        c = s[i]
        if c == '"' and not (in_string and s[i + 1:i + 2] == '"'):
            i += 1
            words.append(QUOTE)
            in_string = not in_string
        elif not in_string and c in "{}":
            i += 1
            words.append(OPEN if c == "{" else CLOSE)
        else:
            start = i
            while True:
                while i < n and s[i] != '"' and (in_string or not (_sep(s[i]) or s[i] in "!#{}")):
                    i += 1
                if in_string and s[i:i + 2] == '""':
                    i += 2
                    continue
                break
            word = s[start:i]
            words.append(word.replace('""', '"') if in_string else word)
        while not in_string and i < n and _sep(s[i]):
            i += 1
        if i >= n or (not in_string and s[i] in "!#"):
            return words
