"""`sanvisor pool ca` and `pool cert HOST`: the pool's CA and its hosts' certificates
(docs/pool.md). `lab up` does both for the lab; for real hosts an administrator runs
them once, on the machine that keeps the CA's key, and copies each host's directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

POOL_HELP = "the pool's CA and its hosts' certificates (mutual TLS between hosts)"
CA_HELP = ("make the pool's CA in the pool home (<pool home>/ca: ca-cert.pem, and "
           "ca-key.pem, mode 0600: keep it on this machine only)")
CERT_HELP = ("issue HOST's certificate, signed by the pool's CA: common name and DNS name "
             "HOST, its addresses as IP names; written (keys 0600) as QEMU's "
             "tls-creds-x509 reads it: ca-cert.pem, server-cert.pem, server-key.pem, "
             "client-cert.pem, client-key.pem")
ADMIN_HELP = ("issue an administrator's client certificate (the CLI's, for -H HOST when "
              "HOST's agent is on another machine: TCP with mutual TLS, the whole API), "
              "signed by the pool's CA: written to <pool home>/admin/tls")
EPILOG = """\
The pool home is $SANVISOR_POOL_HOME (else $SANVISOR_LAB_HOME, else /var/lib/sanvisor/lab);
its pool.json lists the hosts, each with the address and port (8141) its agent listens on
for the others. For a real host:
  sanvisor pool ca --name prod
  sanvisor pool cert hv1 --address 10.0.0.1 --out /tmp/hv1-tls
  scp -rp /tmp/hv1-tls root@hv1:/var/lib/sanvisor/tls    # then restart hv1's agent
  sanvisor pool admin alice      # the CLI here reaches every host over TLS (-H HOST)
"""


def add_parser(verb: Any) -> None:
    p = verb("pool", POOL_HELP)
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="pool_cmd", metavar="ACTION", required=True)
    ca = sub.add_parser("ca", help=CA_HELP, description=CA_HELP, epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ca.add_argument("--name", help="the pool's name in the CA's subject (default: "
                    "pool.json's name)")
    ca.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    ca.add_argument("--force", action="store_true",
                    help="replace an existing CA (every host certificate must be issued "
                    "again)")
    cert = sub.add_parser("cert", help=CERT_HELP, description=CERT_HELP, epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    cert.add_argument("pool_host", metavar="HOST", help="the host's name in the pool")
    cert.add_argument("--address", action="append", default=[], metavar="IP",
                      help="an IP address of the host (repeat; default: its address in "
                      "pool.json)")
    cert.add_argument("--out", type=Path, metavar="DIR",
                      help="where to write (default: the host's home in pool.json, /tls)")
    cert.add_argument("--days", type=int, default=825, help="validity (default 825)")
    adm = sub.add_parser("admin", help=ADMIN_HELP, description=ADMIN_HELP, epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    adm.add_argument("admin_name", metavar="NAME", help="the administrator's name (the "
                     "certificate's common name, in the agents' logs)")
    adm.add_argument("--out", type=Path, metavar="DIR",
                     help="where to write (default: <pool home>/admin/tls, where the CLI "
                     "looks)")
    adm.add_argument("--days", type=int, default=825, help="validity (default 825)")


def run(args: argparse.Namespace) -> int:
    from sanvisor import where
    from sanvisor.errors import NotFoundError, UsageError
    from sanvisor.pool import pki
    from sanvisor.pool.config import PoolConfig
    from sanvisor.pool.tls import ADMIN_DIR, CREDS_DIR

    home = Path(where.pool_home())
    try:
        pool: PoolConfig | None = PoolConfig.load(home / "pool.json")
    except NotFoundError:
        pool = None
    if args.pool_cmd == "ca":
        name = args.name or (pool.name if pool else None)
        if not name:
            raise UsageError(f"pool ca: no pool.json in {home}: give the pool's --name")
        made = pki.create_ca(home, name, days=args.days, force=args.force)
        _out(args, made.to_dict(), f"CA of pool {name}: {made.path} (valid until "
             f"{made.not_after:%Y-%m-%d})")
        return 0
    if args.pool_cmd == "admin":
        made = pki.issue_admin(pki.ca_dir(home), args.admin_name, args.out or home / ADMIN_DIR,
                               days=args.days)
        _out(args, made.to_dict(), f"administrator {args.admin_name}: {made.path} (valid "
             f"until {made.not_after:%Y-%m-%d})")
        return 0
    host = pool.hosts.get(args.pool_host) if pool else None
    addresses = args.address or ([a for a in {host.address or host.lan} if a] if host else [])
    out = args.out
    if out is None:
        if host is None:
            raise NotFoundError(f"pool cert: no host {args.pool_host!r} in {home / 'pool.json'}"
                                " (give --out DIR)", host=args.pool_host)
        out = Path(host.home) / CREDS_DIR
    made = pki.issue_host(pki.ca_dir(home), args.pool_host, addresses, out, days=args.days)
    _out(args, made.to_dict(), f"{args.pool_host}: {made.path} ({', '.join(made.names)}; "
         f"valid until {made.not_after:%Y-%m-%d})")
    return 0


def _out(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)
