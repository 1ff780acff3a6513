"""The SAN lab for real: an array and two hosts in namespaces, two fabrics each.

Zoning seen through rescans, real NBD clients refused when unzoned, pool-wide
multipath names, and I/O that survives an HBA failure with nothing lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.helpers import wait_until
from tests.labcli import LabCli

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
              pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-utils")]

H1 = ["10:00:00:00:c9:00:01:00", "10:00:00:00:c9:00:01:01"]
H2 = ["10:00:00:00:c9:00:02:00", "10:00:00:00:c9:00:02:01"]


class Lab(LabCli):
    def netns(self, host: int) -> str:
        return f"{self.name}-h{host}"

    def in_host(self, host: int, *cmd: str, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns(host), *cmd],
                              capture_output=True, text=True, check=check, timeout=300,
                              env=self.env)

    def wwid(self, lun: str) -> str:
        return str(next(x["wwid"] for x in self.js("array", "lun", "list")
                        if x["name"] == lun))

    def map(self, host: int, name: str) -> dict[str, Any]:
        """Straight from the agent's API: fast enough to poll while I/O runs."""
        from sanvisor.api.client import AgentClient

        client = AgentClient(self.root / f"host{host}" / "agent.sock")
        maps = client.call("GET", "/v1/multipath")["maps"]
        return dict(next(m for m in maps if m["name"] == name))

    def map_uri(self, host: int, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.root}/host{host}/mapper/{name}.sock"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="svlab", dir="/tmp"))
    shutil.rmtree(root)
    lab = Lab(root, f"t{os.getpid() % 100000}")
    try:
        lab.sv("lab", "up", "--hosts", "2", "--name", lab.name)
        yield lab
    finally:
        lab.sv("lab", "down", check=False)
        shutil.rmtree(root, ignore_errors=True)
    assert not any(ns.startswith(lab.name + "-") for ns in
                   subprocess.run(["ip", "netns", "list"], capture_output=True,
                                  text=True).stdout.split())


def test_zoning_is_seen_after_a_rescan_and_enforced(lab: Lab) -> None:
    lab.sv("array", "lun", "create", "boot", "--size", "64M")
    for w in H1:
        lab.sv("array", "zone", "add", "boot", w)
    assert lab.js("-H", "host1", "scsi", "list") == []  # not before a rescan
    lab.sv("-H", "host1", "scsi", "rescan")
    table = lab.sv("-H", "host1", "scsi", "list").stdout
    assert table.count("Host: scsi") == 2 and "Vendor: HITACHI  Model: DF600F" in table
    assert "Host: scsi0 Channel: 00 Id: 00 Lun: 01" in table
    lab.sv("-H", "host2", "scsi", "rescan")
    assert lab.js("-H", "host2", "scsi", "list") == []
    uri = f"nbd://10.250.1.1:10809/{lab.wwid('boot')}"
    refused = lab.in_host(2, "qemu-img", "info", uri, check=False)
    assert refused.returncode != 0 and "no such export" in refused.stderr
    assert "virtual size: 64 MiB" in lab.in_host(1, "qemu-img", "info", uri).stdout
    # unzone one HBA: its path goes at the next rescan
    lab.sv("array", "zone", "remove", "boot", H1[1])
    lab.sv("-H", "host1", "scsi", "rescan")
    assert [p["hctl"] for p in lab.js("-H", "host1", "scsi", "list")] == ["0:0:0:1"]
    lab.sv("array", "zone", "add", "boot", H1[1])
    lab.sv("-H", "host1", "scsi", "add", "1", "0", "0", "1")  # the seed's scsiadd
    assert len(lab.js("-H", "host1", "scsi", "list")) == 2
    bad = lab.sv("array", "zone", "add", "boot", "10:00:00:00:c9:00:09:00", check=False)
    assert bad.returncode != 0 and "unknown initiator WWPN" in bad.stderr


def test_one_multipath_conf_for_the_pool(lab: Lab, tmp_path: Path) -> None:
    # host2 first sees 'other', host1 first saw 'boot': mpathN names differ per host
    lab.sv("array", "lun", "create", "other", "--size", "16M")
    for w in H1 + H2:
        lab.sv("array", "zone", "add", "other", w)
    lab.sv("-H", "host2", "scsi", "rescan")
    for w in H2:
        lab.sv("array", "zone", "add", "boot", w)
    lab.sv("-H", "host2", "scsi", "rescan")
    lab.sv("-H", "host1", "scsi", "rescan")
    plain = tmp_path / "plain.conf"
    plain.write_text("defaults {\n  user_friendly_names yes\n}\n")
    out = lab.sv("multipath", "push", str(plain), check=False)
    assert out.returncode == 1 and "MISMATCH: mpath0 is" in out.stdout
    good = tmp_path / "pool.conf"
    good.write_text(
        "defaults {\n  user_friendly_names yes\n  polling_interval 0.5\n"
        "  no_path_retry queue\n}\n"
        f"multipaths {{\n  multipath {{\n    wwid {lab.wwid('boot')}\n    alias domU-systeme\n"
        f"  }}\n  multipath {{\n    wwid {lab.wwid('other')}\n    alias domU-data\n  }}\n}}\n"
        "devices {\n  device {\n    vendor \"HITACHI\"\n    product \"DF600F\"\n"
        "    path_grouping_policy multibus\n  }\n}\n")
    assert "MISMATCH" not in lab.sv("multipath", "push", str(good)).stdout
    for host in (1, 2):
        assert lab.map(host, "domU-systeme")["wwid"] == lab.wwid("boot")
    ll = lab.sv("-H", "host1", "multipath", "-ll").stdout.splitlines()
    assert ll[0] == f"domU-systeme ({lab.wwid('boot')}) dm-0 HITACHI,DF600F"
    assert ll[1] == "[size=64M][features=1 queue_if_no_path][hwhandler=0][rw]"
    # no path_selector given: multipath-tools 0.9.4's built-in default, as `multipath -t`
    assert ll[2] == "\\_ service-time 0 [prio=2][active]"
    assert ll[3].split() == ["\\_", "0:0:0:1", "sdb", "8:16", "[active][ready]"]
    broken = tmp_path / "broken.conf"
    broken.write_text("defaults {\n  polling_interval soon\n}\n")
    bad = lab.sv("multipath", "push", str(broken), check=False)
    assert bad.returncode != 0 and f"{broken}:2: polling_interval" in bad.stderr


def _written(lab: Lab) -> int:
    return sum(p["written_bytes"] for p in lab.map(1, "domU-systeme")["paths"])


def test_io_survives_an_hba_failure(lab: Lab) -> None:
    """64 KiB writes, each block with its own pattern, while HBA 0 dies, comes back,
    and HBA 1 dies: qemu-io sees no error and every block is on the LUN."""
    n, bs, passes = 768, 64 << 10, 12  # 576 MiB of writes; the last pass is checked
    assert n * bs <= 64 << 20
    cmds = [a for p in range(passes) for i in range(n)
            for a in ("-c", f"write -P {(i + p) % 250 + 1} {i * bs} {bs}")]
    last = passes - 1
    start = _written(lab)
    before = {p["hctl"]: p["written_bytes"] for p in lab.map(1, "domU-systeme")["paths"]}
    # its output (two lines a write) goes to a file: a full pipe would stall qemu-io
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed with the test
    job = subprocess.Popen(["ip", "netns", "exec", lab.netns(1), "qemu-io", "-f", "raw",
                            "-t", "none", *cmds, "-c", "flush",
                            lab.map_uri(1, "domU-systeme")],
                           stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until("writes under way", lambda: _written(lab) > start + (32 << 20), 60, 0.01)
        lab.sv("lab", "fault", "hba-down", "host1", "0")
        assert job.poll() is None, "the workload ended before the fault: make it longer"
        t_down = _written(lab)
        try:
            wait_until("writes on the other path",
                       lambda: _written(lab) > t_down + (8 << 20), 20, 0.01)
        except AssertionError as exc:
            log = (lab.root / "host1" / "agent.log").read_text()[-3000:]
            raise AssertionError(f"{exc}\n{lab.map(1, 'domU-systeme')}\n{log}") from None
        paths = {p["hctl"]: p for p in lab.map(1, "domU-systeme")["paths"]}
        assert paths["0:0:0:1"]["state"] == "faulty"
        lab.sv("lab", "fault", "hba-up", "host1", "0")
        wait_until("path 0 reinstated", lambda: all(
            p["state"] == "ready" for p in lab.map(1, "domU-systeme")["paths"]), 10)
        lab.sv("lab", "fault", "hba-down", "host1", "1")
        job.wait(timeout=120)
        log.seek(0)
        out, err = log.read(), ""
    finally:
        if job.poll() is None:
            job.kill()
        lab.sv("lab", "fault", "hba-up", "host1", "0", check=False)
        lab.sv("lab", "fault", "hba-up", "host1", "1", check=False)
    assert job.returncode == 0, err
    assert "error" not in (out + err).lower() and "failed" not in (out + err).lower()
    after = {p["hctl"]: p["written_bytes"] for p in lab.map(1, "domU-systeme")["paths"]}
    assert all(after[h] > before[h] for h in after), (before, after)  # both paths carried I/O
    assert lab.map(1, "domU-systeme")["io_errors"] == 0
    backing = next(x["backing"] for x in lab.js("array", "lun", "list") if x["name"] == "boot")
    data = Path(backing).read_bytes()
    bad = [i for i in range(n)
           if data[i * bs:(i + 1) * bs] != bytes([(i + last) % 250 + 1]) * bs]
    assert bad == [], f"{len(bad)} blocks lost or torn, first {bad[:5]}"


def test_no_path_queues_then_completes(lab: Lab) -> None:
    wait_until("both paths ready", lambda: all(
        p["state"] == "ready" for p in lab.map(1, "domU-systeme")["paths"]), 10)
    for k in ("0", "1"):
        lab.sv("lab", "fault", "hba-down", "host1", k)
    job = subprocess.Popen(["ip", "netns", "exec", lab.netns(1), "qemu-io", "-f", "raw",
                            "-t", "none", "-c", "write -P 0x77 0 64k", "-c", "flush",
                            lab.map_uri(1, "domU-systeme")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the write to queue", lambda: lab.map(1, "domU-systeme")["queued"] > 0, 30)
        assert job.poll() is None  # held, not failed
        lab.sv("lab", "fault", "hba-up", "host1", "1")
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
        lab.sv("lab", "fault", "hba-up", "host1", "0", check=False)
        lab.sv("lab", "fault", "hba-up", "host1", "1", check=False)
    assert job.returncode == 0 and "error" not in (out + err).lower(), out + err


def test_no_path_retry_fails_cleanly(lab: Lab, tmp_path: Path) -> None:
    conf = tmp_path / "retry.conf"
    conf.write_text(
        "defaults {\n  user_friendly_names yes\n  polling_interval 0.2\n"
        "  no_path_retry queue\n}\n"
        f"multipaths {{\n  multipath {{\n    wwid {lab.wwid('boot')}\n"
        "    alias domU-systeme\n  }\n"
        f"  multipath {{\n    wwid {lab.wwid('other')}\n    alias domU-data\n"
        "    no_path_retry 2\n  }\n}\n"
        "devices {\n  device {\n    vendor \"HITACHI\"\n    product \"DF600F\"\n"
        "    path_grouping_policy multibus\n  }\n}\n")
    lab.sv("multipath", "push", str(conf))
    for k in ("0", "1"):
        lab.sv("lab", "fault", "hba-down", "host1", k)
    try:
        t0 = time.monotonic()
        out = lab.in_host(1, "qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k",
                          lab.map_uri(1, "domU-data"), check=False)
        took = time.monotonic() - t0
    finally:
        for k in ("0", "1"):
            lab.sv("lab", "fault", "hba-up", "host1", k)
    assert "Input/output error" in out.stdout + out.stderr, out
    assert took < 10  # 2 x 0.2 s, then EIO: not forever
    assert lab.map(1, "domU-data")["io_errors"] >= 1


def test_lab_down_after_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "crashlab"
    crash = Lab(root, f"c{os.getpid() % 100000}")
    crash.sv("lab", "up", "--hosts", "1", "--name", crash.name)
    agent = int((root / "host1" / "agent.lock").read_text())
    array = int((root / "array" / "array.pid").read_text())
    for pid in (agent, array):
        os.kill(pid, 9)
    crash.sv("lab", "down")
    assert not root.exists()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert crash.name + "-" not in names


@pytest.mark.guest
def test_a_guest_on_multipath_loses_nothing_when_an_hba_dies(lab: Lab, kit: object,
                                                             tmp_path: Path) -> None:
    """A real guest writes sequence-numbered, checksummed blocks (dd with fsync) to its
    disk on /dev/mapper/domU-systeme while HBA 0 dies, returns, and HBA 1 dies; then
    its agent is killed (-9) and started again, and its data-path engine hangs
    (SIGSTOP): the agent's watchdog replaces it, QEMU reconnects, the write lands."""
    import hashlib

    from sanvisor.lab.guestshell import GuestShell

    stopped = 0
    cfg = tmp_path / "vd.cfg"
    cfg.write_text('name = "vd1"\nmemory = 128\n'
                   "disk = [ 'phy:/dev/mapper/domU-systeme,sda,w' ]\n")
    lab.sv("-H", "host1", "create", str(cfg))
    try:
        info = lab.js("-H", "host1", "list", "vd1")[-1]
        log = Path(info["console_log"])
        wait_until("the guest's marker", lambda: b"SANVISOR-READY" in log.read_bytes(), 60)
        guest = GuestShell(info["console_socket"])
        n = 300
        guest.run(f"(i=0; e=0; while [ $i -lt {n} ]; do s=$(printf 'SVBLK %08d' $i); "
                  "m=$(echo \"$s\" | md5sum | cut -c1-32); "
                  "printf '%s %s\\n' \"$s\" \"$m\" | dd of=/dev/sda bs=512 seek=$i "
                  "conv=sync,fsync 2>/dev/null || e=$((e+1)); i=$((i+1)); "
                  "echo $i > /tmp/w.n; done; echo \"DONE $e\" > /tmp/w.out) "
                  "</dev/null >/dev/null 2>&1 & true")  # '&;' would be a syntax error

        def done_blocks() -> int:
            try:
                return int(guest.run("cat /tmp/w.n 2>/dev/null || echo 0"))
            except ValueError:
                return 0

        wait_until("80 blocks", lambda: done_blocks() >= 80, 120, 0.2)
        lab.sv("lab", "fault", "hba-down", "host1", "0")
        wait_until("160 blocks", lambda: done_blocks() >= 160, 120, 0.2)
        lab.sv("lab", "fault", "hba-up", "host1", "0")
        wait_until("path 0 back", lambda: all(
            p["state"] == "ready" for p in lab.map(1, "domU-systeme")["paths"]), 10)
        lab.sv("lab", "fault", "hba-down", "host1", "1")
        result = wait_until("the writer to finish", lambda: guest.run(
            "cat /tmp/w.out 2>/dev/null || true"), 180, 0.5)
        lab.sv("lab", "fault", "hba-up", "host1", "1")
        assert result == "DONE 0", result  # no write failed in the guest
        assert "I/O error" not in guest.run("dmesg | grep -i 'error' || true")
        # the engine outlives its agent: kill -9 the agent, start it again (it adopts
        # the engine), and the guest's I/O goes on
        os.kill(int((lab.root / "host1" / "agent.lock").read_text()), 9)
        lab.in_host(1, sys.executable, "-m", "sanvisor", "-H", "host1", "agent", "start")
        guest.run(f"echo after-restart | dd of=/dev/sda bs=512 seek={n} conv=sync,fsync",
                  timeout=60)
        # the engine hangs: the (new) agent's watchdog kills it and starts another; QEMU
        # reconnects to /dev/mapper/domU-systeme and resends the write it held
        stopped = int((lab.root / "host1" / "engine" / "engine.pid").read_text())
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        guest.run(f"echo after-hang | dd of=/dev/sda bs=512 seek={n + 1} conv=sync,fsync",
                  timeout=60)
        print(f"\nengine SIGSTOPped: the guest's write done {time.monotonic() - t0:.2f} s "
              "later (watchdog 2 s)")
        assert int((lab.root / "host1" / "engine" / "engine.pid").read_text()) != stopped
        assert _gone(stopped), "the hung engine is still there"
        assert "I/O error" not in guest.run("dmesg | grep -i 'error' || true")
    finally:
        with contextlib.suppress(OSError):  # whatever the watchdog did, none is left
            if stopped and b"sanvisor-engine" in Path(f"/proc/{stopped}/cmdline").read_bytes():
                os.kill(stopped, signal.SIGKILL)
        lab.sv("-H", "host1", "destroy", "vd1", check=False)
        lab.sv("lab", "fault", "hba-up", "host1", "0", check=False)
        lab.sv("lab", "fault", "hba-up", "host1", "1", check=False)
    backing = next(x["backing"] for x in lab.js("array", "lun", "list") if x["name"] == "boot")
    data = Path(backing).read_bytes()
    bad = []
    for i in range(n):
        s = f"SVBLK {i:08d}"
        digest = hashlib.md5((s + "\n").encode()).hexdigest()
        want = (s + " " + digest + "\n").encode()
        if data[i * 512:i * 512 + len(want)] != want:
            bad.append((i, data[i * 512:i * 512 + 16]))
    assert bad == [], f"{len(bad)} blocks lost or torn: {bad[:8]}"
    assert data[n * 512:n * 512 + 13] == b"after-restart"
    assert data[(n + 1) * 512:(n + 1) * 512 + 10] == b"after-hang"
    assert lab.map(1, "domU-systeme")["io_errors"] == 0


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for its reaper counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_loopback_lab_without_namespaces(tmp_path: Path) -> None:
    """The unprivileged layout (what a non-root user gets): fabrics and HBAs on loopback
    addresses, an HBA 'down' cut by the array itself; the same checks as above."""
    lb = Lab(tmp_path / "lb", "lb")
    lb.sv("lab", "up", "--hosts", "2", "--loopback")
    job: subprocess.Popen[bytes] | None = None
    try:
        assert "127.250.1.11" in lb.sv("lab", "status").stdout
        lb.sv("array", "lun", "create", "sys", "--size", "32M")
        for w in H1:
            lb.sv("array", "zone", "add", "sys", w)
        lb.sv("-H", "host1", "scsi", "rescan")
        lb.sv("-H", "host2", "scsi", "rescan")
        assert lb.js("-H", "host2", "scsi", "list") == []
        assert len(lb.js("-H", "host1", "scsi", "list")) == 2
        name = lb.js("-H", "host1", "multipath")["maps"][0]["name"]
        uri = f"nbd+unix:///{name}?socket={lb.root}/host1/mapper/{name}.sock"
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed with the test
        cmds = [a for i in range(4000) for a in ("-c", f"write -P {i % 200 + 1} "
                                                  f"{(i % 512) * 65536} 64k")]
        job = subprocess.Popen(["qemu-io", "-f", "raw", "-t", "none", *cmds, uri],
                               stdout=log, stderr=subprocess.STDOUT)
        wait_until("writes", lambda: sum(p["written_bytes"] for p in
                                         lb.map(1, name)["paths"]) > (16 << 20), 60, 0.01)
        lb.sv("lab", "fault", "hba-down", "host1", "0")
        assert job.poll() is None
        wait_until("path 0 faulty", lambda: lb.map(1, name)["paths"][0]["state"] == "faulty",
                   10, 0.01)
        lb.sv("lab", "fault", "hba-up", "host1", "0")
        assert job.wait(timeout=120) == 0
        log.seek(0)
        assert "error" not in log.read().lower()
        backing = next(x["backing"] for x in lb.js("array", "lun", "list"))
        data = Path(backing).read_bytes()
        for i in range(3488, 4000):  # the last write of each 64 KiB block
            off = (i % 512) * 65536
            assert data[off:off + 65536] == bytes([i % 200 + 1]) * 65536, i
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        lb.sv("lab", "down", check=False)


def test_lab_status_shows_every_host_its_agent_and_links(lab: Lab) -> None:
    rows = json.loads(lab.sv("lab", "status", "--json").stdout)  # --json after the verb
    hosts = {r["host"]: r for r in rows}
    assert set(hosts) == {"host1", "host2"}
    for r in rows:
        assert r["driver"] == "qemu" and isinstance(r["agent"], int)
        assert [(b["hba"], b["link"]) for b in r["hbas"]] == [(0, "up"), (1, "up")]
    try:
        out = lab.sv("lab", "fault", "hba-down", "host2", "1").stdout
        assert out.strip() == "host2: HBA 1 link down"
        links = {b["hba"]: b["link"] for b in next(
            r for r in lab.js("lab", "status") if r["host"] == "host2")["hbas"]}
        assert links == {0: "up", 1: "down"}
        text = lab.sv("lab", "status").stdout.splitlines()
        assert text[0].split()[:4] == ["Host", "Driver", "Agent", "HBA"]
        assert any(ln.split()[0] == "host2" and " down " in ln for ln in text[1:])
        assert "no HBA 7" in lab.sv("lab", "fault", "hba-down", "host2", "7",
                                    check=False).stderr
    finally:
        lab.sv("lab", "fault", "hba-up", "host2", "1")


def test_the_pool_config_the_lan_and_pool_wide_list(lab: Lab) -> None:
    pool = json.loads((lab.root / "pool.json").read_text())
    assert set(pool["hosts"]) == {"host1", "host2"}
    assert [pool["hosts"][h]["lan"] for h in ("host1", "host2")] == \
        ["10.213.100.11", "10.213.100.12"]
    # the hosts share a LAN (xenbr0 on each, bridged to the lab's switch)
    lab.in_host(1, "ping", "-c", "1", "-W", "5", "10.213.100.12")
    rows = lab.js("list", "--pool")
    assert {r["host"] for r in rows if r["name"] == "Domain-0"} == {"host1", "host2"}
    assert lab.sv("list", "--pool").stdout.splitlines()[0].split()[:2] == ["Host", "Name"]
    assert "no host 'host9' in the pool" in lab.sv("-H", "host9", "list", check=False).stderr
