"""TEST-ONLY fault injection into a lab Xen host's dom0 commands.

Never set in production: only the Xen fault tests (tests/xen/test_xen_migrate_faults.py)
start agents with ``SANVISOR_TEST_DOM0_FAULTS=FILE``. FILE (on the machine the agent
runs on) is read at every dom0 command the agent runs (:meth:`Dom0Link.run`), so a test
changes the faults of a running agent by rewriting it. Each line is a rule:

``fail WORD...``
    A command whose argv begins with these words is not run: it fails with exit
    status 1 and a libxl-like error line, as xl does when dom0 refuses.
``hold WORD...``
    Such a command runs; then its caller waits, before it sees the result, until the
    rule is removed from FILE (at most :data:`HOLD_MAX_S`). While it waits,
    ``FILE.held`` names the command (the test's signal: "it got here").

Anything else in FILE (blank lines, ``#`` comments) is ignored; a missing FILE means
no faults.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sanvisor.errors import TimeoutError_
from sanvisor.waiting import wait_until

log = logging.getLogger(__name__)
ENV = "SANVISOR_TEST_DOM0_FAULTS"
HOLD_MAX_S = 600.0


class Dom0Faults:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_env(cls) -> Dom0Faults | None:
        value = os.environ.get(ENV, "")
        return cls(Path(value)) if value else None

    def _rules(self) -> list[tuple[str, list[str]]]:
        try:
            text = self.path.read_text()
        except OSError:
            return []
        rules = []
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("fail", "hold"):
                rules.append((words[0], words[1:]))
        return rules

    def _matches(self, kind: str, argv: list[str]) -> list[str] | None:
        for k, words in self._rules():
            if k == kind and argv[:len(words)] == words:
                return words
        return None

    def fail(self, argv: list[str]) -> tuple[int, str, str] | None:
        """The result of ``argv`` made to fail, or None to run it."""
        words = self._matches("fail", argv)
        if words is None:
            return None
        log.warning("TEST FAULT: dom0 command %s made to fail", argv)
        return 1, "", (f"libxl: error: faults.py:0:test: TEST FAULT: {' '.join(words)} "
                       "made to fail\n")

    def hold(self, argv: list[str]) -> None:
        """After ``argv`` ran: wait while a hold rule names it."""
        words = self._matches("hold", argv)
        if words is None:
            return
        held = self.path.with_name(self.path.name + ".held")
        log.warning("TEST FAULT: holding after dom0 command %s", argv)
        held.write_text(" ".join(argv) + "\n")
        try:
            wait_until("the test's hold released",
                       lambda: self._matches("hold", argv) is None, HOLD_MAX_S, 0.1)
        except TimeoutError_:
            pass
        finally:
            held.unlink(missing_ok=True)
