"""Every request ends: completed, resent within a bound, or failed as the policy says.

Faults on the real data path (the multipath daemon in front of the real array):
a link cut in the middle of a read's data, a path that goes silent while its link
looks up, requests the array must not see, a request that kills every path it
is sent on, and link states the checker must read as down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sanvisor.storage import nbdproto as P
from sanvisor.storage.enginemap import MAX_TRIES, link_up
from tests.storage.harness import Replies, bench

MIB = 1 << 20
FAILOVER = ("defaults {\n user_friendly_names yes\n polling_interval 0.2\n}\n"
            "devices {\n device {\n  vendor \"HITACHI\"\n  product \"DF600F\"\n"
            "  path_grouping_policy failover\n  no_path_retry queue\n }\n}\n")


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


@pytest.mark.parametrize("cut", ["reset", "blackhole"])
def test_a_read_cut_in_the_middle_of_its_data_is_resent(cut: str) -> None:
    """The reply header and 4 KiB of a 1 MiB read arrive, then path A's link dies: reset
    (the connection breaks) or silent (nothing more comes while the link looks up: the
    I/O timeout fails the path). The read is resent on B and completes, whole."""
    with bench(conf=FAILOVER, io_timeout=0.5) as (_arr, host):
        g = Replies(host.guest())
        data = _pattern(MIB, 3)
        assert g.io(P.CMD_WRITE, 0, MIB, data)[0] == 0
        host.call(lambda: host.fabrics[0].cut_replies_after(16 + 4096, cut))
        assert g.io(P.CMD_READ, 0, MIB) == (0, data)
        view = host.view()
        assert view["paths"][0]["failures"] >= 1 and view["io_errors"] == 0, view
        if cut == "blackhole":
            assert "I/O timeout" in view["paths"][0]["reason"] or \
                view["paths"][0]["state"] == "ready", view


def test_a_silent_path_with_writes_in_flight_times_out_and_fences() -> None:
    """Path A carries nothing any more but its link looks up: its writes time out, A's
    session is fenced through B, and they complete on B."""
    with bench(conf=FAILOVER, io_timeout=0.5) as (arr, host):
        g = Replies(host.guest())
        token_a = host.call(lambda: host.path(0).session)
        host.call(host.fabrics[0].blackhole)
        blocks = {i: _pattern(65536, i) for i in range(8)}
        cookies = {i: g.send(P.CMD_WRITE, i * 65536, 65536, blocks[i]) for i in blocks}
        assert all(g.wait(c)[0] == 0 for c in cookies.values())
        view = host.view()
        assert view["fences"] == 1 and "I/O timeout" in view["paths"][0]["reason"], view
        assert arr.session(token_a).get("gone")
        for i, block in blocks.items():
            assert g.io(P.CMD_READ, i * 65536, 65536) == (0, block)


def test_requests_the_array_refuses_never_reach_a_path() -> None:
    """A read over the maximum payload, unknown commands and flags get EINVAL from the
    map itself; a write over the maximum closes that client's connection (the spec
    lets a server treat a payload over 2^25 bytes as denial of service). No path
    fails and another client is not disturbed."""
    with bench(conf=FAILOVER) as (_arr, host):
        other = Replies(host.guest())
        g = host.guest()
        assert g.request(P.CMD_READ, 0, P.MAX_REQUEST + 1)[0] == P.EINVAL
        assert g.request(P.CMD_READ, 0, 4096, flags=1 << 5)[0] == P.EINVAL  # unknown flag
        assert g.request(P.CMD_WRITE, 0, 4096, b"x" * 4096, P.CMD_FLAG_NO_HOLE)[0] == \
            P.EINVAL
        for cmd in (P.CMD_CACHE, 7, 0xFFFF):  # not offered, BLOCK_STATUS, nonsense
            assert g.request(cmd, 0, 4096)[0] == P.EINVAL
        assert g.request(P.CMD_READ, 1 << 62, 4096)[0] == P.EINVAL  # past the end
        assert g.request(P.CMD_TRIM, 0, 48 * MIB)[0] == 0  # no payload: no maximum
        assert g.request(P.CMD_READ, 0, 4096, flags=P.CMD_FLAG_FUA)[0] == 0  # a no-op
        g.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 99, 0,
                                      P.MAX_REQUEST + 1) + b"x" * 4096)
        g.sock.settimeout(10)
        try:
            got = g.sock.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b"", "the connection stays open after an oversized write"
        g.close()
        assert other.io(P.CMD_WRITE, 0, 4096, b"y" * 4096)[0] == 0
        assert other.io(P.CMD_READ, 0, 4096) == (0, b"y" * 4096)
        view = host.view()
        assert all(p["failures"] == 0 and p["state"] == "ready" for p in view["paths"])


def test_a_request_that_kills_every_path_fails_after_max_tries() -> None:
    """A write whose execution cuts whichever session runs it (the array's poison hook):
    it is resent (after each fence) on MAX_TRIES paths, then fails with EIO and is
    counted; the paths come back and the map serves I/O again."""
    with bench(conf=FAILOVER) as (arr, host):
        g = Replies(host.guest())
        arr.control(f"poison {7 * 65536}")
        assert g.io(P.CMD_WRITE, 7 * 65536, 65536, b"p" * 65536)[0] == P.EIO
        view = host.view()
        assert view["retries_exhausted"] == 1 and view["io_errors"] == 1, view
        assert sum(p["failures"] for p in view["paths"]) == MAX_TRIES
        arr.control("poison -1")
        assert g.io(P.CMD_WRITE, 0, 4096, b"q" * 4096)[0] == 0
        assert g.io(P.CMD_READ, 0, 4096) == (0, b"q" * 4096)


def test_link_states(tmp_path: Path) -> None:
    """Only "up" (or "unknown", drivers without operstate) with carrier is up."""
    def sysfs(state: str, carrier: str | None) -> Path:
        d = tmp_path / state / str(carrier)
        d.mkdir(parents=True)
        (d / "operstate").write_text(state + "\n")
        if carrier is not None:
            (d / "carrier").write_text(carrier + "\n")
        return d.parent

    for state, carrier, up in [("up", "1", True), ("unknown", "1", True),
                               ("lowerlayerdown", "1", False), ("down", "0", False),
                               ("dormant", "1", False), ("notpresent", "1", False),
                               ("testing", "1", False), ("up", "0", False),
                               ("up", None, False)]:
        assert link_up(str(carrier), sysfs(state, carrier)) is up, (state, carrier)
    assert link_up("no-such-interface") is False


@pytest.mark.skipif(os.geteuid() != 0, reason="creates network namespaces")
def test_a_veth_whose_peer_goes_down_is_down_at_once() -> None:
    """A veth whose peer (the fabric's side) goes down keeps operstate "up" for up to a
    second (the kernel's link watch) but loses carrier at once: read as down."""
    ns = f"svlk{os.getpid() % 100000}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns + "a")
    try:
        ip("netns", "add", ns + "b")
        ip("-n", ns + "a", "link", "add", "hba0", "type", "veth", "peer", "name", "fab",
           "netns", ns + "b")
        ip("-n", ns + "a", "link", "set", "hba0", "up")
        ip("-n", ns + "b", "link", "set", "fab", "up")
        probe = ["ip", "netns", "exec", ns + "a", sys.executable, "-c",
                 "from sanvisor.storage.enginemap import link_up; print(link_up('hba0'))"]

        def up() -> str:
            return subprocess.run(probe, capture_output=True, text=True,
                                  check=True).stdout.strip()

        deadline = time.monotonic() + 5
        while up() != "True":  # carrier comes up asynchronously after "link set up"
            assert time.monotonic() < deadline, "the veth never came up"
        ip("-n", ns + "b", "link", "set", "fab", "down")
        assert up() == "False"
        ip("-n", ns + "b", "link", "set", "fab", "up")
        ip("-n", ns + "a", "link", "set", "hba0", "down")
        assert up() == "False"
    finally:
        subprocess.run(["ip", "netns", "del", ns + "a"], check=False)
        subprocess.run(["ip", "netns", "del", ns + "b"], check=False)
