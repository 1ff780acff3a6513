"""`sanvisor array ...`: the disk array's LUNs, initiators and zoning, and its daemon."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from sanvisor.cli import render
from sanvisor.errors import ConfigError, ConflictError, UsageError

_LUN = "a LUN: its name, id or WWID"


def add_parser(sub: Any) -> None:
    ar = sub.add_parser("array", help="the disk array (LUNs over NBD, zoning)",
                        description="Manage the disk array: LUNs, initiators, zoning.")
    ar.add_argument("--array-home", type=Path, help="array state directory "
                    "(default $SANVISOR_ARRAY_HOME, else HOME/array)")
    ar.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    asub = ar.add_subparsers(dest="array_cmd", metavar="CMD", required=True)
    sv = asub.add_parser("serve", help="run the array daemon (NBD) in the foreground")
    sv.add_argument("--listen", action="append", default=[], metavar="ADDR:PORT",
                    help="one per fabric: ADDR:PORT, [V6ADDR]:PORT, ADDR (port 10809), "
                    "or PORT and :PORT, which mean 127.0.0.1 (all addresses only if "
                    "asked for: 0.0.0.0:PORT); default 127.0.0.1:10809")
    # (defaults: storage.arrayd.Limits; not imported here, the CLI starts faster)
    sv.add_argument("--handshake-timeout", type=float, metavar="SECONDS",
                    help="drop a connection that has not finished its NBD handshake by "
                    "then (the wait of a fence request is not counted; default 10)")
    sv.add_argument("--fence-wait", type=float, metavar="SECONDS", help="how long a "
                    "fence request may wait for the fenced sessions (default 60)")
    sv.add_argument("--max-connections", type=int, metavar="N",
                    help="connections open at once, in all (default 1024)")
    sv.add_argument("--max-connections-per-initiator", type=int, metavar="N",
                    help="connections open at once from one initiator address "
                    "(default 128)")
    sv.add_argument("--fault-dir", type=Path, help="loopback lab: drop the connections of "
                    "any initiator address with a file of that name here")
    sv.add_argument("--control", type=Path, help=argparse.SUPPRESS)  # tests: arrayhooks
    lun = asub.add_parser("lun", help="create, delete, resize, list LUNs")
    lsub = lun.add_subparsers(dest="lun_cmd", metavar="ACTION", required=True)
    c = lsub.add_parser("create", help="create a LUN (a sparse file unless --backing)")
    c.add_argument("name", help="the LUN's name (letters, digits, '_', '.', '-')")
    c.add_argument("--size", required=True, help="e.g. 1G, 512M")
    c.add_argument("--id", type=int, help="LUN id (default: lowest free from 1)")
    c.add_argument("--backing", type=Path, help="existing file or block device")
    c.add_argument("--thick", action="store_true", help="allocate every block now "
                   "(refused if the pool cannot hold it); default: a sparse file")
    c.add_argument("--vendor", default="HITACHI")
    c.add_argument("--model", default="DF600F")
    d = lsub.add_parser("delete", help="delete a LUN (not while zoned, unless --force)")
    d.add_argument("lun", help=_LUN)
    d.add_argument("--force", action="store_true", help="even while zoned")
    r = lsub.add_parser("resize", help="grow a LUN")
    r.add_argument("lun", help=_LUN)
    r.add_argument("--size", required=True, help="the new size, e.g. 2G (only larger)")
    lsub.add_parser("list", help="list LUNs, their allocated space and the pool's")
    zone = asub.add_parser("zone", help="LUN masking: which WWPN sees which LUN")
    zsub = zone.add_subparsers(dest="zone_cmd", metavar="ACTION", required=True)
    for name in ("add", "remove"):
        z = zsub.add_parser(name, help=f"{name} a zone")
        z.add_argument("lun", help=_LUN)
        z.add_argument("wwpn", help="the initiator's WWPN, e.g. 10:00:00:00:c9:00:01:00")
    ini = asub.add_parser("initiator", help="the hosts' HBAs the array knows")
    isub = ini.add_subparsers(dest="ini_cmd", metavar="ACTION", required=True)
    ia = isub.add_parser("add", help="register an HBA: its WWPN and fabric address")
    ia.add_argument("wwpn", help="the HBA's WWPN, e.g. 10:00:00:00:c9:00:01:00")
    ia.add_argument("--address", required=True, help="the HBA's address on its fabric")
    ia.add_argument("--host", default="", help="the host it belongs to")
    isub.add_parser("list", help="list initiators")


def _default_home(home: Path) -> Path:
    """$SANVISOR_ARRAY_HOME, else the running lab's array, else HOME/array."""
    from sanvisor.lab.topology import lab_root

    if env := os.environ.get("SANVISOR_ARRAY_HOME"):
        return Path(env)
    if (lab_root() / "lab.json").exists():
        return lab_root() / "array"
    return home / "array"


def parse_size(text: str) -> int:
    from sanvisor.model.units import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace, home: Path) -> int:
    from sanvisor.storage.array import ArrayStore

    ahome = args.array_home or _default_home(home)
    store = ArrayStore(ahome)
    js = getattr(args, "json", False)
    if args.array_cmd == "serve":
        return _serve(ahome, args.listen or ["127.0.0.1:10809"], args.fault_dir,
                      args.control, _limits(args))
    if args.array_cmd == "lun":
        return _lun(args, store, js)
    if args.array_cmd == "zone":
        with store.edit() as cfg:
            (cfg.zone_add if args.zone_cmd == "add" else cfg.zone_remove)(args.lun, args.wwpn)
            lun = cfg.lun(args.lun)
        verb = "added" if args.zone_cmd == "add" else "removed"
        _say(js, {"lun": lun.name, "wwpn": args.wwpn, "zone": verb, "zones": lun.zones},
             f"zone {verb}: LUN {lun.name} {'visible to' if verb == 'added' else 'hidden from'}"
             f" {args.wwpn} (seen after its host's next rescan)")
        return 0
    if args.ini_cmd == "add":
        with store.edit() as cfg:
            cfg.add_initiator(args.wwpn, args.host, args.address)
        _say(js, {"wwpn": args.wwpn, "host": args.host, "address": args.address},
             f"initiator {args.wwpn} registered (host {args.host or '-'}, address "
             f"{args.address})")
        return 0
    inis = store.load().initiators
    if js:
        render.emit_json([vars(i) for i in inis])
    else:
        print(f"{'WWPN':<24} {'Host':<10} Address")
        for i in inis:
            print(f"{i.wwpn:<24} {i.host:<10} {i.address}")
    return 0


def _lun(args: argparse.Namespace, store: Any, js: bool) -> int:
    from sanvisor.storage.arraypool import human, preallocate

    if args.lun_cmd == "create":
        size = parse_size(args.size)
        if args.thick and args.backing is not None:
            raise UsageError("--thick allocates a new LUN file; not with --backing")
        with store.edit() as cfg:
            backing = args.backing
            lun = cfg.add_lun(args.name, size, backing or Path("/pending"), args.id,
                              vendor=args.vendor, model=args.model)
            if backing is None:
                path = store.backing_path(lun.wwid)
                try:
                    if args.thick:
                        preallocate(path, size)
                    with open(path, "r+b" if args.thick else "wb") as fh:
                        fh.truncate(size)
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
                lun.backing, lun.thick = str(path), args.thick
            elif not backing.exists():
                raise ConfigError(f"--backing {backing}: no such file or device")
        _say(js, vars(lun), f"LUN {lun.id} {lun.name} created: {human(lun.size)}, "
             f"{'thick' if lun.thick else 'thin'}, WWID {lun.wwid}")
        return 0
    if args.lun_cmd == "delete":
        with store.edit() as cfg:
            lun = cfg.lun(args.lun)
            if lun.zones and not args.force:
                raise ConflictError(f"LUN {lun.name} is zoned to {', '.join(lun.zones)}; "
                                    "remove the zones first (or --force)")
            cfg.luns.remove(lun)
            if Path(lun.backing).parent == store.home / "luns":
                Path(lun.backing).unlink(missing_ok=True)
        _say(js, {"lun": lun.name, "deleted": True}, f"LUN {lun.id} {lun.name} deleted")
        return 0
    if args.lun_cmd == "resize":
        size = parse_size(args.size)
        with store.edit() as cfg:
            lun = cfg.lun(args.lun)
            if size < lun.size:
                raise ConflictError(f"LUN {lun.name}: shrinking ({lun.size} -> {size} "
                                    "bytes) would destroy data; only growing is supported")
            if lun.thick:
                preallocate(Path(lun.backing), size)
            if Path(lun.backing).is_file():
                os.truncate(lun.backing, size)
            lun.size = size
        _say(js, vars(lun), f"LUN {lun.id} {lun.name} is now {human(size)} (hosts see it "
             "after a rescan)")
        return 0
    return _list(store, js)


def _say(js: bool, data: object, text: str) -> None:
    if js:
        render.emit_json(data)
    else:
        print(text)


def _list(store: Any, js: bool) -> int:
    from sanvisor.storage.arraypool import allocated, human, pool_space

    luns = sorted(store.load().luns, key=lambda x: x.id)
    pools: dict[str, Any] = {}
    rows = []
    for x in luns:
        try:
            pool = pool_space(Path(x.backing))
            pools[pool.path] = pool
            pinfo: dict[str, object] | None = pool.to_dict()
        except OSError:
            pinfo = None
        rows.append(vars(x) | {"allocated": allocated(Path(x.backing)), "pool": pinfo})
    if not pools:
        with contextlib.suppress(OSError):
            pool = pool_space(store.home)
            pools[pool.path] = pool
    if js:
        render.emit_json(rows)
        return 0
    print(f"{'LUN':>4} {'Name':<16} {'Size':>10} {'Allocated':>10} {'':5} {'WWID':<34} "
          "Zoned to")
    for x, row in zip(luns, rows, strict=True):
        alloc = int(row["allocated"])
        print(f"{x.id:>4} {x.name:<16} {human(x.size):>10} {human(alloc):>10} "
              f"{'thick' if x.thick else 'thin':5} {x.wwid:<34} {', '.join(x.zones) or '-'}")
    for p in pools.values():
        print(f"pool {p.path}: {human(p.free)} free of {human(p.size)} "
              f"({100 * p.free / max(p.size, 1):.0f} %)")
        if p.low:
            print(p.warning())
    return 0


def _limits(args: argparse.Namespace) -> Any:
    from sanvisor.storage.arrayd import Limits

    given: dict[str, float] = {}
    for opt, field in (("handshake_timeout", "handshake"), ("fence_wait", "fence_wait"),
                       ("max_connections", "connections"),
                       ("max_connections_per_initiator", "per_initiator")):
        value = getattr(args, opt)
        if value is not None:
            if not 0 < value < 1e6:  # nan and inf fail this too
                raise UsageError(f"--{opt.replace('_', '-')}: expected a number above 0")
            given[field] = value
    return Limits(**given)  # type: ignore[arg-type]


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6ADDR]:PORT``, ``ADDR`` (port 10809), or ``PORT`` and
    ``:PORT`` on 127.0.0.1: every address only when asked for (``0.0.0.0:PORT``)."""
    import ipaddress

    text = text.strip()
    port: str | None = None
    if text.isascii() and text.isdigit():
        host, port = "", text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise UsageError(f"invalid --listen {text!r} (ADDR:PORT, [V6ADDR]:PORT or PORT)")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host = text  # an address alone (IPv6 without brackets too)
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"invalid address in --listen {text!r}") from None
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"invalid port in --listen {text!r} (1-65535)")
    return (host or "127.0.0.1", 10809 if port is None else int(port))


def _serve(home: Path, listens: list[str], fault_dir: Path | None,
           control: Path | None, limits: Any) -> int:
    import asyncio
    import logging

    from sanvisor.storage.arrayd import serve

    addresses = [parse_listen(x) for x in listens]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(home, addresses, fault_dir, control, limits))
    return 0
