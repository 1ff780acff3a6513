"""The demo's volumes act, in the SAN act's lab: the seed's section III. Two new
LUNs become PVs of `vgvirtualdebian` (seen alike by both hosts), a guest boots on
`phy:/dev/vgvirtualdebian/lvsysteme`, the LV grows under it (the guest sees the new
size at once), then `backup` copies it from a snapshot while it runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sanvisor.lab.demo import wait_marker
from sanvisor.lab.guestshell import GuestShell

if TYPE_CHECKING:
    from sanvisor.lab.sandemo import SanAct

CONFIG = """\
# The seed's guest on an LV: disk = phy:/dev/VG/LV
name = "deb1"
memory = 128
disk = [ 'phy:/dev/vgvirtualdebian/lvsysteme,sda,w' ]
"""
VG, LV = "vgvirtualdebian", "lvsysteme"


def run(act: SanAct, wwpns: list[str]) -> None:
    print("\n# ---- act 2b: volumes on the SAN (LVM2's commands, an LV under a guest, "
          "online resize, backup from a snapshot) ----")
    before = {m["name"] for m in act.js("-H", "host1", "multipath")["maps"]}
    for lun in ("pv1", "pv2"):
        act.sv("array", "lun", "create", lun, "--size", "64M", show=False)
        for wwpn in wwpns:
            act.sv("array", "zone", "add", lun, wwpn, show=False)
    act.sv("-H", "host1", "scsi", "rescan", show=False)
    act.sv("-H", "host2", "scsi", "rescan", show=False)
    maps = sorted(m["name"] for m in act.js("-H", "host1", "multipath")["maps"]
                  if m["name"] not in before)
    act.sv("-H", "host1", "pvcreate", *(f"/dev/mapper/{m}" for m in maps))
    act.sv("-H", "host1", "vgcreate", VG, *(f"/dev/mapper/{m}" for m in maps))
    act.sv("-H", "host1", "lvcreate", "-n", LV, "-L", "64M", VG)
    act.sv("-H", "host2", "lvs", "-o", "+seg_pe_ranges")  # host2 sees the same VG
    cfg = act.tmp / "deb1.cfg"
    cfg.write_text(CONFIG)
    print(f"\n# the config file ({cfg}):\n{cfg.read_text()}")
    act.sv("-H", "host1", "create", str(cfg))
    try:
        row = next(r for r in act.js("-H", "host1", "list") if r["name"] == "deb1")
        wait_marker(Path(row["console_log"]))
        guest = GuestShell(row["console_socket"])
        guest.run("echo deb1-data | dd of=/dev/sda bs=512 conv=sync,fsync 2>/dev/null")
        size0 = guest.run("cat /sys/block/sda/size")
        act.sv("-H", "host1", "lvextend", "-L", "+32M", f"{VG}/{LV}")
        size1 = _poll(guest, size0)
        print(f"\n# in the guest, no reboot: /sys/block/sda/size {size0} -> {size1} sectors")
        act.sv("-H", "host1", "lvremove", "-f", f"{VG}/{LV}", check=False)  # in use: refused
        act.sv("-H", "host1", "backup", "deb1", "sda", "--to", str(act.tmp / "deb1.img"))
        act.sv("-H", "host1", "lvs", "-a")  # the backup's snapshot is gone
    finally:
        act.sv("-H", "host1", "destroy", "deb1", show=False, check=False)


def _poll(guest: GuestShell, old: str) -> str:
    from sanvisor.waiting import wait_until

    return wait_until("the guest to see its disk grow", lambda: (
        s if (s := guest.run("cat /sys/block/sda/size")) != old else None), 30, 0.1)
