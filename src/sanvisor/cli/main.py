"""sanvisor's command line: the xm verbs, plus agent, lab and guest-kit management.

Global options (``--json``, ``-H HOST``, ``--home DIR``) are taken from anywhere on
the line, before or after the verb, as users type them. Exit status: 0 done, 1
refused (a one-line ``sanvisor: error: ...``), 2 usage error (that verb's usage).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing costs ~4 ms to import: every CLI call would pay it
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn


class Globals:
    def __init__(self) -> None:
        self.json = False
        self.home: str | None = None
        self.on_host: str | None = None
        self.version = False


def split_globals(argv: list[str]) -> tuple[Globals, list[str]]:
    """Take the global options out of ``argv`` wherever they are (up to ``--``)."""
    g = Globals()
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a == "--json":
            g.json = True
        elif a == "--version":
            g.version = True
        elif a in ("--home", "-H") or (a.startswith(("--home=", "-H")) and a != "-H"):
            if a in ("--home", "-H"):
                if i + 1 >= len(argv):
                    _usage_error(f"{a} needs a value")
                value = argv[i + 1]
                i += 1
            else:
                value = a.split("=", 1)[1] if a.startswith("--home=") else a[2:]
            if "\0" in value:  # no path or host name holds one (Python: ValueError)
                opt = "--home" if a.startswith("--home") else "-H"
                _usage_error(f"{opt}: {value!r} has a NUL byte")
            if a.startswith("--home"):
                g.home = value
            else:
                g.on_host = value
        else:
            rest.append(a)
        i += 1
    return g, rest


def _usage_error(msg: str) -> NoReturn:
    print(f"usage: sanvisor [--json] [-H HOST] [--home DIR] VERB ...\n"
          f"sanvisor: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _verb_in(argv: list[str]) -> str | None:
    """The verb of a command line (globals removed), when it can be told cheaply."""
    from sanvisor.cli.parser import VERBS

    if any(a in ("-h", "--help") for a in argv):
        return None
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in VERBS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    g, rest = split_globals(argv)
    if g.version:
        from sanvisor import __version__

        print(f"sanvisor {__version__}")
        return 0
    from sanvisor.errors import SanvisorError

    try:
        return _run(g, rest)
    except SanvisorError as exc:
        print(f"sanvisor: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug of ours: one line, the traceback on request
        if os.environ.get("SANVISOR_DEBUG"):
            raise
        print(f"sanvisor: internal error: {type(exc).__name__}: {exc} (a bug: please "
              "report it; SANVISOR_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _run(g: Globals, rest: list[str]) -> int:
    from sanvisor.cli import fast

    if fast.accepts(rest):  # list, domid, uptime...: no argparse, few imports
        home = fast.agent_home(g.home, g.on_host)
        if g.home or g.on_host:
            os.environ["SANVISOR_HOME"] = home
        return fast.run(rest, as_json=g.json, home=home)
    from pathlib import Path

    from sanvisor.cli.parser import build_parser

    parser, innermost = build_parser(only=_verb_in(rest))
    args, extras = parser.parse_known_args(rest)
    if extras:
        (innermost[0] if innermost else parser).error(
            f"unrecognized arguments: {' '.join(extras)}")
    if not args.verb:
        parser.print_help()
        return 2
    args.json, args.on_host = g.json, g.on_host
    args.home = Path(g.home) if g.home else None
    layout = _layout(args)
    from sanvisor.cli import verbs

    return verbs.dispatch(args, layout)


def _layout(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from sanvisor.cli.fast import agent_home
    from sanvisor.paths import Layout

    home = agent_home(str(args.home) if args.home else None, args.on_host)
    if args.home or args.on_host:
        os.environ["SANVISOR_HOME"] = home
    return Layout(Path(home))
