"""Two hosts sharing LUNs, each with its own agent (the fake driver: no hypervisor
needed), the LUNs as loop devices both open with O_DIRECT: the same VGs from every
host; changes serialised by the lease on the LUNs; an LV open for writing on one
host at a time; a frozen host that does not clobber; and 500 random operations
from both hosts at once, after which lvm2's vgck and sanvisor's agree and every
acknowledged operation is there."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sanvisor.api.client import AgentClient
from sanvisor.errors import VolumeSpaceError
from tests.storage.lvm2 import MIB, Lvm2, loop_devices, needs_lvm2

pytestmark = needs_lvm2
T = 0.25  # the lease's I/O timeout in these tests (SANVISOR_LEASE_IO_TIMEOUT)


@dataclass
class Pool:
    devs: list[str]
    homes: dict[str, Path]
    lvm: Lvm2
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    def sv(self, host: str, *args: str, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "sanvisor", "--home",
                               str(self.homes[host]), *args], capture_output=True,
                              text=True, env=self.env, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"{host}: sanvisor {' '.join(args)}: {proc.stderr}")
        return proc

    def api(self, host: str, command: str, **args: Any) -> dict[str, Any]:
        client = AgentClient(self.homes[host] / "agent.sock", timeout=300)
        out: dict[str, Any] = client.call("POST", f"/v1/lvm/{command}", {"args": args})
        return out


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    with loop_devices([256 * MIB] * 3) as devs:
        env = dict(os.environ, SANVISOR_LEASE_IO_TIMEOUT=str(T))
        homes = {h: tmp_path / h for h in ("hostA", "hostB")}
        p = Pool(devs, homes, Lvm2(devs, tmp_path), env)
        try:
            for name, home in homes.items():
                (home / "volumes").mkdir(parents=True)
                (home / "host.json").write_text(json.dumps({"driver": "fake", "name": name}))
                (home / "volumes" / "devices").write_text("".join(f"{d}\n" for d in devs))
                p.sv(name, "agent", "start")
                p.pids[name] = int((home / "agent.lock").read_text().strip())
            yield p
        finally:
            for name in homes:
                if name in p.pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pids[name], signal.SIGCONT)
                p.sv(name, "agent", "stop", check=False)
                _stop_data_path(homes[name])


def _stop_data_path(home: Path) -> None:
    """What outlives an agent by design (storage/hostdevs.py, storage/engine.py): the
    host block devices of its LVs (a FUSE export and a loop device each), then the
    engine they kept alive. A test's agents leave nothing running."""
    from sanvisor.storage.hostdevs import HostDevices

    with contextlib.suppress(Exception):
        HostDevices(home).close_all()
    with contextlib.suppress(ValueError, OSError):
        pid = int((home / "engine" / "engine.pid").read_text())
        if b"sanvisor-engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


def test_every_host_sees_the_same_vgs(pool: Pool) -> None:
    a = pool.sv("hostA", "vgcreate", "vgvirtualdebian", *pool.devs).stdout
    assert a.splitlines()[-1] == '  Volume group "vgvirtualdebian" successfully created'
    pool.sv("hostA", "lvcreate", "-n", "lvsysteme", "-L", "300M", "vgvirtualdebian")
    out = pool.sv("hostB", "lvs", "-o", "+seg_pe_ranges").stdout
    assert "lvsysteme vgvirtualdebian -wi-------" in out and f"{pool.devs[1]}:0-" in out
    ra = json.loads(pool.sv("hostA", "vgs", "--reportformat", "json").stdout)
    rb = json.loads(pool.sv("hostB", "--json", "vgs").stdout)  # --json anywhere
    assert ra == rb and ra["report"][0]["vg"][0]["vg_free"] == "456.00m"
    assert pool.lvm.report("vg", "vg_name,vg_free")[0]["vg_free"] == str(456 * MIB)
    # one host at a time has it open for writing; a migration hands over
    refused = pool.sv("hostB", "lvchange", "-ay", "vgvirtualdebian/lvsysteme", check=False)
    assert refused.returncode == 1 and "is active on hostA" in refused.stderr
    pool.sv("hostA", "lvchange", "--handover", "hostB", "vgvirtualdebian/lvsysteme")
    pool.sv("hostB", "lvchange", "-ay", "vgvirtualdebian/lvsysteme")
    pool.sv("hostA", "lvchange", "-an", "vgvirtualdebian/lvsysteme")
    tags = pool.lvm.report("lv", "lv_name,lv_tags")[0]["lv_tags"]
    assert tags == "sanvisor:active=hostB"
    assert "-wi-a-----" in pool.sv("hostB", "lvs").stdout


def test_a_frozen_host_loses_the_lease_and_clobbers_nothing(pool: Pool) -> None:
    pool.api("hostA", "vgcreate", vg="vgp", pvs=pool.devs)
    pool.api("hostA", "lvcreate", vg="vgp", name="a1", size="8m")  # A keeps the lease
    os.kill(pool.pids["hostA"], signal.SIGSTOP)
    try:
        start = time.monotonic()
        pool.api("hostB", "lvcreate", vg="vgp", name="b1", size="8m")
        took = time.monotonic() - start
    finally:
        os.kill(pool.pids["hostA"], signal.SIGCONT)
    assert 8 * T <= took <= 8 * T + 2 * T + 5.0, took  # expiry, then the delta lease
    pool.api("hostA", "lvcreate", vg="vgp", name="a2", size="8m")
    names = {r["lv_name"] for r in pool.lvm.report("lv", "lv_name")}
    assert names == {"a1", "b1", "a2"}
    assert pool.lvm.warnings(pool.lvm.run("vgck", "vgp")) == []


@dataclass
class Host:
    name: str
    pool: Pool
    rng: random.Random
    lvs: dict[str, dict[str, Any]] = field(default_factory=dict)  # acknowledged state
    done: int = 0
    refused: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)
    n: int = 0

    def call(self, command: str, **args: Any) -> bool:
        t0 = time.monotonic()
        try:
            self.pool.api(self.name, command, **args)
            return True
        except VolumeSpaceError:
            self.refused += 1  # the VG is full: nothing done
            return False
        finally:
            self.spans.append((t0, time.monotonic()))
            self.done += 1

    def step(self) -> None:
        own = list(self.lvs)
        plain = [n for n in own if self.lvs[n]["origin"] is None]
        snaps = [n for n in own if self.lvs[n]["origin"] is not None]
        bare = [n for n in plain if not any(self.lvs[s]["origin"] == n for s in snaps)]
        ops = ["create", "create"] + ["extend", "reduce", "activate"] * bool(bare)
        ops += ["rename", "remove"] * bool(own) + ["snapshot"] * bool(plain)
        ops += ["merge", "remove_snap"] * bool(snaps)
        op = self.rng.choice(ops)
        self.n += 1
        new = f"{self.name}_{self.n}"
        if op == "create":
            size = self.rng.randint(1, 3)
            if self.call("lvcreate", vg="vgp", name=new, extents=str(size), activate="n"):
                self.lvs[new] = {"extents": size, "origin": None, "active": False}
        elif op in ("extend", "reduce"):
            lv = self.rng.choice(bare)
            d = 1 if op == "extend" else -1
            if op == "reduce" and self.lvs[lv]["extents"] == 1:
                return
            if self.call(f"lv{op}", lv=f"vgp/{lv}", extents=f"{'+' if d > 0 else '-'}1",
                         force=True):
                self.lvs[lv]["extents"] += d
        elif op == "activate":
            lv = self.rng.choice(bare)
            state = not self.lvs[lv]["active"]
            if self.call("lvchange", lvs=[f"vgp/{lv}"], activate="y" if state else "n"):
                self.lvs[lv]["active"] = state
        elif op == "rename":
            lv = self.rng.choice(own)
            if self.call("lvrename", vg="vgp", old=lv, new=new):
                self.lvs[new] = self.lvs.pop(lv)
                for s in self.lvs.values():
                    s["origin"] = new if s["origin"] == lv else s["origin"]
        elif op in ("remove", "remove_snap"):
            lv = self.rng.choice(own if op == "remove" else snaps)
            if self.call("lvremove", lvs=[f"vgp/{lv}"], force=True):
                del self.lvs[lv]
                for s in [s for s, v in self.lvs.items() if v["origin"] == lv]:
                    del self.lvs[s]
        elif op == "snapshot":
            origin = self.rng.choice(plain)
            if self.call("lvcreate", vg=f"vgp/{origin}", snapshot=True, name=new,
                         extents="1"):
                self.lvs[new] = {"extents": 1, "origin": origin,
                                 "active": self.lvs[origin]["active"]}
        elif op == "merge":
            snap = self.rng.choice(snaps)
            origin = self.lvs[snap]["origin"]
            if self.lvs[origin]["active"]:
                return
            if self.call("lvconvert", lv=f"vgp/{snap}", merge=True):
                del self.lvs[snap]


def test_two_hosts_500_random_operations_at_once(pool: Pool) -> None:
    pool.api("hostA", "vgcreate", vg="vgp", pvs=pool.devs)
    hosts = [Host(n, pool, random.Random(f"seed-{n}")) for n in ("hostA", "hostB")]
    errors: list[BaseException] = []

    def run(h: Host) -> None:
        try:
            while h.done < 250:
                h.step()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert errors == [], errors
    assert sum(h.done for h in hosts) >= 500
    a, b = (sorted(h.spans) for h in hosts)  # the two hosts' commands did overlap
    assert any(s0 < e1 and s1 < e0 for (s0, e0) in a[:50] for (s1, e1) in b[:50])
    # lvm2 and sanvisor agree the VG is consistent, and every acknowledged op is there
    assert pool.lvm.warnings(pool.lvm.run("vgck", "vgp")) == []
    ours = pool.api("hostB", "vgck", vgs=["vgp"])
    assert ours["data"]["problems"] == {"vgp": []} and ours["warnings"] == []
    got = {r["lv_name"]: r for r in pool.lvm.report("lv", "lv_name,lv_size,origin,lv_tags")}
    want = {n: v for h in hosts for n, v in h.lvs.items()}
    assert set(got) == set(want)
    for name, v in want.items():
        host = name.split("_")[0]
        assert int(got[name]["lv_size"]) == v["extents"] * 4 * MIB, name
        assert (got[name]["origin"] or None) == v["origin"], name
        active = f"sanvisor:active={host}" in got[name]["lv_tags"].split(",")
        assert active == v["active"], name
    assert all(h.refused < 100 for h in hosts)
