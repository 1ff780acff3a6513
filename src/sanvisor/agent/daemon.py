"""Run the host agent: one per host, serving the API on a unix socket.

The socket is created 0600 in a 0700 directory, and every connection's peer
credentials (SO_PEERCRED) are checked: only root and the agent's own user may
talk to it. QEMU processes are started in sessions of their own, so killing
the agent never kills a guest; a restarted agent finds them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from sanvisor.errors import (
    AgentUnavailableError,
    ConfigError,
    ConflictError,
    SanvisorError,
    TimeoutError_,
)
from sanvisor.paths import Layout
from sanvisor.pool.tls import Credentials, expiry
from sanvisor.waiting import wait_until

log = logging.getLogger("sanvisor.agent")


def _allowed_uids() -> set[int]:
    return {0, os.geteuid()}


def _peer_checked_protocol(net: Any = None) -> type:
    """Unix-socket connections: root and the agent's user only. TCP connections (the
    pool's other hosts, when ``net``, agent/peers.py): mutual TLS first."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    allowed = _allowed_uids()
    base: type = H11Protocol if net is None else net.protocol(H11Protocol)

    class PeerChecked(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", raw)
                if uid not in allowed:
                    log.warning("refused a connection from uid %d", uid)
                    transport.close()
                    return
            super().connection_made(transport)

    return PeerChecked


def _bind(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _lock(layout: Layout) -> int:
    fd = os.open(layout.home / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise ConflictError(f"an agent already runs for {layout.home}") from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _host_conf(layout: Layout) -> dict[str, Any]:
    """host.json: what this host is (its name, HBAs, driver, how it reaches dom0 and the
    guest kit there: drivers/xen/transport.py); the lab writes it for its hosts."""
    import json

    try:
        data: dict[str, Any] = json.loads((layout.home / "host.json").read_text())
        return data
    except (FileNotFoundError, ValueError):
        return {}


def life_timeout(environ: dict[str, str] | None = None) -> float:
    """SANVISOR_LIFE_TIMEOUT: seconds a new guest has to show a sign of life (30)."""
    raw = (os.environ if environ is None else environ).get("SANVISOR_LIFE_TIMEOUT", "")
    if not raw.strip():
        return 30.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < 86400:
        raise ConfigError(f"SANVISOR_LIFE_TIMEOUT={raw!r}: not a number of seconds "
                          "(0 < N < 86400)", variable="SANVISOR_LIFE_TIMEOUT")
    return value


async def serve(layout: Layout) -> None:
    import uvicorn

    from sanvisor.agent.manager import Manager
    from sanvisor.agent.service import HostService
    from sanvisor.api.app import build_app
    from sanvisor.drivers.qemu.driver import QemuDriver

    kit_cache: list[tuple[Path, Path]] = []

    def kit() -> tuple[Path, Path]:
        if not kit_cache:
            from sanvisor.guestkit import build_kit

            k = build_kit(log=log.info)
            kit_cache.append((k.kernel, k.initrd))
        return kit_cache[0]

    from sanvisor.agent import eventlog
    from sanvisor.agent.incoming import MigrationSettings
    from sanvisor.drivers.base import Driver
    from sanvisor.guestkit import default_cache_dir

    MigrationSettings.from_env()  # a bad SANVISOR_MIGRATE_*: refused before anything starts
    events = eventlog.install(layout.home)  # what `dmesg` shows on a QEMU host
    host = _host_conf(layout)
    from sanvisor.agent.peers import PeerGuard, PoolNetwork

    net = PoolNetwork.of_home(layout.home)  # None outside a pool; refuses bad credentials
    listeners = [net.bind()] if net is not None else []  # the pool's hosts call it here
    driver: Driver
    kit_args = None
    if host.get("driver") == "fake":  # no hypervisor: simulations and benchmarks
        from sanvisor.drivers.fake import FakeDriver

        driver = FakeDriver()
        log.info("driver: fake (no hypervisor)")
    elif host.get("driver") == "xen":
        # in dom0, xl run locally (a real Xen host), or another transport to dom0
        from sanvisor.drivers.xen.transport import guest_kit, xen_driver

        where = str(layout.home / "host.json")
        driver, how = xen_driver(host, where)
        if (paths := guest_kit(host, where)) is not None:
            kit_cache.append(paths)  # inside dom0
        kit_args = "console=hvc0 quiet"
        log.info("driver: xen, %s", how)
    else:
        # one probe per host boot for every agent of the machine (lab hosts included):
        # the guest kit booted under KVM, now rather than in the first create
        qemu = QemuDriver(kit=kit, cache_dir=default_cache_dir().parent)
        qemu.life_timeout = life_timeout()
        choice = await asyncio.to_thread(lambda: qemu.choice)
        log.info("accelerator: %s (%s); QEMU %s", choice.accel, choice.reason,
                 qemu.host_facts()["qemu_version"] or qemu.qemu)
        if choice.warning:
            log.warning("warning: %s", choice.warning)
        driver = qemu
    from sanvisor.storage.multipathd import Multipathd

    mpd = Multipathd(layout.home)
    await mpd.start()
    manager = Manager(layout, driver, kit=kit, mapper=mpd, kit_args=kit_args)
    from sanvisor.agent.membership import Membership

    manager.table.pool = await Membership.join(host)  # None outside a pool
    await manager.start()
    log.info("agent up: %d domain(s) found again", len(manager.table))
    sock = _bind(layout.socket)
    from sanvisor.agent.storage_service import StorageService
    from sanvisor.agent.volume_service import VolumeService

    storage = StorageService(layout.home, mpd)
    volumes = VolumeService.attach(storage, host.get("name"))
    volumes.start(manager.table)  # the LVs active here served; their guests known
    svc = HostService(manager, host_name=host.get("name"))
    await svc.autostart()  # xendomains' job: registered domains marked autostart
    app = build_app(svc, storage)
    served: Any = app if net is None else PeerGuard(app, net.config().name)
    watch: asyncio.Task[None] | None = None
    if net is not None:
        log.info("pool: %s listens for its peers on %s:%d (mutual TLS)", net.host,
                 net.address, net.port)
        watch = asyncio.create_task(_watch_tls_expiry(net.creds))
    config = uvicorn.Config(served, http=_peer_checked_protocol(net), log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        await server.serve(sockets=[sock, *listeners])
    finally:
        if watch is not None:
            watch.cancel()
        await manager.stop()
        if manager.table.pool is not None:
            await manager.table.pool.close()
        await volumes.close()
        await mpd.stop()
        sock.close()
        for tcp in listeners:
            tcp.close()
        with contextlib.suppress(FileNotFoundError):
            layout.socket.unlink()
        log.info("agent stopped; guests keep running")
        eventlog.uninstall(events)


def run_foreground(layout: Layout) -> int:
    layout.ensure()
    lock = _lock(layout)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(serve(layout))
    except KeyboardInterrupt:
        pass
    except SanvisorError as exc:
        log.error("sanvisor: error: %s", exc)
        return exc.exit_status
    finally:
        os.close(lock)
    return 0


def agent_pid(layout: Layout) -> int | None:
    try:
        fd = os.open(layout.home / "agent.lock", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 32, 0).decode().strip()
            return int(raw) if raw.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def start_background(layout: Layout, timeout: float = 180.0) -> int:
    """Start the agent detached; return its pid once its socket answers."""
    from sanvisor.api.client import AgentClient

    layout.ensure()
    pid = agent_pid(layout)
    if pid is not None:
        return pid
    logf = open(layout.log, "ab")  # noqa: SIM115 - handed to the child
    env = dict(os.environ, SANVISOR_HOME=str(layout.home))
    proc = subprocess.Popen([sys.executable, "-m", "sanvisor", "agent", "run"],
                            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                            start_new_session=True)
    logf.close()
    client = AgentClient(layout.socket, timeout=5)

    def answers() -> bool:
        if proc.poll() is not None:
            tail = (layout.log.read_text(errors="replace").strip().splitlines() or [""])[-1]
            tail = tail.split("sanvisor: error: ", 1)[-1]
            raise AgentUnavailableError(f"the agent exited at start: {tail}")
        try:
            client.host()
        except AgentUnavailableError:
            return False
        return True

    try:
        wait_until("the agent's answer", answers, timeout)
    except TimeoutError_:
        proc.kill()
        raise AgentUnavailableError(f"the agent did not answer within {timeout:.0f}s"
                                    ) from None
    return proc.pid


def stop(layout: Layout, timeout: float = 30.0) -> bool:
    pid = agent_pid(layout)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError_):  # said by 'agent status' if it lingers
        wait_until("the agent to stop", lambda: agent_pid(layout) is None, timeout)
    return True


#: how often the agent looks at its TLS credentials' end dates (and warns in its log)
TLS_CHECK_S = 12 * 3600.0


async def _watch_tls_expiry(creds: Credentials) -> None:
    """A warning in the log at start and every TLS_CHECK_S while a certificate of this
    host (its pool CA's included) is within WARN_DAYS of its end, or past it."""
    while True:
        _end, warning = await asyncio.to_thread(expiry, creds)
        if warning:
            log.warning("pool: %s", warning)
        await asyncio.sleep(TLS_CHECK_S)
