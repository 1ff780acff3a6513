"""The one-machine SAN lab: a disk array and N hosts, each with two HBAs on two fabrics.

Everything lives in network namespaces the lab creates (nothing touches the
host's own network):

    {lab}-array   the array daemon; bridges fabA (10.250.1.1/24) and fabB
                  (10.250.2.1/24), one per fabric; listens on both
    {lab}-h1..N   one hypervisor host each: its agent, its guests; HBA k is a
                  veth hba<k> with 10.250.<k+1>.<10+n>/24, its peer enslaved to
                  fabric k in the array namespace

`lab fault hba-down HOST K` takes hba<K> down inside the host: the path dies
for real. State: {lab home}/lab.json; `lab down` works from it, also after a
crash (it kills by pid file and deletes the namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sanvisor import where
from sanvisor.command import run
from sanvisor.errors import (
    ConflictError,
    NotFoundError,
    ResourceError,
    SanvisorError,
    TimeoutError_,
    UsageError,
)
from sanvisor.lab import credentials
from sanvisor.lab.lan import LAN_BRIDGE, LAN_PREFIX, build_lan, lan_address
from sanvisor.pool.tls import AGENT_PORT
from sanvisor.waiting import wait_until

if TYPE_CHECKING:
    from sanvisor.xenhost.host import XenLan

ARRAY_PORT = 10809
FABRICS = ("fabA", "fabB")


def lab_root() -> Path:
    return Path(where.lab_root())


def wwpn(host: int, hba: int) -> str:
    return f"10:00:00:00:c9:{host >> 8:02x}:{host & 0xFF:02x}:{hba:02x}"


@dataclass
class Hba:
    index: int
    wwpn: str
    address: str  # on its fabric
    ifname: str  # "" in a loopback lab (no interface)
    target: str  # the array's address on that fabric
    fault_file: str = ""  # loopback lab: exists while the HBA is "down"


@dataclass
class HostSpec:
    name: str
    netns: str
    home: str
    hbas: list[Hba] = field(default_factory=list)
    driver: str = "qemu"  # qemu | xen (a nested Xen host, driven through dom0's xl)
    ctl: str = ""  # xen: dom0's command channel (unix socket)
    vm_pidfile: str = ""  # xen: the nested QEMU's pid
    lan: str = ""  # its address on the lab's LAN (xenbr0), "" without one
    address: str = ""  # where its agent listens for the pool's hosts (mutual TLS)
    port: int = 0


@dataclass
class LabState:
    name: str
    root: str
    array_netns: str
    hosts: list[HostSpec] = field(default_factory=list)
    mode: str = "netns"  # netns (root) | loopback (unprivileged)
    lan_netns: str = ""  # the LAN switch's namespace (lab/lan.py), "" without a LAN

    @property
    def array_home(self) -> Path:
        return Path(self.root) / "array"

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise NotFoundError(f"no host {name!r} in lab {self.name} "
                            f"(hosts: {', '.join(h.name for h in self.hosts)})")

    def save(self) -> None:
        Path(self.root).mkdir(parents=True, exist_ok=True)
        (Path(self.root) / "lab.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, root: Path) -> LabState:
        try:
            d = json.loads((root / "lab.json").read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no lab at {root} (start one with 'sanvisor lab up')") from None
        hosts = [HostSpec(**{**h, "hbas": [Hba(**b) for b in h["hbas"]]})
                 for h in d["hosts"]]
        return cls(name=d["name"], root=d["root"], array_netns=d["array_netns"], hosts=hosts,
                   mode=d.get("mode", "netns"), lan_netns=d.get("lan_netns", ""))


def _ip(*args: str) -> None:
    run(["ip", *args], what=" ".join(["ip", *args]))


def _sv(netns: str | None, *args: str, log: Path | None = None,
        background: bool = False) -> subprocess.Popen[bytes] | None:
    cmd = [sys.executable, "-m", "sanvisor", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    if background:
        out = open(log or os.devnull, "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
        out.close()
        return proc
    run(cmd, timeout=900, what=" ".join(["sanvisor", *args]))
    return None


def up(hosts: int, *, name: str = "sv", root: Path | None = None,
       loopback: bool = False, xen_hosts: int = 0) -> LabState:
    """Root: namespaces, bridges, veth (links that really go down). Not root (or
    loopback=True): every host and fabric on loopback addresses in one namespace."""
    loopback = loopback or os.geteuid() != 0
    if not 0 <= hosts <= 16 or not 0 <= xen_hosts <= 4 or hosts + xen_hosts == 0:
        raise UsageError(f"--hosts must be 0..16 and --xen-hosts 0..4, not both 0 "
                         f"(got {hosts}, {xen_hosts})")
    root = root or lab_root()
    if (root / "lab.json").exists():
        raise ConflictError(f"a lab already runs at {root} ('sanvisor lab down' first)")
    state = LabState(name=name, root=str(root), array_netns="" if loopback else f"{name}-array",
                     mode="loopback" if loopback else "netns")
    state.save()  # first, so that 'lab down' can clean up a half-built lab
    try:
        if loopback:
            _build_loopback(state, hosts)
        else:
            _build(state, hosts)
        for i in range(1, xen_hosts + 1):
            _add_xen_host(state, i)
    except BaseException:
        down(root)
        raise
    return state


def _build(state: LabState, hosts: int) -> None:
    ans = state.array_netns
    _ip("netns", "add", ans)
    _ip("-n", ans, "link", "set", "lo", "up")
    for k, fab in enumerate(FABRICS):
        _ip("-n", ans, "link", "add", fab, "type", "bridge", "stp_state", "0",
            "forward_delay", "0")
        _ip("-n", ans, "addr", "add", f"10.250.{k + 1}.1/24", "dev", fab)
        _ip("-n", ans, "link", "set", fab, "up")
    for n in range(1, hosts + 1):
        h = HostSpec(name=f"host{n}", netns=f"{state.name}-h{n}",
                     home=str(Path(state.root) / f"host{n}"))
        _ip("netns", "add", h.netns)
        _ip("-n", h.netns, "link", "set", "lo", "up")
        for k, fab in enumerate(FABRICS):
            hba = Hba(index=k, wwpn=wwpn(n, k), address=f"10.250.{k + 1}.{10 + n}",
                      ifname=f"hba{k}", target=f"10.250.{k + 1}.1:{ARRAY_PORT}")
            peer = f"h{n}{fab}"
            _ip("link", "add", hba.ifname, "netns", h.netns, "type", "veth", "peer", "name",
                peer, "netns", ans)
            _ip("-n", ans, "link", "set", peer, "master", fab, "up")
            _ip("-n", h.netns, "addr", "add", f"{hba.address}/24", "dev", hba.ifname)
            _ip("-n", h.netns, "link", "set", hba.ifname, "up")
            h.hbas.append(hba)
        h.lan = h.address = lan_address(n)
        h.port = AGENT_PORT  # each host its own namespace: the same port everywhere
        state.hosts.append(h)
        state.save()
    state.lan_netns = f"{state.name}-lan"
    state.save()
    build_lan(_ip, state.lan_netns, [(n, h.netns) for n, h in enumerate(state.hosts, 1)])
    state.array_home.mkdir(parents=True, exist_ok=True)
    listens = [a for k in range(len(FABRICS)) for a in
               ("--listen", f"10.250.{k + 1}.1:{ARRAY_PORT}")]
    _start(state, ans, listens)


def _start(state: LabState, array_netns: str | None, listens: list[str],
           extra: tuple[str, ...] = ()) -> None:
    ahome = state.array_home
    for h in state.hosts:
        for hba in h.hbas:
            _sv(None, "array", "--array-home", str(ahome), "initiator", "add", hba.wwpn,
                "--address", hba.address, "--host", h.name)
    _sv(array_netns, "array", "--array-home", str(ahome), "serve", *listens, *extra,
        log=ahome / "array.log", background=True)
    write_pool(state)
    credentials.issue(Path(state.root), state.name,
                      [(h.name, h.home, h.address) for h in state.hosts])
    for h in state.hosts:
        Path(h.home).mkdir(parents=True, exist_ok=True, mode=0o700)
        _host_conf(state, h)
        _sv(h.netns or None, "--home", h.home, "agent", "start")
    _wait_array(state)


def _host_conf(state: LabState, h: HostSpec, **extra: object) -> None:
    """host.json: what the host's agent knows of itself (its name, its driver, the pool
    it belongs to: its home, where the pool's store is)."""
    conf = {**asdict(h), "pool": str(state.root), **extra}
    (Path(h.home) / "host.json").write_text(json.dumps(conf, indent=1))


def write_pool(state: LabState) -> None:
    """The pool config (pool/config.py): all that the CLI and the agents know of the
    lab's hosts. The lab's topology (namespaces, fabrics) stays in lab.json."""
    from sanvisor.pool.config import PoolConfig, PoolHost

    PoolConfig(state.name, {h.name: PoolHost(h.name, h.home, h.driver, h.lan, h.address,
                                             h.port)
                            for h in state.hosts},
               array=str(state.array_home)).save(Path(state.root) / "pool.json")


def _free_port(addresses: list[str]) -> int:
    import socket

    for port in range(ARRAY_PORT, ARRAY_PORT + 200):
        try:
            for a in addresses:
                with socket.socket() as s:
                    s.bind((a, port))
            return port
        except OSError:
            continue
    raise ResourceError("no free port for the array on the loopback fabrics",
                        ports=f"{ARRAY_PORT}-{ARRAY_PORT + 199}")


def _build_loopback(state: LabState, hosts: int) -> None:
    """Fabric k is 127.250.<k+1>.0/24; host n's HBA k is 127.250.<k+1>.<10+n>. An HBA
    goes down by a fault file: the host's path checker sees its link down, and the
    array cuts and refuses that address's connections (the wire does break)."""
    faults = Path(state.root) / "faults"
    faults.mkdir(parents=True, exist_ok=True)
    port = _free_port([f"127.250.{k + 1}.1" for k in range(len(FABRICS))])
    for n in range(1, hosts + 1):
        h = HostSpec(name=f"host{n}", netns="", home=str(Path(state.root) / f"host{n}"),
                     address="127.0.0.1")
        h.port = credentials.free_port(h.address, {x.port for x in state.hosts})
        for k in range(len(FABRICS)):
            addr = f"127.250.{k + 1}.{10 + n}"
            h.hbas.append(Hba(index=k, wwpn=wwpn(n, k), address=addr, ifname="",
                              target=f"127.250.{k + 1}.1:{port}",
                              fault_file=str(faults / addr)))
        state.hosts.append(h)
    state.save()
    state.array_home.mkdir(parents=True, exist_ok=True)
    listens = [a for k in range(len(FABRICS)) for a in
               ("--listen", f"127.250.{k + 1}.1:{port}")]
    _start(state, None, listens, ("--fault-dir", str(faults)))


def _add_xen_host(state: LabState, i: int) -> None:
    """Boot a nested Xen (Xen 4.17 + a PV dom0 under QEMU) and give it an agent that
    drives dom0's xl through the host's command channel."""
    from sanvisor.xenhost import XenHost, build_xen_kit
    from sanvisor.xenhost.build import DOMU_KERNEL, DOMU_RAMDISK

    home = Path(state.root) / f"xen{i}"
    vm = XenHost(build_xen_kit(), home / "vm", name=f"xen{i}", lan=_xen_lan(state, i))
    vm.start(timeout=240, attempts=4)
    vm.detach()
    h = HostSpec(name=f"xen{i}", netns="", home=str(home), driver="xen",
                 ctl=str(home / "vm" / "ctl.sock"), vm_pidfile=str(home / "vm" / "qemu.pid"),
                 address="127.0.0.1")  # its agent runs in this namespace: no LAN address
    h.port = credentials.free_port(h.address, {x.port for x in state.hosts})
    state.hosts.append(h)
    state.save()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_pool(state)
    credentials.issue(Path(state.root), state.name, [(h.name, h.home, h.address)])
    # the kit its dom0 holds: what a domain boots when its config names no kernel
    _host_conf(state, h, guest_kit={"kernel": DOMU_KERNEL, "initrd": DOMU_RAMDISK})
    _sv(None, "--home", str(home), "agent", "start")


def _xen_lan(state: LabState, i: int) -> XenLan | None:
    """Xen host i's NIC on the lab's LAN (lab/lan.py; made here if the lab has none
    yet): dom0 at 10.213.100.<40+i>, its xenbr0 bridging the NIC, so migration streams
    go dom0 to dom0 and the guests are on the LAN. None without root (no namespaces):
    the host then has no NIC and its migrations use the command channel."""
    from sanvisor.xenhost.host import XenLan

    if os.geteuid() != 0:
        return None
    if not state.lan_netns:
        state.lan_netns = f"{state.name}-lan"
        state.save()
        build_lan(_ip, state.lan_netns, [])
    return XenLan(netns=state.lan_netns, bridge=LAN_BRIDGE, tap=f"xen{i}",
                  mac=f"52:54:00:5a:00:{i:02x}", address=f"{LAN_PREFIX}.{40 + i}/24")


def _wait_array(state: LabState, timeout: float = 20.0) -> None:
    pidfile = state.array_home / "array.pid"
    try:
        wait_until("the array daemon's start", pidfile.exists, timeout)
    except TimeoutError_:
        raise TimeoutError_("the array daemon did not start (see array/array.log)",
                            timeout=timeout) from None


def down(root: Path | None = None) -> bool:
    """Remove the lab: guests, agents, the array, namespaces, files. Idempotent."""
    root = root or lab_root()
    if not (root / "lab.json").exists():
        return False
    state = LabState.load(root)
    for h in state.hosts:
        _stop_host(h)
        if h.vm_pidfile:
            _kill_pidfile(Path(h.vm_pidfile))
    _kill_pidfile(state.array_home / "array.pid")
    for ns in [h.netns for h in state.hosts] + [state.array_netns, state.lan_netns]:
        if ns:
            run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(root, ignore_errors=True)
    return True


def _stop_host(h: HostSpec) -> None:
    from sanvisor.agent import daemon
    from sanvisor.paths import Layout

    home = Path(h.home)
    layout = Layout(home)
    if daemon.agent_pid(layout):
        with contextlib.suppress(SanvisorError):
            names = json.loads(run(
                [sys.executable, "-m", "sanvisor", "--home", str(home), "--json", "list"],
                check=False).out or "[]")
            for row in names:
                if row.get("domid"):
                    _sv(None, "--home", str(home), "destroy", row["name"])
        daemon.stop(layout)
    # so do the block devices of its maps and LVs (storage/hostdevs.py): removed first
    # (each is a client of the engine)
    with contextlib.suppress(SanvisorError, OSError):
        from sanvisor.storage.hostdevs import HostDevices

        HostDevices(home).close_all()
    # the data-path engine outlives its agent (storage/engine.py): stopped here, not
    # left to its idle exit, so that nothing of the lab runs once `lab down` returns
    with contextlib.suppress(ValueError, OSError):
        pid = int((home / "engine" / "engine.pid").read_text())
        if b"sanvisor-engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
            _kill_pidfile(home / "engine" / "engine.pid")
    # QEMUs left by a crashed agent: their pid is in each domain record
    for rec in home.glob("dom/*/domain.json"):
        with contextlib.suppress(ValueError, KeyError, OSError):
            pid = int(json.loads(rec.read_text())["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(home).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)


def _kill_pidfile(pidfile: Path, grace: float = 5.0) -> None:
    """SIGTERM the pid in ``pidfile``; SIGKILL it if it is still there after ``grace``."""
    with contextlib.suppress(ValueError, OSError):
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        try:
            wait_until(f"pid {pid} to exit", gone, grace)
        except TimeoutError_:
            os.kill(pid, signal.SIGKILL)


def fault(root: Path, host: str, hba: int, up_: bool) -> None:
    state = LabState.load(root)
    h = state.host(host)
    if not 0 <= hba < len(h.hbas):
        raise NotFoundError(f"{host} has no HBA {hba}" + (
            f" (HBAs 0..{len(h.hbas) - 1})" if h.hbas else " (it has no HBA)"),
            host=host, hba=hba)
    b = h.hbas[hba]
    if b.fault_file:
        if up_:
            Path(b.fault_file).unlink(missing_ok=True)
        else:
            Path(b.fault_file).touch()
        return
    _ip("-n", h.netns, "link", "set", b.ifname, "up" if up_ else "down")


def hba_link(h: HostSpec, b: Hba) -> str:
    """'up' or 'down': the HBA's link as the host's kernel sees it (loopback lab: the
    fault file)."""
    if b.fault_file:
        return "down" if Path(b.fault_file).exists() else "up"
    proc = run(["ip", "-n", h.netns, "-o", "link", "show", "dev", b.ifname], check=False)
    if proc.rc != 0:
        return "missing"
    m = re.search(r"\bstate (\S+)", proc.out)
    flags = re.search(r"<([^>]*)>", proc.out)
    if flags and "UP" not in flags.group(1).split(","):
        return "down"
    return (m.group(1).lower() if m else "unknown").replace("unknown", "up")


def status(root: Path) -> list[dict[str, Any]]:
    """Every host of the lab (Xen hosts included), its agent, and each HBA's link."""
    from sanvisor.agent import daemon
    from sanvisor.paths import Layout

    state = LabState.load(root)
    out: list[dict[str, Any]] = []
    for h in state.hosts:
        pid = daemon.agent_pid(Layout(Path(h.home)))
        out.append({"host": h.name, "driver": h.driver, "netns": h.netns or "-",
                    "agent": pid, "home": h.home,
                    "hbas": [{"hba": b.index, "wwpn": b.wwpn, "address": b.address,
                              "target": b.target, "link": hba_link(h, b)}
                             for b in h.hbas]})
    return out
