"""LVM's configuration syntax, as lvm2's libdm-config reads metadata text.

    vgname {                          # a section: a name, then { ... }
    id = "Ab12cd-..."                 # key = value: a string (double quotes, with
    seqno = 7                         #   backslash escapes; or single quotes), an
    status = ["RESIZEABLE", "READ"]   #   integer, a float, or an array of those
    }

Comments run from '#' to the end of the line; a NUL byte ends the text (the
metadata area pads with zeros). Parsing never evaluates anything and never
recurses: any input gives a tree or a MetadataError naming the line.
"""

from __future__ import annotations

import re

from sanvisor.errors import MetadataError

Scalar = int | float | str
Value = Scalar | list[Scalar]
Section = dict[str, "Section | Value"]

MAX_DEPTH = 32
_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?[0-9]*\.[0-9]*\Z")
_NUMBER_START = frozenset("0123456789+-.")


_SPACE = re.compile(r"(?:[ \t\n\r\v\f]+|#[^\n]*)+")
_DQ = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESC = re.compile(r"\\(.)", re.DOTALL)
_NUM = re.compile(r"[+\-0-9][0-9]*(?:\.[0-9]*)?|\.[0-9]*")
_WORD = re.compile(r"[^ \t\n\r\v\f#={}]+")


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, what: str) -> MetadataError:
        line = self.text.count("\n", 0, self.pos) + 1
        return MetadataError(f"metadata text, line {line}: {what}")

    def next(self, value_wanted: bool) -> tuple[str, str]:
        """(kind, text): kind is one of { } [ ] , = str int float ident eof."""
        t = self.text
        m = _SPACE.match(t, self.pos)
        if m:
            self.pos = m.end()
        if self.pos >= len(t):
            return "eof", ""
        c = t[self.pos]
        if c in "{}[],=":
            self.pos += 1
            return c, c
        if c == '"':
            m = _DQ.match(t, self.pos)
            if m is None:
                raise self.fail("a string is not closed")
            self.pos = m.end()
            return "str", _ESC.sub(r"\1", m.group(1))
        if c == "'":
            end = t.find("'", self.pos + 1)
            if end < 0:
                raise self.fail("a string is not closed")
            word, self.pos = t[self.pos + 1:end], end + 1
            return "str", word
        if value_wanted and c in _NUMBER_START:
            m = _NUM.match(t, self.pos)
            assert m is not None
            word, self.pos = m.group(), m.end()
            if _INT.match(word):
                return "int", word
            if _FLOAT.match(word) and any(ch.isdigit() for ch in word):
                return "float", word
            raise self.fail(f"not a number: {word!r}")
        m = _WORD.match(t, self.pos)
        assert m is not None  # c is none of the characters that end a word
        self.pos = m.end()
        return ("str" if value_wanted else "ident"), m.group()


def parse(data: bytes | str) -> Section:
    """The tree of a metadata text (up to its first NUL byte)."""
    if isinstance(data, bytes):
        data = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    else:
        data = data.split("\0", 1)[0]
    tok = _Tokens(data)
    root: Section = {}
    stack: list[Section] = [root]
    while True:
        kind, word = tok.next(False)
        if kind == "eof":
            if len(stack) > 1:
                raise tok.fail("a section is not closed")
            return root
        if kind == "}":
            if len(stack) == 1:
                raise tok.fail("unexpected '}'")
            stack.pop()
            continue
        if kind not in ("ident", "str") or not word:
            raise tok.fail(f"expected a name, found {word or kind!r}")
        here = stack[-1]
        if word in here:
            raise tok.fail(f"{word!r} given twice")
        kind2, _ = tok.next(False)
        if kind2 == "{":
            if len(stack) > MAX_DEPTH:
                raise tok.fail("sections nested too deep")
            child: Section = {}
            here[word] = child
            stack.append(child)
        elif kind2 == "=":
            here[word] = _value(tok)
        else:
            raise tok.fail(f"expected '=' or '{{' after {word!r}")


def _scalar(tok: _Tokens, kind: str, word: str) -> Scalar:
    if kind in ("int", "float") and len(word) > 40:
        raise tok.fail(f"a number of {len(word)} digits")
    if kind == "int":
        return int(word)
    if kind == "float":
        return float(word if word not in (".", "+.", "-.") else "0")
    if kind == "str":
        return word
    raise tok.fail(f"expected a value, found {word or kind!r}")


def _value(tok: _Tokens) -> Value:
    kind, word = tok.next(True)
    if kind != "[":
        return _scalar(tok, kind, word)
    items: list[Scalar] = []
    while True:
        kind, word = tok.next(True)
        if kind == "]":
            return items
        items.append(_scalar(tok, kind, word))
        kind, word = tok.next(True)
        if kind == "]":
            return items
        if kind != ",":
            raise tok.fail(f"expected ',' or ']' in an array, found {word or kind!r}")


# ---- typed access ---------------------------------------------------------------------

def section(node: Section, key: str, where: str) -> Section:
    v = node.get(key)
    if not isinstance(v, dict):
        raise MetadataError(f"{where}: no section {key!r}")
    return v


def get_int(node: Section, key: str, where: str, default: int | None = None) -> int:
    v = node.get(key)
    if v is None and default is not None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise MetadataError(f"{where}: {key} must be an integer")
    return v


def get_str(node: Section, key: str, where: str, default: str | None = None) -> str:
    v = node.get(key)
    if v is None and default is not None:
        return default
    if not isinstance(v, str):
        raise MetadataError(f"{where}: {key} must be a string")
    return v


def get_strs(node: Section, key: str, where: str) -> list[str]:
    v = node.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise MetadataError(f"{where}: {key} must be a list of strings")
    return [str(x) for x in v]


def quote(text: str) -> str:
    """A double-quoted string as lvm2 writes it (dm_escape_double_quotes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
