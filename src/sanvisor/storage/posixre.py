"""POSIX extended regular expressions as glibc's regcomp/regexec treat them.

multipath-tools compiles every regex of multipath.conf (blacklist entries, device
vendor/product/revision) with regcomp(REG_EXTENDED|REG_NOSUB) and tests it with
regexec: unanchored, case-sensitive, `.` matching any character. This parses
glibc's syntax (tests compare the two on random expressions):

- in brackets a backslash is an ordinary character; `[:digit:]`-style classes,
  `[.c.]` and `[=c=]` exist; a class cannot end a range, `[a-c-e]` is an error;
- `\\<` `\\>` are word boundaries, `\\w \\W \\s \\S \\b \\B` as in Python, `\\1`-`\\9`
  back-references, any other escaped character stands for itself (`\\d` is `d`);
- quantifiers stack (`a**`, `a{2}{3}`); one with nothing to repeat (at the start,
  after `(`, `|`, `^` or `$`) is an error; `{` must open a valid `{m,n}` (n <=
  32767); an unmatched `)` is an ordinary character; `(?` is an error;
- `$` is the end of the string, not "before a final newline".

Matching runs an automaton over sets of states (time linear in the string), so
no expression can hang the agent: Python's backtracking `re` takes minutes for
`(.*)*x` on a WWID. Only expressions with back-references, which no automaton
expresses, are matched by `re`. compile_ere() raises ValueError (with the reason)
when glibc would not compile the expression.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable
from typing import Any

DUP_MAX = 32767  # RE_DUP_MAX
MAX_STATES = 100_000  # an automaton larger than this is refused
_CLASSES = {
    "alpha": string.ascii_letters, "digit": string.digits,
    "alnum": string.ascii_letters + string.digits, "upper": string.ascii_uppercase,
    "lower": string.ascii_lowercase, "space": " \t\n\r\f\v", "blank": " \t",
    "punct": string.punctuation, "xdigit": string.hexdigits,
    "cntrl": "".join(map(chr, range(32))) + "\x7f",
    "print": "".join(map(chr, range(32, 127))), "graph": "".join(map(chr, range(33, 127))),
}
_INTERVAL = re.compile(r"\{([0-9]*)(\\?,([0-9]*))?\}")  # glibc takes "\\," for ","
_WORD = re.compile(r"\w")
# Nodes: ("char", python class of one character) ("assert", "^" "$" "b" "B" "<" ">")
# ("cat", [nodes]) ("alt", [nodes]) ("rep", node, lo, hi or None) ("group", node)
# ("backref", n)
Node = tuple[Any, ...]


class Ere:
    """A compiled expression: search(s) is regexec's answer."""

    def __init__(self, tree: Node, backrefs: bool) -> None:
        self.python = re.compile(_render(tree), re.DOTALL)  # also checks the tree
        self.nfa = None if backrefs else _Nfa(tree)

    def search(self, s: str) -> bool:
        return self.nfa.search(s) if self.nfa else self.python.search(s) is not None


@functools.lru_cache(maxsize=4096)
def compile_ere(pattern: str) -> Ere:
    try:
        parser = _Parser(pattern)
        return Ere(parser.run(), parser.backrefs)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(str(exc).split(" at position")[0]) from None


class _Parser:
    def __init__(self, p: str) -> None:
        self.p, self.i, self.groups, self.backrefs = p, 0, 0, False
        self.completed: set[int] = set()  # groups a back-reference may name here

    def run(self) -> Node:
        return self.alternation(depth=0)  # ')' at depth 0 is literal: all is read

    def alternation(self, depth: int) -> Node:
        """Branches; a branch sees the groups closed before the alternation and in
        itself, not those of the other branches (glibc's completed_bkref_map)."""
        initial = set(self.completed)
        branches = [self.branch(depth)]
        while self.p.startswith("|", self.i):
            self.i += 1
            done, self.completed = self.completed, set(initial)
            branches.append(self.branch(depth))
            self.completed |= done
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def branch(self, depth: int) -> Node:
        pieces: list[Node] = []
        repeatable = False  # whether the last piece can take a quantifier
        while self.i < len(self.p):
            c = self.p[self.i]
            if c == "|" or (c == ")" and depth > 0):
                break
            quant = self.quantifier()
            if quant is not None:
                if not repeatable:
                    raise ValueError("a quantifier with nothing to repeat")
                pieces[-1] = ("rep", pieces[-1], *quant)  # quantifiers stack
                continue
            atom, repeatable = self.atom(depth)
            pieces.append(atom)
        return ("cat", pieces)

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.p[self.i]
        if c in "*+?":
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        m = _INTERVAL.match(self.p, self.i)
        if m is None or (m[1] == "" and m[2] is None):
            raise ValueError("'{' does not open a valid {m,n} interval")
        lo = int(m[1] or 0)
        hi = None if m[2] is not None and not m[3] else int(m[3] or lo)
        if lo > DUP_MAX or (hi is not None and (hi > DUP_MAX or hi < lo)):
            raise ValueError(f"invalid interval {m[0]}")
        self.i = m.end()
        return lo, hi

    def atom(self, depth: int) -> tuple[Node, bool]:
        p, c = self.p, self.p[self.i]
        self.i += 1
        if c == "(":
            if p.startswith("?", self.i):
                raise ValueError("'(?' repeats nothing (not a POSIX extended regex)")
            self.groups += 1
            number = self.groups
            inner = self.alternation(depth + 1)
            if not p.startswith(")", self.i):
                raise ValueError("unmatched '('")
            self.i += 1
            self.completed.add(number)
            return ("group", inner), True
        if c in "^$":
            return ("assert", c), False
        if c == ".":
            return ("char", "."), True
        if c == "[":
            return ("char", self.bracket()), True
        if c != "\\":
            return ("char", re.escape(c)), True
        if self.i >= len(p):
            raise ValueError("trailing backslash")
        d = p[self.i]
        self.i += 1
        if d in "123456789":
            if int(d) not in self.completed:
                raise ValueError(f"invalid back reference \\{d}")
            self.backrefs = True
            return ("backref", int(d)), True
        if d in "<>bB`'":
            return ("assert", {"`": "^", "'": "$"}.get(d, d)), False
        return ("char", "\\" + d if d in "wWsS" else re.escape(d)), True

    def bracket(self) -> str:
        """A bracket expression after its '[', as a Python class."""
        p = self.p
        neg = p.startswith("^", self.i)
        self.i += neg
        items: list[str] = []
        first = True
        while True:
            if self.i >= len(p):
                raise ValueError("unterminated [ ] bracket expression")
            if p[self.i] == "]" and not first:
                self.i += 1
                return "[" + ("^" if neg else "") + "".join(items) + "]"
            first = False
            kind, lo = self.element()
            if kind == ":":
                items.append("".join(re.escape(ch) for ch in _CLASSES[lo]))
            elif p.startswith("-", self.i) and p[self.i + 1:self.i + 2] not in ("]", ""):
                if kind == "=":
                    raise ValueError("an equivalence class cannot start a range")
                self.i += 1
                kind2, hi = self.element()
                if kind2 in (":", "=") or ord(hi) < ord(lo):
                    raise ValueError(f"invalid range end in [{lo}-{hi}]")
                if p.startswith("-", self.i) and p[self.i + 1:self.i + 2] != "]":
                    raise ValueError("a range cannot be followed by '-'")
                items.append(f"{re.escape(lo)}-{re.escape(hi)}")
            else:
                items.append(re.escape(lo))

    def element(self) -> tuple[str, str]:
        """One bracket element: ('', char), ('.', char), ('=', char) or (':', class)."""
        p, i = self.p, self.i
        if p.startswith("[", i) and p[i + 1:i + 2] in (":", ".", "="):
            kind = p[i + 1]
            end = p.find(kind + "]", i + 2)
            if end < 0:
                raise ValueError(f"unterminated [{kind} {kind}] in a bracket expression")
            name = p[i + 2:end]
            self.i = end + 2
            if kind == ":" and name not in _CLASSES:
                raise ValueError(f"invalid character class [:{name}:]")
            if kind != ":" and len(name) != 1:
                raise ValueError(f"invalid collating element [{kind}{name}{kind}]")
            return kind, name
        if i >= len(p):
            raise ValueError("unterminated [ ] bracket expression")
        self.i = i + 1
        return "", p[i]


_ASSERT_RE = {"^": "^", "$": r"\Z", "b": r"\b", "B": r"(?:\B|\A\Z)",  # glibc: \B holds in ""
              "<": r"\b(?=\w)", ">": r"\b(?<=\w)"}


def _render(node: Node) -> str:
    kind = node[0]
    if kind == "char":
        return str(node[1])
    if kind == "assert":
        return _ASSERT_RE[node[1]]
    if kind == "cat":
        return "".join(_render(n) for n in node[1])
    if kind == "alt":
        return "|".join(_render(n) for n in node[1])
    if kind == "group":
        return f"({_render(node[1])})"
    if kind == "backref":
        return f"(?:\\{node[1]})"
    lo, hi = node[2], node[3]
    return f"(?:{_render(node[1])}){{{lo},{'' if hi is None else hi}}}"


class _Nfa:
    """Thompson's construction; search() follows every state at once."""

    def __init__(self, tree: Node) -> None:
        self.kind: list[str] = []  # "char", "assert", "eps", "match"
        self.arg: list[Any] = []  # a character test, an assertion
        self.out: list[list[int]] = []
        start, end = self._build(tree)
        self.match = self._new("match")
        self.out[end].append(self.match)
        self.start = start

    def _new(self, kind: str, arg: Any = None) -> int:
        if len(self.kind) >= MAX_STATES:
            raise ValueError("regular expression too big")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append([])
        return len(self.kind) - 1

    def _build(self, node: Node) -> tuple[int, int]:
        """A fragment: (its first state, its last state: an "eps" without exits yet)."""
        kind, end = node[0], None
        if kind in ("char", "assert"):
            arg: Any = re.compile(node[1], re.DOTALL).fullmatch if kind == "char" else node[1]
            start = self._new(kind, arg)
            end = self._new("eps")
            self.out[start].append(end)
            return start, end
        if kind == "group":
            return self._build(node[1])
        if kind == "alt":
            start, end = self._new("eps"), self._new("eps")
            for child in node[1]:
                s, e = self._build(child)
                self.out[start].append(s)
                self.out[e].append(end)
            return start, end
        if kind == "cat":
            return self._chain([functools.partial(self._build, n) for n in node[1]])
        child, lo, hi = node[1], node[2], node[3]
        parts: list[Callable[[], tuple[int, int]]] = [lambda: self._build(child)] * lo
        if hi is None:
            parts.append(lambda: self._optional(child, loop=True))
        else:
            parts += [lambda: self._optional(child, loop=False)] * (hi - lo)
        return self._chain(parts)

    def _chain(self, parts: list[Callable[[], tuple[int, int]]]) -> tuple[int, int]:
        start = end = self._new("eps")
        for part in parts:
            s, e = part()
            self.out[end].append(s)
            end = e
        return start, end

    def _optional(self, child: Node, loop: bool) -> tuple[int, int]:
        start, end = self._new("eps"), self._new("eps")
        s, e = self._build(child)
        self.out[start] += [s, end]
        self.out[e].append(start if loop else end)
        return start, end

    def search(self, s: str) -> bool:
        n = len(s)
        word = [bool(_WORD.match(c)) for c in s]

        def holds(test: str, i: int) -> bool:
            before, after = i > 0 and word[i - 1], i < n and word[i]
            return {"^": i == 0, "$": i == n, "b": before != after, "B": before == after,
                    "<": not before and after, ">": before and not after}[test]

        def close(states: set[int], todo: list[int], i: int) -> None:
            while todo:
                st = todo.pop()
                if st in states:
                    continue
                states.add(st)
                if self.kind[st] == "eps" or (self.kind[st] == "assert"
                                              and holds(self.arg[st], i)):
                    todo.extend(self.out[st])

        current: set[int] = set()
        for i in range(n + 1):
            close(current, [self.start], i)  # unanchored: a new start at every position
            if self.match in current:
                return True
            if i == n:
                return False
            nxt: set[int] = set()
            close(nxt, [self.out[st][0] for st in current
                        if self.kind[st] == "char" and self.arg[st](s[i])], i + 1)
            current = nxt
        return False
