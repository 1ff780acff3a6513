"""`sanvisor array ...`: the disk array's LUNs, initiators and zoning, and its daemon."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sanvisor.cli import render
from sanvisor.errors import UsageError

_LUN = "a LUN: its name, id or WWID"


def add_parser(sub: Any) -> None:
    ar = sub.add_parser("array", help="the disk array (LUNs over NBD, zoning)",
                        description="Manage the disk array: LUNs, initiators, zoning.")
    ar.add_argument("--array-home", type=Path, help="array state directory "
                    "(default $SANVISOR_ARRAY_HOME, else the pool's array, else HOME/array)")
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
    """$SANVISOR_ARRAY_HOME, else the pool's array (pool.json's "array": the lab
    writes it), else HOME/array."""
    from sanvisor.errors import NotFoundError
    from sanvisor.pool.config import PoolConfig

    if env := os.environ.get("SANVISOR_ARRAY_HOME"):
        return Path(env)
    try:
        array = PoolConfig.load().array  # a malformed pool.json is said, not passed over
    except NotFoundError:  # no pool here
        array = ""
    return Path(array) if array else home / "array"


def parse_size(text: str) -> int:
    from sanvisor.model.units import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace, home: Path) -> int:
    ahome = args.array_home or _default_home(home)
    if args.array_cmd == "serve":
        return _serve(ahome, args.listen or ["127.0.0.1:10809"], args.fault_dir,
                      args.control, _limits(args))
    op, opargs = _operation(args)
    result = _call(ahome, op, opargs)
    if getattr(args, "json", False):
        render.emit_json(result.data)
    else:
        print(result.text)
    return 0


def _operation(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The management operation (storage/arrayadmin.py) a command line asks for."""
    if args.array_cmd == "lun":
        if args.lun_cmd == "create":
            if args.thick and args.backing is not None:
                raise UsageError("--thick allocates a new LUN file; not with --backing")
            backing = str(args.backing.absolute()) if args.backing else None
            return "lun-create", {"name": args.name, "size": parse_size(args.size),
                                  "id": args.id, "backing": backing, "thick": args.thick,
                                  "vendor": args.vendor, "model": args.model}
        if args.lun_cmd == "delete":
            return "lun-delete", {"lun": args.lun, "force": args.force}
        if args.lun_cmd == "resize":
            return "lun-resize", {"lun": args.lun, "size": parse_size(args.size)}
        return "lun-list", {}
    if args.array_cmd == "zone":
        return f"zone-{args.zone_cmd}", {"lun": args.lun, "wwpn": args.wwpn}
    if args.ini_cmd == "add":
        return "initiator-add", {"wwpn": args.wwpn, "address": args.address,
                                 "host": args.host}
    return "initiator-list", {}


def _call(ahome: Path, op: str, opargs: dict[str, Any]) -> Any:
    """The running array daemon's management API, or (no daemon) the same operation
    applied to its home here."""
    from sanvisor.storage.arrayapi import call

    result = call(ahome, op, opargs)
    if result is None:
        from sanvisor.storage.array import ArrayStore
        from sanvisor.storage.arrayadmin import ArrayAdmin

        result = ArrayAdmin(ArrayStore(ahome)).run(op, opargs)
    return result


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
