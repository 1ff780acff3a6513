"""Fault injection on the data path: a workload of checked writes and reads through
/dev/mapper/NAME while a seeded schedule kills array sessions, resets and cuts
links (also in the middle of a reply, or silently), slows fdatasync, delivers
replies in small pieces and takes HBAs down and up.

What must hold, whatever the interleaving: every request ends (a reply comes,
even if faults were still going on when it was sent); every read returns the
last acknowledged data of its block; at the end the LUN holds exactly the last
acknowledged write of every block (a stale write replayed anywhere would show
as an older value). The schedule is a seeded random sequence, so a failing seed
replays the same faults.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from sanvisor.storage import nbdproto as P
from tests.storage.harness import DEADLINE, Host, Replies, bench

BLOCK = 4096
BLOCKS = 24  # few: blocks are rewritten often, so a replayed stale write shows
MULTIBUS = ("defaults {\n user_friendly_names yes\n polling_interval 0.2\n}\n"
            "devices {\n device {\n  vendor \"HITACHI\"\n  product \"DF600F\"\n"
            "  path_grouping_policy multibus\n  no_path_retry queue\n }\n}\n")


def _data(block: int, version: int) -> bytes:
    head = f"block {block:05d} version {version:07d}\n".encode()
    return head * (BLOCK // len(head)) + b"\0" * (BLOCK % len(head))


class Faults:
    """The seeded schedule of faults, and their undoing."""

    def __init__(self, host: Host, arr: Any, rng: random.Random) -> None:
        self.host, self.arr, self.rng = host, arr, rng
        self.stalled: list[int] = []
        self.pending: tuple[int, int] | None = None  # (step, HBA): cut it then
        self.cut_sessions: set[int] = set()
        self.scrub = False  # read everything back once the released sessions are idle
        self.down: set[int] = set()
        self.log: list[str] = []

    def tokens(self) -> list[int]:
        return [t for t in self.host.call(lambda: [p.session for p in
                                                   self.host.map().paths]) if t]

    def inject(self, step: int) -> None:
        for token in self.release():  # a slowed fdatasync lasts until the next fault
            self.arr.wait(token, "idle")  # it ran what it still held (if not fenced)
            self.scrub = True
        kind = self.rng.choice(["kill", "reset", "cut", "silent", "stall", "chunks",
                                "hba", "heal", "stall+hba"])
        k = self.rng.randrange(2)
        fab = self.host.fabrics[k]
        self.log.append(f"{kind} {k}")
        if kind == "kill" and (tokens := self.tokens()):
            self.arr.control(f"kill {self.rng.choice(tokens):x}")
        elif kind == "reset":
            self.host.call(fab.reset)
        elif kind in ("cut", "silent"):
            n = self.rng.choice([3, 16, 20, 4096, 5000])
            mode = "reset" if kind == "cut" else "blackhole"
            self.host.call(lambda: fab.cut_replies_after(n, mode))
        elif kind == "stall" and (tokens := self.tokens()):
            token = self.rng.choice(tokens)
            self.arr.control(f"stall {token:x} flush")
            self.stalled.append(token)
        elif kind == "chunks":
            sizes = [self.rng.randint(1, 40) for _ in range(3)]
            self.host.call(lambda: fab.chunk_replies(sizes))
        elif kind == "hba" and len(self.down) == 0:
            self.cut(k)
        elif kind == "stall+hba" and len(self.down) == 0:
            # the case: a slow request on a path (its next one: a flush or a
            # write held in the array), requests queued behind it, then its link cut
            # (well within the I/O timeout)
            paths = self.host.call(lambda: [p.session for p in self.host.map().paths])
            if paths[k]:
                self.arr.control(f"stall {paths[k]:x} any")
                self.stalled.append(paths[k])
                self.pending = (step + 8, k)
        elif kind == "heal":
            self.heal()

    def tick(self, step: int) -> None:
        if self.pending is not None and step >= self.pending[0]:
            self.cut(self.pending[1])
            self.pending = None

    def cut(self, k: int) -> None:
        self.log.append(f"cut {k}")
        token = self.host.call(lambda: self.host.path(k).session)
        if token:
            self.cut_sessions.add(token)
        self.host.call(self.host.fabrics[k].blackhole)  # the array's end half-open
        self.host.hba_down(k)
        self.down.add(k)

    def release(self) -> list[int]:
        """Let slowed fdatasyncs go on; the sessions whose link was cut meanwhile (what
        they still hold would be stale if it ever ran)."""
        cut = [t for t in self.stalled if t in self.cut_sessions]
        for token in self.stalled:
            self.arr.control(f"release {token:x}")
        self.stalled.clear()
        return cut

    def heal(self) -> None:
        for k in list(self.down):
            self.host.call(self.host.fabrics[k].heal)
            self.host.hba_up(k)
            self.down.discard(k)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_acknowledged_write_is_lost_under_random_faults(seed: int) -> None:
    rng = random.Random(seed)
    with bench(conf=MULTIBUS, io_timeout=1.0, fence_timeout=1.0) as (arr, host):
        g = Replies(host.guest())
        faults = Faults(host, arr, rng)
        acked: dict[int, bytes] = {}  # block -> its last acknowledged data
        version = 0
        busy: dict[int, tuple[int, str, bytes]] = {}  # cookie -> (block, op, data)
        lock = threading.Lock()
        done = threading.Event()
        problems: list[str] = []

        def settle() -> None:
            for cookie in [c for c in busy if g.events[c].is_set()]:
                block, op, data = busy.pop(cookie)
                err, got = g.got[cookie]
                if op == "write":
                    if err:
                        problems.append(f"write of block {block} failed: {err}")
                    else:
                        acked[block] = data
                elif op == "read":
                    if err:
                        problems.append(f"read of block {block} failed: {err}")
                    elif got != acked.get(block, bytes(BLOCK)):
                        problems.append(f"block {block} read back {got[:32]!r}, last "
                                        f"acknowledged {acked.get(block, b'')[:32]!r}")
                elif err:
                    problems.append(f"flush failed: {err}")

        for step in range(1500):
            with lock:
                settle()
            faults.tick(step)
            if step % 40 == 17:
                faults.inject(step)
            if faults.scrub:  # a stale write replayed anywhere shows now
                faults.scrub = False
                for cookie in list(busy):
                    assert g.events[cookie].wait(DEADLINE), f"request {busy[cookie][:2]}"
                settle()
                for b in range(BLOCKS):
                    busy[g.send(P.CMD_READ, b * BLOCK, BLOCK)] = (b, "read", b"")
                continue
            if len(busy) >= 8:
                g.any.clear()
                settle()
                if len(busy) >= 8:
                    g.any.wait(0.05)  # pacing of the loop, not a synchronisation
                continue
            free = [b for b in range(BLOCKS) if all(x[0] != b for x in busy.values())]
            block = rng.choice(free)
            op = rng.choice(["write", "write", "write", "read", "flush"])
            if op == "write":
                version += 1
                data = _data(block, version)
                busy[g.send(P.CMD_WRITE, block * BLOCK, BLOCK, data)] = (block, op, data)
            elif op == "read":
                busy[g.send(P.CMD_READ, block * BLOCK, BLOCK)] = (block, op, b"")
            else:
                busy[g.send(P.CMD_FLUSH, 0, 0)] = (-1, op, b"")
        faults.release()
        faults.heal()
        for cookie in list(busy):
            assert g.events[cookie].wait(DEADLINE), \
                f"request {busy[cookie][:2]} never ended; faults: {faults.log}"
        settle()
        done.set()
        assert g.io(P.CMD_FLUSH, 0, 0)[0] == 0
        for block in range(BLOCKS):
            err, got = g.io(P.CMD_READ, block * BLOCK, BLOCK)
            if err or got != acked.get(block, bytes(BLOCK)):
                problems.append(f"at the end, block {block} holds {got[:32]!r}")
        view = host.view()
        assert not problems, f"{problems[:5]}\nfaults: {faults.log}\n{view}"
        assert view["io_errors"] == 0, view
        g.guest.close()
