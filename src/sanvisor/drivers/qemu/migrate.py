"""Live migration between two QEMU processes (QMP `migrate` / `migrate-incoming`).

Target: QEMU started with ``-incoming defer -S`` and the same devices, then
`migrate-incoming`: between hosts of a pool on TCP on the host's pool address (a port
QEMU picks), with TLS (a ``tls-creds-x509`` object made from the host's credentials,
``verify-peer=on``, and a ``tls-authz`` that lets in the source host's certificate
alone); for a target outside a pool (an agent home on this machine), on a unix socket
in its run directory. The source gets its own ``tls-creds-x509`` (client) and
``tls-hostname``: the target's certificate must name the host its agent authenticated.
The credentials are set for one migration and cleared after it. The target never
runs the guest by itself: the agents first move its ownership in the pool's store
(the switch-over, agent/migration.py), then the target `cont`s it: after pre-copy
completed, or (post-copy) before the source starts post-copy, when `cont` means
"run as soon as the stream switches over".

Source: `migrate` with the convergence policy (model/migration.py) applied while
it runs: the allowed downtime raised step by step, post-copy after a while, given
up after a bound (`migrate_cancel`: the guest runs on where it was). Progress
(remaining RAM, rate, pass) is reported as QEMU counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from qemu.qmp import EventListener

from sanvisor.drivers.base import IncomingMigration, Instance, Progress, StreamTls, Switchover
from sanvisor.errors import HypervisorError, TimeoutError_
from sanvisor.model.migration import ConvergencePolicy, MigrationReport
from sanvisor.waiting import wait_until_async

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sanvisor.drivers.qemu.instance import QemuInstance

log = logging.getLogger(__name__)
FINAL = ("completed", "failed", "cancelled")
TLS_ID, AUTHZ_ID = "sv-migrate-tls", "sv-migrate-authz"  # QOM objects, one migration's


async def _tls_on(inst: QemuInstance, tls: StreamTls, endpoint: str) -> dict[str, Any]:
    """This QEMU's credentials for one migration: the parameters that use them."""
    await _tls_off(inst)
    await inst.qmp("object-add", {"qom-type": "tls-creds-x509", "id": TLS_ID,
                                  "dir": str(tls.creds), "endpoint": endpoint,
                                  "verify-peer": True})
    params: dict[str, Any] = {"tls-creds": TLS_ID}
    if endpoint == "client":
        params["tls-hostname"] = tls.peer
    elif tls.peer_dn:
        await inst.qmp("object-add", {"qom-type": "authz-simple", "id": AUTHZ_ID,
                                      "identity": tls.peer_dn})
        params["tls-authz"] = AUTHZ_ID
    return params


async def _tls_off(inst: QemuInstance) -> None:
    """No TLS for what this QEMU migrates next (a save into a file, a local move)."""
    with contextlib.suppress(HypervisorError):
        await inst.qmp("migrate-set-parameters", {"tls-creds": "", "tls-hostname": "",
                                                  "tls-authz": ""})
    for oid in (AUTHZ_ID, TLS_ID):
        with contextlib.suppress(HypervisorError):
            await inst.qmp("object-del", {"id": oid})


async def _capabilities(inst: QemuInstance, postcopy: bool) -> None:
    """Both sides must agree; set every time (a QEMU that arrived by a post-copy-ready
    migration keeps the capability, and its next, pre-copy-only, migration would fail
    the handshake: 'Unable to write to socket')."""
    caps = [{"capability": "events", "state": True},
            {"capability": "postcopy-ram", "state": postcopy}]
    await inst.qmp("migrate-set-capabilities", {"capabilities": caps})


def _fill(report: MigrationReport, info: dict[str, Any]) -> None:
    ram = info.get("ram") or {}
    report.status = str(info.get("status", report.status))
    report.total_ms = float(info.get("total-time", report.total_ms) or 0)
    report.downtime_ms = float(info.get("downtime", report.downtime_ms) or 0)
    report.setup_ms = float(info.get("setup-time", report.setup_ms) or 0)
    report.transferred_bytes = int(ram.get("transferred", report.transferred_bytes))
    report.remaining_bytes = int(ram.get("remaining", report.remaining_bytes))
    report.total_bytes = int(ram.get("total", report.total_bytes))
    report.passes = int(ram.get("dirty-sync-count", report.passes))
    report.mbps = float(ram.get("mbps", report.mbps))


async def send(inst: QemuInstance, address: str, *, live: bool, policy: ConvergencePolicy,
               progress: Progress, timeout: float, switchover: Switchover | None = None,
               tls: StreamTls | None = None) -> MigrationReport:
    try:
        return await _send(inst, address, live=live, policy=policy, progress=progress,
                           timeout=timeout, switchover=switchover, tls=tls)
    finally:
        if tls is not None and not inst.exited:
            await _tls_off(inst)


async def _send(inst: QemuInstance, address: str, *, live: bool, policy: ConvergencePolicy,
                progress: Progress, timeout: float, switchover: Switchover | None,
                tls: StreamTls | None) -> MigrationReport:
    report = MigrationReport(live=live, policy=policy.to_dict())
    postcopy = live and policy.postcopy_after_s is not None
    await _capabilities(inst, postcopy)
    bandwidth = policy.bandwidth_mib_s << 20 if policy.bandwidth_mib_s else 1 << 40
    params = await _tls_on(inst, tls, "client") if tls is not None else {"tls-creds": ""}
    await inst.qmp("migrate-set-parameters", {
        "max-bandwidth": bandwidth, "downtime-limit": policy.downtime_at(0), **params})
    if not live:
        await inst.qmp("stop")  # xm's migrate without -l: paused, moved, resumed
    t0 = time.monotonic()
    limit = min(timeout, policy.abort_after_s)
    listener = EventListener("MIGRATION")
    with inst.qmp_events(listener):
        await inst.qmp("migrate", {"uri": address})
        downtime = policy.downtime_at(0)
        while True:
            info = dict(await inst.qmp("query-migrate"))
            _fill(report, info)
            progress(report.to_dict())
            if report.status in FINAL and (report.status != "completed"
                                           or report.total_ms > 0):
                break
            elapsed = time.monotonic() - t0
            if elapsed > limit:
                with contextlib.suppress(HypervisorError):
                    await inst.qmp("migrate_cancel")
                raise TimeoutError_(f"the migration did not converge within {limit:g} s "
                                    f"({report.remaining_bytes >> 20} MiB left after "
                                    f"{report.passes} passes); it was cancelled, the guest "
                                    "runs on here", timeout=limit)
            if live and report.status == "active":
                want = policy.downtime_at(elapsed)
                if want != downtime:
                    downtime = want
                    await inst.qmp("migrate-set-parameters", {"downtime-limit": want})
                if postcopy and not report.postcopy and elapsed >= (policy.postcopy_after_s
                                                                    or 0):
                    # the point of no return: the target runs the guest from now on
                    if switchover is not None:
                        try:
                            await switchover()
                        except BaseException:
                            with contextlib.suppress(HypervisorError):
                                await inst.qmp("migrate_cancel")
                            raise
                    await inst.qmp("migrate-start-postcopy")
                    report.postcopy = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.get(), 0.1)
    if not live:  # stopped before the stream started: paused all along
        report.downtime_ms = report.total_ms
    if report.status != "completed":
        if not live:
            with contextlib.suppress(HypervisorError):
                await inst.qmp("cont")
        detail = inst.log_tail() or "see the target's log"
        raise HypervisorError(f"the migration {report.status}: {detail}",
                              status=report.status)
    return report


async def settle(inst: QemuInstance, resume: bool) -> None:
    """An outgoing pre-copy left behind by a dead agent: cancelled if still streaming;
    a source stopped at its end (`postmigrate`, never switched over: the target
    never ran it) runs again (`cont` reactivates its disks first)."""
    info = dict(await inst.qmp("query-migrate"))
    if info.get("status") in ("setup", "active", "pre-switchover", "device",
                              "wait-unplug"):
        log.warning("%s: an outgoing migration was still running; cancelling it",
                    inst.plan.spec.name)
        await inst.qmp("migrate_cancel")

        async def over() -> bool:
            status = dict(await inst.qmp("query-migrate")).get("status")
            return status in FINAL or status is None

        await wait_until_async("the migration's cancel", over, 30)
    if info.get("status") is not None:
        await _tls_off(inst)  # whatever that migration set is not for the next one
    state = dict(await inst.qmp("query-status")).get("status")
    if state in ("postmigrate", "finish-migrate") and resume:
        log.warning("%s: stopped at the end of a migration never switched over; it runs "
                    "on here", inst.plan.spec.name)
        await inst.qmp("cont")


class QemuIncoming(IncomingMigration):
    def __init__(self, inst: QemuInstance, address: str, tls: bool = False) -> None:
        self.inst = inst
        self.address = address
        self.pid = inst.pid
        self.tls = tls

    @classmethod
    async def listen(cls, inst: QemuInstance, postcopy: bool,
                     tls: StreamTls | None = None) -> QemuIncoming:
        await _capabilities(inst, postcopy)
        # the announcements (RARPs, and the guest's own gratuitous ARPs) follow the
        # *target's* parameters: QEMU waits 50 ms by default, and the LAN's switches
        # keep sending the guest's traffic to the source's port until then
        params = await _tls_on(inst, tls, "server") if tls is not None else {}
        await inst.qmp("migrate-set-parameters", {
            "announce-initial": 1, "announce-step": 50, "announce-rounds": 4, **params})
        if tls is None:
            sock = inst.plan.rundir / "migrate-in.sock"
            sock.unlink(missing_ok=True)
            address = f"unix:{sock}"
            await inst.qmp("migrate-incoming", {"uri": address})
            return cls(inst, address)
        host = f"[{tls.address}]" if ":" in tls.address else tls.address
        await inst.qmp("migrate-incoming", {"uri": f"tcp:{host}:0"})  # QEMU picks a port
        where = dict(await inst.qmp("query-migrate")).get("socket-address") or [{}]
        port = where[0].get("port")
        if not port:
            raise HypervisorError(f"the target QEMU listens on no TCP port ({where})")
        return cls(inst, f"tcp:{host}:{port}", tls=True)

    async def finish(self, timeout: float) -> Instance:
        async def arrived() -> bool:
            if self.inst.exited:
                raise HypervisorError(f"the target QEMU exited: {self.inst.log_tail()}")
            status = str(dict(await self.inst.qmp("query-migrate")).get("status", ""))
            if status in ("failed", "cancelled"):
                raise HypervisorError(f"the incoming migration {status}: "
                                      f"{self.inst.log_tail() or 'no message'}")
            return status == "completed"

        await wait_until_async("the incoming migration", arrived, timeout)
        if self.tls:
            await _tls_off(self.inst)
        return self.inst

    async def switchover(self) -> None:
        """QEMU's `cont`: during the incoming state it means "start once the stream is
        in" (post-copy: as soon as it switches over); after it, start now. The target
        QEMU is started with -S: it never runs the guest before the agents agree."""
        await self.inst.qmp("cont")

    async def abort(self) -> None:
        log.warning("incoming migration of %s aborted; its QEMU said: %s",
                    self.inst.plan.spec.name, self.inst.log_tail() or "nothing")
        await self.inst.destroy()
        await self.inst.close()
