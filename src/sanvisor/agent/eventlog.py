"""The agent's event log: on a QEMU host, what `dmesg` shows in the spirit of Xen's
message buffer. Each domain's life (started, paused, powered off, crashed,
rebooted, destroyed, a verb undone), the accelerator chosen, reattachments: the
agent's and drivers' INFO-and-above log records, one line each with a time stamp,
in ``events.log`` under the agent's home (at most ~1 MiB: then the older half goes
to ``events.log.1``). `dmesg -c` empties it after reading, as `xm dmesg -c`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

MAX_BYTES = 1 << 20
NAME = "events.log"
#: the loggers whose records are events (not the HTTP server's, not tracebacks)
SOURCES = ("sanvisor.agent", "sanvisor.drivers")


class EventLog:
    def __init__(self, home: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = home / NAME
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = f"({stamp}) {' '.join(line.split())}\n"  # one line, whatever it held
        with self._lock:
            with contextlib.suppress(OSError):
                if self.path.stat().st_size + len(text) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(NAME + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                os.write(fd, text.encode(errors="replace"))
            finally:
                os.close(fd)

    def read(self, *, clear: bool = False) -> str:
        with self._lock:
            parts = []
            for p in (self.path.with_name(NAME + ".1"), self.path):
                with contextlib.suppress(FileNotFoundError):
                    parts.append(p.read_text(errors="replace"))
            if clear:
                for p in (self.path.with_name(NAME + ".1"), self.path):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
            return "".join(parts)


_LOGS: dict[Path, EventLog] = {}


def for_home(home: Path) -> EventLog:
    """The one EventLog of an agent home in this process (one lock for the handler that
    writes it and the `dmesg -c` that empties it)."""
    if home not in _LOGS:
        _LOGS[home] = EventLog(home)
    return _LOGS[home]


class EventHandler(logging.Handler):
    """Copies the agent's log records into its event log."""

    def __init__(self, events: EventLog) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                msg = f"{record.levelname.lower()}: {msg}"
            self.events.append(msg)
        except Exception:
            self.handleError(record)


def install(home: Path) -> EventHandler:
    """Start copying the agent's events into ``home``'s event log (once per process)."""
    handler = EventHandler(for_home(home))
    for name in SOURCES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    return handler


def tail(path: Path, lines: int = 0, max_bytes: int = 4 << 20) -> str:
    """The last ``lines`` lines of a text file (0: all, up to its last ``max_bytes``)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode(errors="replace")
    if size > max_bytes:
        text = text.split("\n", 1)[-1]  # a whole first line
    if lines > 0:
        text = "".join(text.splitlines(keepends=True)[-lines:])
    return text


def uninstall(handler: EventHandler) -> None:
    for name in SOURCES:
        logging.getLogger(name).removeHandler(handler)
