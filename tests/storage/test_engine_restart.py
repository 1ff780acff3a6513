"""The engine dies (kill -9), hangs (SIGSTOP) or its agent dies: no acknowledged
write is lost.

- a client that writes sequence-numbered blocks, and resends what was in flight
  after reconnecting (as QEMU's NBD client does), while the engine is killed
  with SIGKILL three times: the agent starts another each time, the client
  reconnects to the same socket, and every block holds its last acknowledged
  write, through the engine and in the LUN itself;
- the same client while the engine is stopped (SIGSTOP: alive, answering
  nothing) twice: the agent's watchdog misses its ping, kills it and starts
  another; every acknowledged block is there, and the time from the SIGSTOP to
  the next acknowledged write is printed (-s shows it);
- the stale-write scenario across an engine crash: a write queued at the array
  behind a slow fdatasync on a path whose link then died, the engine killed: the
  new engine fences the dead engine's sessions before it sends anything, so the
  block rewritten through it keeps the newer data; the same run with the
  sessions file removed before the new engine starts shows the stale write
  replayed (what makes the first a test);
- a new agent adopts the running engine: a client's connection lives through it;
- an engine without agent and without client ends by itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sanvisor.storage import nbdproto as P
from sanvisor.storage.multipathd import Multipathd
from sanvisor.waiting import wait_until
from tests.storage.enginekit import BUILD, engine_bench, recv_exactly
from tests.storage.harness import DEADLINE, ArrayProc, Host

BS = 4096
BLOCKS = 64
OLD, STALE, NEW = b"O" * BS, b"S" * BS, b"N" * BS
FAILOVER = ("defaults {\n user_friendly_names yes\n polling_interval 0.2\n}\n"
            "devices {\n device {\n  vendor \"HITACHI\"\n  product \"DF600F\"\n"
            "  path_grouping_policy failover\n  no_path_retry queue\n }\n}\n")


class Resender:
    """An NBD client that reconnects and resends what it had in flight, as QEMU does
    (reconnect-delay): what it was not answered, it asks again."""

    def __init__(self, host: Host) -> None:
        self.path = str(host.home / "mapper" / f"{host.map().name}.sock")
        self.name = host.map().name
        self.sock: socket.socket | None = None
        self.inflight: dict[int, tuple[int, int, bytes]] = {}  # cookie -> (cmd, off, data)
        self.cookie = 0
        self.reconnects = -1

    def connect(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(DEADLINE)
                s.connect(self.path)
                recv_exactly(s, 18)
                data = P.go_request(self.name)
                s.sendall(b"\0\0\0\3" + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data))
                          + data)
                while True:
                    _m, _o, rtype, length = P.OPT_REPLY.unpack(recv_exactly(s, 20))
                    recv_exactly(s, length)
                    if rtype == P.REP_ACK:
                        break
                    assert not rtype & (1 << 31)
                break
            except (OSError, ConnectionError):
                s.close()
                assert time.monotonic() < deadline, "cannot reconnect to the map"
                time.sleep(0.01)
        self.sock = s
        self.reconnects += 1
        for cookie, (cmd, off, data) in self.inflight.items():  # resent, as QEMU does
            s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, cmd, cookie, off, len(data) or BS)
                      + (data if cmd == P.CMD_WRITE else b""))

    def send(self, cmd: int, off: int, data: bytes = b"") -> int:
        self.cookie += 1
        self.inflight[self.cookie] = (cmd, off, data)
        assert self.sock is not None
        try:
            self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, cmd, self.cookie, off,
                                             len(data) or BS)
                              + (data if cmd == P.CMD_WRITE else b""))
        except OSError:
            self.connect()  # resends it with the rest
        return self.cookie

    def receive(self) -> tuple[int, int, bytes]:
        while True:
            try:
                assert self.sock is not None
                _magic, err, cookie = P.SIMPLE_REPLY.unpack(recv_exactly(self.sock, 16))
                cmd, _off, _data = self.inflight[cookie]
                data = recv_exactly(self.sock, BS) if cmd == P.CMD_READ and not err else b""
                del self.inflight[cookie]
                return cookie, err, data
            except (OSError, ConnectionError):
                self.connect()


def _block(i: int, version: int) -> bytes:
    head = f"block {i:04d} version {version:08d}\n".encode()
    return head * (BS // len(head)) + b"\0" * (BS % len(head))


class EngineKiller(threading.Thread):
    """Fault injector: send the host's engine ``sig`` ``times`` times, ``every``
    seconds apart (the faults' pacing, not a synchronisation), each time until the
    agent side runs the next engine; ``done`` is set at the end, whatever happened.
    SIGKILL: the engine dies; SIGSTOP: it hangs, alive, until the watchdog kills it.
    ``hit_at``, ``pids``: when each signal was sent (time.monotonic), and to whom."""

    def __init__(self, host: Host, times: int = 3, every: float = 0.4,
                 sig: signal.Signals = signal.SIGKILL) -> None:
        super().__init__(daemon=True)
        self.host, self.times, self.every, self.sig = host, times, every, sig
        self.kills = 0
        self.hit_at: list[float] = []
        self.pids: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for _ in range(self.times):
                time.sleep(self.every)
                pid = self.host.engine.pid
                self.hit_at.append(time.monotonic())
                self.pids.append(pid)
                os.kill(pid, self.sig)
                self.kills += 1
                wait_until("the next engine", lambda old=pid: self.host.engine.pid != old,
                           DEADLINE, 0.01)
        finally:
            self.done.set()


def _write_through(arr: ArrayProc, host: Host, killer: EngineKiller) -> list[float]:
    """Write sequence-numbered blocks (8 in flight, resent after each reconnect) while
    ``killer`` hits the engine; then every block must hold its last acknowledged write,
    through the engine and on the LUN. Returns when each write was acknowledged."""
    c = Resender(host)
    c.connect()
    acked: dict[int, bytes] = {}
    acked_at: list[float] = []
    busy: dict[int, tuple[int, bytes]] = {}  # cookie -> (block, data)
    version = 0
    stop = killer.done
    killer.start()
    try:
        while not stop.is_set() or busy:
            while len(busy) < 8 and not stop.is_set():
                free = [b for b in range(BLOCKS) if all(x[0] != b for x in busy.values())]
                block = free[version % len(free)]
                version += 1
                data = _block(block, version)
                busy[c.send(P.CMD_WRITE, block * BS, data)] = (block, data)
            cookie, err, _ = c.receive()
            block, data = busy.pop(cookie)
            assert err == 0, f"a write failed: {err}"
            acked[block] = data
            acked_at.append(time.monotonic())
    finally:
        killer.join(DEADLINE * 4)
    assert killer.kills == killer.times and host.engine.restarts == killer.times
    assert c.reconnects >= killer.times, "the client never lost its connection"
    for block in range(BLOCKS):
        c.send(P.CMD_READ, block * BS)
        _cookie, err, data = c.receive()
        assert err == 0 and data == acked.get(block, bytes(BS)), f"block {block}"
    lun = Path(arr.lun("sys").backing).read_bytes()
    for block, data in acked.items():
        assert lun[block * BS:(block + 1) * BS] == data, f"block {block} on the LUN"
    assert version > 100, "too few writes to mean anything"
    return acked_at


def test_kill_9_mid_write_loses_no_acknowledged_write(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    with engine_bench(monkeypatch, sanitized=False, restarts=True) as (arr, host):
        _write_through(arr, host, EngineKiller(host))
        assert host.engine.hangs == 0  # each one died: not a watchdog's doing


def _resumed(acked_at: list[float], hit: float) -> float:
    """When writes flowed again after a fault at ``hit``: the end of the first gap of
    a second or more between two acknowledgements (what was answered before the
    engine stopped may still arrive just after)."""
    prev = max((t for t in acked_at if t <= hit), default=hit)
    for t in (t for t in acked_at if t > hit):
        if t - prev >= 1.0:
            return t
        prev = t
    raise AssertionError(f"no stall after the fault at {hit}")


def test_a_hung_engine_is_killed_by_the_watchdog_and_replaced(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """SIGSTOP (alive, silent) twice under writes: the watchdog (its default 2 s)
    kills and replaces it each time, saying why; nothing acknowledged is lost."""
    monkeypatch.delenv("SANVISOR_ENGINE_WATCHDOG", raising=False)
    with engine_bench(monkeypatch, sanitized=False, restarts=True) as (arr, host):
        assert host.engine.watchdog == 2.0
        killer = EngineKiller(host, times=2, sig=signal.SIGSTOP)
        acked_at = _write_through(arr, host, killer)
        assert host.engine.hangs == 2, "restarted, but not by the watchdog"
        assert caplog.text.count("did not answer a ping within 2 s (hung): killing it") == 2
        for pid in killer.pids:  # the stopped engines are gone, not left stopped
            assert not Path(f"/proc/{pid}").exists(), f"engine {pid} is still there"
        restarts = [_resumed(acked_at, hit) - hit for hit in killer.hit_at]
        offset = time.time() - time.monotonic()
        kills = [r.created - offset for r in caplog.records if "(hung)" in r.getMessage()]
        after = [_resumed(acked_at, hit) - kill for hit, kill in zip(killer.hit_at, kills,
                                                                     strict=True)]
        print(f"\nSIGSTOP to the next acknowledged write: "
              f"{', '.join(f'{r:.3f} s' for r in restarts)} (watchdog 2 s); of which "
              f"from the watchdog's SIGKILL: {', '.join(f'{a:.3f} s' for a in after)}")
        for r in restarts:  # not before the deadline; the ping period and a restart after
            assert 1.9 <= r < 6.0, restarts


def _stale_scenario(arr: object, host: Host) -> bytes:
    """The dead engine's path A held a write behind a stalled fdatasync, its link cut;
    a new engine; the block rewritten through it. Returns what block 0 holds."""
    from tests.storage.harness import ArrayProc, Replies

    assert isinstance(arr, ArrayProc)
    g = Replies(host.guest())
    assert g.io(P.CMD_WRITE, 0, BS, OLD)[0] == 0
    assert g.io(P.CMD_FLUSH, 0, 0)[0] == 0
    token_a = host.call(lambda: host.path(0).session)
    arr.control(f"stall {token_a:x} flush")
    g.send(P.CMD_FLUSH, 0, 0)
    g.send(P.CMD_WRITE, 0, BS, STALE)
    arr.wait(token_a, "stalled")
    arr.wait(token_a, "queued", 1)
    host.call(host.fabrics[0].blackhole)  # A's end stays half-open at the array
    host.hba_down(0)
    pid = host.engine.pid
    os.kill(pid, signal.SIGKILL)
    host.until("a new engine", lambda: host.engine.pid != pid and host.engine.restarts == 1)
    host.until("path B ready", lambda: host.map().view()["paths"][1]["state"] == "ready")
    g2 = Replies(host.guest())  # the client reconnects
    new = g2.send(P.CMD_WRITE, 0, BS, NEW)
    fenced = threading.Event()

    def watch() -> None:
        with contextlib.suppress(AssertionError):  # no fence at all: the control run
            arr.wait(token_a, "fences", 1)
            fenced.set()

    threading.Thread(target=watch, daemon=True).start()
    acked = g2.events[new]
    deadline = time.monotonic() + DEADLINE
    while not (fenced.is_set() or acked.is_set()):
        assert time.monotonic() < deadline, "neither a fence nor a reply"
        time.sleep(0.005)
    if fenced.is_set():
        assert not acked.is_set(), "the write went out before the dead engine's fence"
    arr.control(f"release {token_a:x}")
    assert g2.wait(new)[0] == 0
    assert g2.io(P.CMD_FLUSH, 0, 0)[0] == 0
    # whatever A still held has run (no fence), or was discarded with it (fenced)
    arr.wait(token_a, "ended" if fenced.is_set() else "idle")
    err, data = g2.io(P.CMD_READ, 0, BS)
    assert err == 0
    g2.guest.close()
    g.guest.close()
    return data


def test_a_new_engine_fences_the_dead_engines_sessions_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with engine_bench(monkeypatch, sanitized=False, restarts=True, conf=FAILOVER) as (arr, host):
        assert _stale_scenario(arr, host) == NEW
        assert host.view()["io_errors"] == 0


def test_without_its_sessions_file_a_new_engine_replays_a_stale_write(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What makes the test above a test: the same crash, the sessions file removed
    before the new engine starts: the stale write lands over the newer data."""
    wrapper = tmp_path / "sanvisor-engine"
    wrapper.write_text("#!/bin/sh\nprev=\nfor a in \"$@\"; do [ \"$prev\" = --state ] && "
                       "rm -f \"$a/sessions\"; prev=$a; done\n"
                       f"exec {BUILD / 'sanvisor-engine'} \"$@\"\n")
    wrapper.chmod(0o755)
    with engine_bench(monkeypatch, sanitized=False, restarts=True, conf=FAILOVER) as (arr, host):
        monkeypatch.setenv("SANVISOR_ENGINE", str(wrapper))  # for the restart
        assert _stale_scenario(arr, host) == STALE


def _agent_dies(host: Host) -> None:
    """The host's agent side ends as after kill -9: its engine is left running."""
    old = host.mpd

    async def dies() -> None:
        old.backend.engine._stopping = True
        old.backend.engine.link.close()
        old.backend.engine._watcher.cancel()
        if old._task is not None:
            old._task.cancel()

    host.call(dies)


def test_a_new_agent_adopts_the_running_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    with engine_bench(monkeypatch, sanitized=False, restarts=True) as (_arr, host):
        g = host.guest()
        g.pwrite(b"a" * BS, 0)
        pid = host.engine.pid
        _agent_dies(host)
        g.pwrite(b"b" * BS, 0)  # no agent: the data path goes on
        new = Multipathd(host.home)
        host.mpd = new
        host.call(new.start)
        assert new.backend.engine.pid == pid  # adopted
        host.until("paths ready", lambda: all(p.ready for p in new.paths.values()))
        assert g.pread(BS, 0) == b"b" * BS  # the same connection, all along
        assert new.view()["maps"][0]["paths"][0]["written_bytes"] >= BS


def test_a_new_agent_kills_the_hung_engine_it_finds(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The agent dies, its engine hangs (SIGSTOP); the next agent does not adopt it
    nor start another beside it: it kills it (after the watchdog's 2 s), then runs its
    own, and the data written before is read through the new one."""
    monkeypatch.delenv("SANVISOR_ENGINE_WATCHDOG", raising=False)
    with engine_bench(monkeypatch, sanitized=False, restarts=True) as (_arr, host):
        host.guest().pwrite(b"h" * BS, 0)
        old = host.engine
        _agent_dies(host)
        os.kill(old.pid, signal.SIGSTOP)
        new = Multipathd(host.home)
        host.mpd = new
        host.call(new.start)
        assert new.backend.engine.pid != old.pid
        assert old.proc.wait(DEADLINE) == -signal.SIGKILL  # killed, not left stopped
        assert f"data-path engine {old.pid} does not answer (nothing within 2 s): " \
            "killing it (SIGKILL)" in caplog.text
        host.until("paths ready", lambda: all(p.ready for p in new.paths.values()))
        assert host.guest().pread(BS, 0) == b"h" * BS


def test_an_engine_that_drops_its_agent_is_replaced_not_doubled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An adopted engine (a previous agent's) closes the agent's control connection
    but lives (here: a line too long): the agent kills it before it starts the next
    one; never two engines."""
    with engine_bench(monkeypatch, sanitized=False, restarts=True) as (_arr, host):
        host.guest().pwrite(b"d" * BS, 0)
        old = host.engine.proc
        _agent_dies(host)
        host.mpd = Multipathd(host.home)
        host.call(host.mpd.start)
        assert host.engine.pid == old.pid and host.engine.proc is None  # adopted

        def garbage() -> None:
            with contextlib.suppress(OSError):
                host.engine.link.sock.sendall(b"x" * 70000)

        host.call(garbage)
        host.until("the next engine", lambda: host.engine.restarts == 1)
        assert old.wait(DEADLINE) == -signal.SIGKILL
        host.until("paths ready", lambda: all(p.ready for p in host.mpd.paths.values()))
        assert host.guest().pread(BS, 0) == b"d" * BS


def test_an_engine_without_agent_and_client_ends(tmp_path: Path) -> None:
    proc = subprocess.Popen([str(BUILD / "sanvisor-engine"), "--control",
                             str(tmp_path / "c.sock"), "--state", str(tmp_path),
                             "--idle-exit", "0.3"], stderr=subprocess.PIPE)
    try:
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"no agent and no client" in (proc.stderr.read() if proc.stderr else b"")
