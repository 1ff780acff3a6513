"""Which disk a path is, in a dom0: the identity the migration preflight compares.

The seed's trap is the same name for another disk on the target host; a check on
size and the first 64 KiB passed two blank LUNs of one size (issue 13). Identity is
now what names the device itself, never its content:

- a SCSI disk (or a partition of one): its WWID (``/sys/.../device/wwid``),
- a device-mapper device: its dm uuid (multipath ``mpath-<WWID>``, an LV
  ``LVM-<VG uuid><LV uuid>``),
- a file given read-only: its size and the hash of all of it (the guest cannot
  change it, so equal bytes are the same disk for it),
- a file given read-write: no identity. Two hosts' files are two disks; a guest
  moved onto the other one would lose what it wrote. Refused: put it on the SAN.
"""

from __future__ import annotations

from collections.abc import Callable

from sanvisor.errors import ConfigError, ConflictError, HypervisorError

Run = Callable[[list[str], bytes | None], tuple[int, str, str]]

#: one line per "MODE:PATH" argument: "IDENTITY PATH"; IDENTITY is wwid:…, dm:…,
#: content:SIZE:SHA256, file (writable file), none (a device without identity), - (absent)
SCRIPT = r"""for a; do
  m=${a%%:*}; p=${a#*:}
  if [ ! -e "$p" ]; then echo "- $p"; continue; fi
  if [ -b "$p" ]; then
    n=$(basename "$(readlink -f "$p")"); s=/sys/class/block/$n; part=
    if [ -e "$s/partition" ]; then part=":part$(cat "$s/partition")"; s=$s/..; fi
    if [ -r "$s/dm/uuid" ] && [ -n "$(cat "$s/dm/uuid")" ]; then
      echo "dm:$(cat "$s/dm/uuid")$part $p"
    elif [ -r "$s/device/wwid" ]; then
      echo "wwid:$(tr -d ' ' < "$s/device/wwid")$part $p"
    else echo "none $p"; fi
  elif [ "$m" = r ]; then
    echo "content:$(stat -L -c %s "$p"):$(sha256sum < "$p" | cut -d' ' -f1) $p"
  else echo "file $p"; fi
done"""


def identities(run: Run, disks: dict[str, str]) -> dict[str, str | None]:
    """path -> identity in the dom0 ``run`` reaches (None: no such path). ``disks``:
    path -> mode ("r" or "w")."""
    if not disks:
        return {}
    rc, out, err = run(["sh", "-c", SCRIPT, "sh", *(f"{m}:{p}" for p, m in disks.items())],
                       None)
    if rc != 0:
        raise HypervisorError(f"dom0: cannot identify disks: {err.strip()}")
    ids: dict[str, str | None] = {}
    for line in out.splitlines():
        ident, _, path = line.partition(" ")
        ids[path] = None if ident == "-" else ident
    return ids


def check_movable(ids: dict[str, str | None]) -> None:
    """Source side: every disk has an identity another host can prove it shares."""
    for path, ident in ids.items():
        if ident is None:
            raise ConfigError(f"migrate: disk {path} is missing on this host")
        if ident == "file":
            raise ConflictError(
                f"migrate: disk {path} is a writable file in dom0, not shared storage: the "
                "target would run the guest on another file and what it wrote here would "
                "be lost (put it on the SAN: phy:/dev/mapper/ALIAS)", disk=path)
        if ident == "none":
            raise ConflictError(f"migrate: disk {path} has no WWID or device-mapper uuid "
                                "to prove the target sees the same device", disk=path)


def check_same(source: dict[str, str], target: dict[str, str | None]) -> None:
    """Target side: every disk present under the same path with the same identity."""
    for path, ident in source.items():
        here = target.get(path)
        if here is None:
            raise ConfigError(f"migrate: disk {path} does not exist on the target host",
                              disk=path)
        if here != ident:
            raise ConflictError(f"migrate: disk {path} on the target is not the same disk "
                                f"({_show(ident)} on the source, {_show(here)} on the "
                                "target)", disk=path, source=ident, target=here)


def _show(ident: str) -> str:
    kind, _, rest = ident.partition(":")
    return {"wwid": f"WWID {rest}", "dm": f"dm uuid {rest}",
            "content": f"contents {rest[:24]}"}.get(kind, ident)
