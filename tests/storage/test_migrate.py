"""`migrate [-l]` between two QEMU hosts of the SAN lab: a guest on a multipath LUN,
on the lab's LAN, moves with its memory, its writes and its network; the seed's
trap (the same name for another LUN on the target) is refused; a failure in the
middle leaves exactly one running copy, where it was."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanvisor.lab.guestshell import GuestShell
from tests.guest.helpers import qemu_pids, wait_until
from tests.labcli import LabCli

pytestmark = [pytest.mark.lab, pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]
WWPNS = ["10:00:00:00:c9:00:01:00", "10:00:00:00:c9:00:01:01",
         "10:00:00:00:c9:00:02:00", "10:00:00:00:c9:00:02:01"]
GUEST_IP = "10.213.100.50"
MAC = "00:16:3e:00:aa:01"
N = 200  # sequence-numbered records the guest writes across the migrations


class Pool(LabCli):
    def rows(self) -> list[dict[str, Any]]:
        return [r for r in self.js("list", "--pool") if r["name"] == "m1"]

    def shell(self, host: str) -> GuestShell:
        row = next(r for r in self.js("-H", host, "list") if r["name"] == "m1")
        return GuestShell(row["console_socket"])

    def lan(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", f"{self.name}-lan", *cmd],
                              capture_output=True, text=True, check=check, timeout=120)

    def wwid(self, lun: str) -> str:
        return str(next(x["wwid"] for x in self.js("array", "lun", "list")
                        if x["name"] == lun))


@pytest.fixture(scope="module")
def pool(kit: object) -> Iterator[Pool]:
    root = Path(tempfile.mkdtemp(prefix="svmig", dir="/tmp"))
    shutil.rmtree(root)
    p = Pool(root, f"m{os.getpid() % 100000}")
    # the target's watch of the source's hold, every 20 ms instead of 2 s: a race between
    # it and the switch-over (it once removed the copy just handed over) shows at once
    p.env["SANVISOR_MIGRATE_WATCH_S"] = "0.02"
    try:
        p.sv("lab", "up", "--hosts", "2", "--name", p.name)
        for lun in ("sys", "other"):
            p.sv("array", "lun", "create", lun, "--size", "32M")
            for w in WWPNS:
                p.sv("array", "zone", "add", lun, w)
        for host in ("host1", "host2"):
            p.sv("-H", host, "scsi", "rescan")
        conf = root / "pool.conf"
        conf.write_text("defaults {\n  user_friendly_names yes\n}\nmultipaths {\n"
                        f"  multipath {{\n    wwid {p.wwid('sys')}\n    alias sys\n  }}\n"
                        f"  multipath {{\n    wwid {p.wwid('other')}\n    alias other\n  }}\n"
                        "}\n")
        p.sv("multipath", "push", str(conf))
        cfg = root / "m1.cfg"
        cfg.write_text(f'name = "m1"\nmemory = 128\nvif = [ "mac={MAC}, bridge=xenbr0, '
                       f'ip={GUEST_IP}/24" ]\ndisk = [ "phy:/dev/mapper/sys,sda,w" ]\n')
        p.sv("-H", "host1", "create", str(cfg))
        row = next(r for r in p.js("-H", "host1", "list") if r["name"] == "m1")
        log = Path(row["console_log"])
        wait_until("m1's marker", lambda: b"SANVISOR-READY" in log.read_bytes(), 60)
        yield p
    finally:
        p.sv("lab", "down", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _affinity(pool: Pool, host: str) -> list[int]:
    return list(next(v for v in pool.js("-H", host, "vcpu-list", "m1")
                     if v["vcpu"] == 0)["affinity"])


def test_live_migration_keeps_memory_writes_and_network(pool: Pool) -> None:
    guest = pool.shell("host1")
    guest.run("echo moved-not-rebooted > /run/mark")
    pool.sv("-H", "host1", "vcpu-pin", "m1", "0", "1")  # kept where the target has CPU 1
    assert _affinity(pool, "host1") == [1]
    c1 = guest.counter()
    guest.run(f"(i=0; e=0; while [ $i -lt {N} ]; do printf 'SVREC %08d\\n' $i | "
              "dd of=/dev/sda bs=512 seek=$i conv=sync,fsync 2>/dev/null || e=$((e+1)); "
              "i=$((i+1)); echo $i > /run/w.n; done; echo \"DONE $e\" > /run/w.out) "
              "</dev/null >/dev/null 2>&1 & true")
    wait_until("40 records", lambda: int(guest.run("cat /run/w.n 2>/dev/null || echo 0"))
               >= 40, 120, 0.2)
    pinger = subprocess.Popen(["ip", "netns", "exec", f"{pool.name}-lan", "ping", "-n",
                               "-i", "0.01", "-w", "8", GUEST_IP],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        report = pool.js("-H", "host1", "migrate", "-l", "m1", "host2")
    finally:
        pinger.send_signal(signal.SIGINT)
        out, _ = pinger.communicate(timeout=30)
    m = report["migration"]
    assert (m["live"], m["status"]) == (True, "completed"), m
    assert m["transferred_bytes"] > 0 and m["total_ms"] > 0
    assert [(r["host"], r["state"] in ("running", "blocked")) for r in pool.rows()] == \
        [("host2", True)]  # exactly one copy, running, on the target
    moved = pool.shell("host2")
    assert moved.run("cat /run/mark") == "moved-not-rebooted"  # its memory came along
    assert moved.counter() > c1
    assert moved.run("cat /sys/class/net/eth0/address") == MAC
    assert _affinity(pool, "host2") == [1]  # the vCPU's pin came along
    assert wait_until("the writer", lambda: moved.run("cat /run/w.out 2>/dev/null || true"),
                      180, 0.5) == "DONE 0"  # no write failed in the guest
    assert "received" in out and " 0 received" not in out  # the LAN reached it throughout
    pool.lan("ping", "-c", "3", "-W", "5", GUEST_IP)  # and finds it on host2 now
    backing = next(x["backing"] for x in pool.js("array", "lun", "list")
                   if x["name"] == "sys")
    data = Path(backing).read_bytes()
    lost = [i for i in range(N) if data[i * 512:i * 512 + 15] != f"SVREC {i:08d}\n".encode()]
    assert lost == [], f"records lost: {lost[:10]}"


def test_migrate_without_l_pauses_moves_and_resumes(pool: Pool) -> None:
    moved = pool.shell("host2")
    c1 = moved.counter()
    report = pool.js("-H", "host2", "migrate", "m1", "host1")
    assert (report["migration"]["live"], report["state"]) == (False, "running")
    assert [r["host"] for r in pool.rows()] == ["host1"]
    back = pool.shell("host1")
    assert back.run("cat /run/mark") == "moved-not-rebooted"
    wait_until("the counter going on", lambda: back.counter() > c1, 30)


def test_the_same_name_for_another_lun_is_refused(pool: Pool) -> None:
    """The seed's trap: on the target, 'sys' names another LUN (a multipath.conf that
    differs between hosts). Refused before anything moves, both WWIDs named."""
    from sanvisor.api.client import AgentClient

    host2 = AgentClient(pool.root / "host2" / "agent.sock")
    swapped = ("defaults {\n  user_friendly_names yes\n}\nmultipaths {\n"
               f"  multipath {{\n    wwid {pool.wwid('other')}\n    alias sys\n  }}\n"
               f"  multipath {{\n    wwid {pool.wwid('sys')}\n    alias other\n  }}\n}}\n")
    good = (pool.root / "pool.conf").read_text()
    host2.call("PUT", "/v1/multipath/conf", {"text": swapped, "source": "swapped.conf"})
    try:
        err = pool.sv("-H", "host1", "migrate", "-l", "m1", "host2", check=False).stderr
        assert "disk /dev/mapper/sys on the target is not the same disk" in err, err
        assert f"WWID {pool.wwid('sys')} on the source" in err
        assert f"WWID {pool.wwid('other')} on the target" in err
        assert [r["host"] for r in pool.rows()] == ["host1"]
    finally:
        host2.call("PUT", "/v1/multipath/conf", {"text": good, "source": "pool.conf"})
    assert pool.shell("host1").run("cat /run/mark") == "moved-not-rebooted"


def test_an_expired_or_foreign_certificate_refuses_the_migration(pool: Pool) -> None:
    """The agents' calls are mutual TLS (docs/pool.md): host1 presenting an expired
    certificate of the pool's CA, then one of another CA, is refused by host2 before
    anything moves; one line naming the host and the reason; m1 runs on where it was."""
    import datetime as dt

    from sanvisor.pool import pki

    tls, keep = pool.root / "host1" / "tls", pool.root / "tls-host1"
    shutil.copytree(tls, keep)
    now = dt.datetime.now(dt.UTC)
    try:
        pki.issue_host(pki.ca_dir(pool.root), "host1", [], tls,
                       not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1))
        err = pool.sv("-H", "host1", "migrate", "-l", "m1", "host2", check=False).stderr
        assert len(err.strip().splitlines()) == 1, err
        assert "host2 (10.213.100.12:8141) refused us: our certificate expired on" in err, err
        other = pool.root / "other"
        pki.create_ca(other, "other")
        pki.issue_host(pki.ca_dir(other), "host1", [], tls)
        shutil.copy2(keep / "ca-cert.pem", tls)  # host1 still trusts the pool's CA alone
        err = pool.sv("-H", "host1", "migrate", "-l", "m1", "host2", check=False).stderr
        assert "host2 (10.213.100.12:8141) refused us: our certificate is not signed by the "\
            "pool's CA" in err, err
    finally:
        for f in keep.iterdir():
            shutil.copy2(f, tls / f.name)
        shutil.rmtree(keep)
    assert [r["host"] for r in pool.rows()] == ["host1"]
    assert qemu_pids(pool.root / "host2") == []
    assert pool.shell("host1").run("cat /run/mark") == "moved-not-rebooted"


def test_a_target_killed_mid_transfer_leaves_the_guest_where_it_was(pool: Pool) -> None:
    guest = pool.shell("host1")
    c1 = guest.counter()
    mig = subprocess.Popen(pool.argv("-H", "host1", "migrate", "-l", "--bandwidth", "1",
                                     "--no-postcopy", "m1", "host2"),
                           env=pool.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        def arriving_row() -> dict[str, Any] | None:
            assert mig.poll() is None, mig.communicate()  # still migrating
            return next((r for r in pool.rows() if r["host"] == "host2" and r["pid"]), None)

        arriving = wait_until("m1 arriving on host2", arriving_row, 60)
        assert arriving["reason"] == "arriving by migration"
        assert arriving["pid"] != next(r["pid"] for r in pool.rows() if r["host"] == "host1")
        os.kill(arriving["pid"], signal.SIGKILL)  # the target's QEMU, mid-transfer
        _, err = mig.communicate(timeout=120)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    assert mig.returncode == 1 and err.startswith("sanvisor: error: "), err
    rows = pool.rows()
    assert [(r["host"], r["state"] in ("running", "blocked")) for r in rows] == \
        [("host1", True)], [(r["state"], r["reason"]) for r in rows]  # one copy, running
    assert qemu_pids(pool.root / "host2") == []
    wait_until("the counter going on", lambda: guest.counter() > c1, 30)


# ---- one running copy in the pool: ownership in the store -----------------------------

def _agent(pool: Pool, host: str) -> int:
    from sanvisor.agent.daemon import agent_pid
    from sanvisor.paths import Layout

    pid = agent_pid(Layout(pool.root / host))
    assert pid, f"no agent on {host}"
    return pid


def _kill_agent(pool: Pool, host: str) -> None:
    """SIGKILL a host's agent (its QEMUs run on)."""
    pid = _agent(pool, host)
    os.kill(pid, signal.SIGKILL)
    wait_until(f"{host}'s agent gone", lambda: not Path(f"/proc/{pid}").exists(), 30)


def _start_agent(pool: Pool, host: str) -> None:
    n = host.removeprefix("host")
    subprocess.run(["ip", "netns", "exec", f"{pool.name}-h{n}", *pool.argv(
        "--home", str(pool.root / host), "agent", "start")], env=pool.env, check=True,
        capture_output=True, timeout=120)


def _qmp(sock: Path, cmd: str, args: dict[str, Any] | None = None) -> Any:
    import asyncio

    from qemu.qmp import QMPClient

    async def ask() -> Any:
        qmp = QMPClient("test")
        await qmp.connect(str(sock))
        try:
            return await qmp.execute(cmd, args)
        finally:
            await qmp.disconnect()

    return asyncio.run(ask())


def _qmp_status(sock: Path) -> str:
    return str(dict(_qmp(sock, "query-status"))["status"])


def _ensure_agent(pool: Pool, host: str) -> None:
    """Whatever a test did, the next one finds the host's agent running."""
    from sanvisor.agent.daemon import agent_pid
    from sanvisor.paths import Layout

    if not agent_pid(Layout(pool.root / host)):
        _start_agent(pool, host)


def _where(pool: Pool) -> list[tuple[str, bool]]:
    return [(r["host"], r["state"] in ("running", "blocked")) for r in pool.rows()]


def test_a_domain_runs_once_in_the_pool(pool: Pool) -> None:
    """create of a name that runs on another host, and a save file restored a second
    time, are refused: never two guests on one LUN (the seed's cold migration by hand
    works once)."""
    assert _where(pool) == [("host1", True)]
    guest = pool.shell("host1")
    guest.run("echo saved-on-host1 > /run/mark2")
    proc = pool.sv("-H", "host2", "create", str(pool.root / "m1.cfg"), check=False)
    assert proc.returncode == 1 and "m1" in proc.stderr and "runs on host1" in proc.stderr, \
        proc.stderr
    assert qemu_pids(pool.root / "host2") == []
    save = pool.root / "m1.save"
    pool.sv("-H", "host1", "save", "m1", str(save))
    pool.sv("-H", "host2", "restore", str(save))  # the seed's move by hand: fine once
    assert _where(pool) == [("host2", True)]
    assert pool.shell("host2").run("cat /run/mark2") == "saved-on-host1"
    proc = pool.sv("-H", "host1", "restore", str(save), check=False)
    assert proc.returncode == 1 and "runs on host2" in proc.stderr, proc.stderr
    assert _where(pool) == [("host2", True)] and qemu_pids(pool.root / "host1") == []
    pool.js("-H", "host2", "migrate", "-l", "m1", "host1")  # back, for what follows
    assert _where(pool) == [("host1", True)]


def _slow_migration(pool: Pool) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """m1 on its way from host1 to host2 at 8 MiB/s (~10 s); its incoming row."""
    mig = subprocess.Popen(pool.argv("-H", "host1", "migrate", "-l", "--bandwidth", "8",
                                     "--no-postcopy", "m1", "host2"),
                           env=pool.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)

    def arriving_row() -> dict[str, Any] | None:
        assert mig.poll() is None, mig.communicate()
        return next((r for r in pool.rows() if r["host"] == "host2" and r["pid"]), None)

    return mig, wait_until("m1 arriving on host2", arriving_row, 60)


def test_source_agent_killed_mid_migration_rolls_back(pool: Pool) -> None:
    """The source's agent dies mid-stream: its QEMU finishes the stream alone and stops
    (the target, -S, holds the whole guest and never runs it). When the agent comes
    back it takes the domain again (a new fencing token: the hand-over can no longer
    happen) and runs its copy on; the target, seeing the source's hold change,
    removes its incoming copy."""
    guest = pool.shell("host1")
    c1 = guest.counter()
    mig, _ = _slow_migration(pool)
    try:
        _kill_agent(pool, "host1")
        [sock] = list((pool.root / "host1" / "dom").glob("*/qmp.sock"))
        # With its agent gone nobody raises the allowed downtime: lift the test's
        # bandwidth cap so the stream ends whatever the guest dirties on a busy host.
        _qmp(sock, "migrate-set-parameters", {"max-bandwidth": 1 << 30,
                                              "downtime-limit": 2000})
        wait_until("the stream's end, with no agent", lambda: _qmp_status(sock)
                   == "postmigrate", 120, 0.5)
        _start_agent(pool, "host1")
        mig.communicate(timeout=120)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
        _ensure_agent(pool, "host1")
    assert mig.returncode != 0
    wait_until("one copy, on host1", lambda: _where(pool) == [("host1", True)], 60)
    wait_until("host2's incoming copy removed",
               lambda: qemu_pids(pool.root / "host2") == [], 30)
    assert guest.run("cat /run/mark2") == "saved-on-host1"
    wait_until("the counter going on", lambda: guest.counter() > c1, 30)


def test_target_agent_killed_mid_migration(pool: Pool) -> None:
    """The target's agent dies mid-stream: its QEMU receives the whole guest but never
    runs it (-S: only a switch-over would). The source cannot switch over, keeps the
    domain and runs it on; the target's agent, back, removes its stale copy."""
    guest = pool.shell("host1")
    c1 = guest.counter()
    mig, _ = _slow_migration(pool)
    try:
        _kill_agent(pool, "host2")
        _, err = mig.communicate(timeout=180)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    try:
        assert mig.returncode == 1 and "sanvisor: error:" in err, err
        wait_until("the counter going on", lambda: guest.counter() > c1, 30)
        [sock] = list((pool.root / "host2" / "dom").glob("*/qmp.sock"))
        assert _qmp_status(sock) != "running"  # the whole guest is there, never run
    finally:
        _ensure_agent(pool, "host2")
    wait_until("host2's stale copy removed", lambda: qemu_pids(pool.root / "host2") == [], 30)
    assert _where(pool) == [("host1", True)]
    assert guest.run("cat /run/mark2") == "saved-on-host1"


def test_guest_io_and_the_agent_go_on_during_a_save(pool: Pool, tmp_path: Path) -> None:
    """A save streams (and hashes) a guest's whole memory: meanwhile another guest's
    writes to its LUN go on (the engine carries them, not the agent's loop) and the
    agent answers `list`."""
    guest = pool.shell("host1")
    guest.run("(i=1000; while :; do printf 'LIVE %08d\\n' $i | dd of=/dev/sda bs=512 "
              "seek=$i conv=sync,fsync 2>/dev/null; i=$((i+1)); [ $i -ge 1400 ] && i=1000; "
              "echo $i > /run/live.n; done) </dev/null >/dev/null 2>&1 & echo $! > "
              "/run/live.pid")
    try:
        cfg = tmp_path / "big.cfg"
        cfg.write_text('name = "big"\nmemory = 384\n')
        pool.sv("-H", "host1", "create", str(cfg))
        saver = subprocess.Popen(pool.argv("-H", "host1", "save", "big",
                                           str(tmp_path / "big.save")),
                                 env=pool.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        seen: list[tuple[str, bool]] = []
        while saver.poll() is None:
            listed = pool.sv("-H", "host1", "list", check=False).returncode == 0
            seen.append((guest.run("cat /run/live.n"), listed))
        _, err = saver.communicate()
        assert saver.returncode == 0, err
        progress = {n for n, _ in seen}
        assert len(seen) >= 2 and len(progress) >= 2, seen  # writes went on meanwhile
        assert all(listed for _, listed in seen), seen  # and the agent answered
    finally:
        guest.run("kill $(cat /run/live.pid)")
