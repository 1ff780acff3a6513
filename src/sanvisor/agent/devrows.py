"""xm block-list and network-list: the rows of xm's tables for a domain.

Xen: xl's own (frontend state, event channel, ring references, xenstore backend
path), joined to the record by device. QEMU has no xenbus: the backend is QEMU
itself, a device listed is connected (state 4, as xenbus says Connected), the
event-channel and ring columns are ``-``, and BE-path is the device's QOM path.
"""

from __future__ import annotations

from typing import Any

from sanvisor.agent.verbbase import VerbBase
from sanvisor.agent.views import nic_bridge
from sanvisor.drivers.xen.xlcfg import xen_vdev
from sanvisor.model.vdev import vdev_number

CONNECTED = 4  # XenbusStateConnected


class DeviceRows(VerbBase):
    async def device_rows(self, ref: str, kind: str) -> list[dict[str, Any]]:
        dom = self.find(ref)
        rec = dom.record
        seen = await dom.inst.devices(kind) if dom.inst is not None else None
        rows: list[dict[str, Any]] = []
        if kind == "block":
            by_vdev = {str(r.get("vdev")): r for r in seen or []}
            for d in rec.spec.disks:
                vdev = vdev_number(d.target)
                if seen is not None:  # xl knows it as xvdX
                    vdev = vdev_number(xen_vdev(d.target))
                base = {"vdev": vdev, "be": 0, "handle": vdev, "state": CONNECTED,
                        "evtch": "-", "ring_ref": "-",
                        "be_path": f"/machine/peripheral/dev-{d.target}"}
                xl = by_vdev.get(str(vdev), {})
                rows.append({**base, **xl, "target": d.target, "backend": d.backend,
                             "path": d.path, "mode": d.mode, "devtype": d.devtype})
            return rows
        by_idx = {str(r.get("idx")): r for r in seen or []}
        for n in rec.nics:
            base = {"idx": n.index, "be": 0, "mac": n.mac, "handle": n.index,
                    "state": CONNECTED, "evtch": "-", "ring_ref": "-/-",
                    "be_path": f"/machine/peripheral/nic{n.index}"}
            rows.append({**base, **by_idx.get(str(n.index), {}), "tap": n.tap,
                         "bridge": nic_bridge(n), "type": n.vif.type, "ip": n.vif.ip})
        return rows
