"""The pool's certificates: one CA per pool, one certificate per host (docs/pool.md).

    <pool home>/ca/ca-cert.pem, ca-key.pem      the pool's CA (`sanvisor pool ca`)
    <pool home>/admin/tls/                      the administrators' client certificate
                                                (`pool admin NAME`): the CLI's, for -H HOST
                                                when HOST's agent is on another machine
    <host home>/tls/                            a host's credentials (`pool cert HOST`),
        ca-cert.pem                             laid out as QEMU's tls-creds-x509 object
        server-cert.pem, server-key.pem         reads them; the agent uses the same
        client-cert.pem, client-key.pem         files (one certificate, both roles)

A host certificate names the host (CN and a DNS subject-alternative name: the name
under which the pool knows it) and its addresses (IP SANs); it may serve and be a
client (extended key usage serverAuth + clientAuth), and signs with an ECDSA P-256
key. Keys are written 0600 in 0700 directories, through a temporary file renamed into
place, so that no key is ever readable by others, even half-written.

Made with the ``cryptography`` library (X.509 building, ECDSA keys, PEM). Only `pool
ca`, `pool cert` and `lab up` import this module: the agent verifies certificates with
Python's ssl module alone (pool/tls.py), and never pays this library's import time.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sanvisor.errors import ConflictError, TlsCredentialsError, UsageError
from sanvisor.pool.tls import (
    ADMIN_OU,
    CA_CERT,
    CA_KEY,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
)

CA_DIR = "ca"  # under the pool home
CA_DAYS = 3650
HOST_DAYS = 825  # as the CA/Browser forum once capped server certificates
SKEW = dt.timedelta(minutes=5)  # a certificate is valid from a little before it is made


@dataclass(frozen=True)
class Issued:
    path: Path  # the directory written
    subject: str
    names: list[str]
    not_before: dt.datetime
    not_after: dt.datetime

    def to_dict(self) -> dict[str, object]:
        return {"dir": str(self.path), "subject": self.subject, "names": self.names,
                "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat()}


def ca_dir(pool_home: Path) -> Path:
    return pool_home / CA_DIR


def _write(path: Path, data: bytes, mode: int) -> None:
    """``data`` at ``path`` with ``mode``, atomically (never visible half-written nor
    with a wider mode)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def create_ca(pool_home: Path, pool: str, *, days: int = CA_DAYS,
              force: bool = False) -> Issued:
    """The pool's CA in ``<pool_home>/ca``. Refused if one is there (its certificates
    would all stop being trusted), unless ``force``."""
    if days < 1:
        raise UsageError(f"pool ca: --days must be at least 1 (got {days})")
    where = ca_dir(pool_home)
    if (where / CA_CERT).exists() and not force:
        raise ConflictError(f"pool {pool} has a CA already ({where / CA_CERT}); every "
                            "host certificate depends on it (--force makes a new one)",
                            path=str(where))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sanvisor"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"sanvisor pool {pool} CA")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _private_dir(where)
    _write(where / CA_KEY, _key_pem(key), 0o600)
    _write(where / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(where, cert.subject.rfc4514_string(), [], cert.not_valid_before_utc,
                  cert.not_valid_after_utc)


def _load_ca(where: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((where / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((where / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise TlsCredentialsError(f"no pool CA at {where} (make one with 'sanvisor pool "
                                  f"ca'): {exc.filename} is missing", path=str(where)) from None
    except (ValueError, TypeError) as exc:
        raise TlsCredentialsError(f"the pool CA at {where} cannot be read: {exc}",
                                  path=str(where)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsCredentialsError(f"the pool CA key at {where} is not an ECDSA key",
                                  path=str(where))
    return cert, key


def issue_host(ca: Path, host: str, addresses: list[str], out: Path, *,
               days: int = HOST_DAYS, not_before: dt.datetime | None = None,
               not_after: dt.datetime | None = None) -> Issued:
    """Host ``host``'s credentials in ``out``, signed by the CA in directory ``ca``.
    ``not_before``/``not_after`` override the validity (tests make expired ones)."""
    if not host or not all(c.isalnum() or c in "-." for c in host) or host[0] in "-.":
        raise UsageError(f"pool cert: {host!r} is not a host name (letters, digits, '-' "
                         "and '.')")
    ips = []
    for a in addresses:
        try:
            ips.append(ipaddress.ip_address(a))
        except ValueError:
            raise UsageError(f"pool cert: {a!r} is not an IP address") from None
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start = not_before or now - SKEW
    end = not_after or now + dt.timedelta(days=days)
    if end <= start:
        raise UsageError(f"pool cert: a certificate must end after it starts ({start} .. "
                         f"{end})")
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sanvisor"),
                         x509.NameAttribute(NameOID.COMMON_NAME, host)])
    sans: list[x509.GeneralName] = [x509.DNSName(host)]
    sans += [x509.IPAddress(ip) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _private_dir(out)
    pem, kpem = cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
    for name in (SERVER_KEY, CLIENT_KEY):
        _write(out / name, kpem, 0o600)
    for name in (SERVER_CERT, CLIENT_CERT):
        _write(out / name, pem, 0o644)
    _write(out / CA_CERT, (ca / CA_CERT).read_bytes(), 0o644)
    return Issued(out, cert.subject.rfc4514_string(), [host, *map(str, ips)],
                  cert.not_valid_before_utc, cert.not_valid_after_utc)


def issue_admin(ca: Path, name: str, out: Path, *, days: int = HOST_DAYS) -> Issued:
    """An administrator's client certificate in ``out`` (ca-cert.pem, client-cert.pem,
    client-key.pem), signed by the CA in ``ca``: organizational unit ``admin``, common
    name ``name``, client use only. An agent gives its holder the whole API over TCP
    (as root has it on the unix socket)."""
    if not name or not all(c.isalnum() or c in "-._@" for c in name):
        raise UsageError(f"pool admin: {name!r} is not a name (letters, digits, '-', '.', "
                         "'_' and '@')")
    if days < 1:
        raise UsageError(f"pool admin: --days must be at least 1 (got {days})")
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sanvisor"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_OU),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _private_dir(out)
    _write(out / CLIENT_KEY, _key_pem(key), 0o600)
    _write(out / CLIENT_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(out / CA_CERT, (ca / CA_CERT).read_bytes(), 0o644)
    return Issued(out, cert.subject.rfc4514_string(), [name], cert.not_valid_before_utc,
                  cert.not_valid_after_utc)
