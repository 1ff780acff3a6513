"""TLS between the hosts of a pool: credentials, contexts, who a peer is, and what a
failed handshake means, in one line (docs/pool.md).

Python's ssl module (OpenSSL) only: both sides present a certificate and check the
other's (CERT_REQUIRED both ways), against the pool's CA alone (no system CAs), with
TLS 1.3 only. A client also checks that the server's certificate names the host it
meant to reach (its DNS subject-alternative name), so one host of the pool cannot pose
as another; a server learns who the client is from its certificate's common name.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanvisor.errors import SanvisorError, TlsCredentialsError, TlsPeerError, TlsRefusedError

CREDS_DIR = "tls"  # under an agent's home
CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"  # QEMU's names (tls-creds-x509's dir)
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
AGENT_PORT = 8141  # an agent's port for the other hosts of its pool
ADMIN_DIR = "admin/tls"  # under the pool home: the CLI's certificate (`pool admin`)
ADMIN_OU = "admin"  # an administrator's certificate: this organizational unit
CONNECT_TIMEOUT = 10.0  # a client's TCP connect; the handshake has the call's time
HANDSHAKE_TIMEOUT = 60.0  # a server's, from when its loop starts it


@dataclass(frozen=True)
class Credentials:
    """A host's credentials: a directory laid out as QEMU's tls-creds-x509 wants it
    (the agent uses the same files)."""

    dir: Path

    @classmethod
    def of_home(cls, home: Path) -> Credentials:
        return cls(home / CREDS_DIR)

    @property
    def ca(self) -> Path:
        return self.dir / CA_CERT

    @property
    def cert(self) -> Path:
        return self.dir / SERVER_CERT

    @property
    def key(self) -> Path:
        return self.dir / SERVER_KEY

    def present(self) -> bool:
        return all((self.dir / n).exists() for n in (CA_CERT, SERVER_CERT, SERVER_KEY,
                                                      CLIENT_CERT, CLIENT_KEY))

    def check(self, host: str) -> None:
        """Refuse credentials that are missing, or a key others may read (as ssh does)."""
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY):
            path = self.dir / name
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                raise TlsCredentialsError(
                    f"{host} has no {name} in {self.dir} (issue its certificate with "
                    f"'sanvisor pool cert {host}')", path=str(path)) from None
            if name.endswith("-key.pem") and mode & 0o077:
                raise TlsCredentialsError(f"{path} may be read by others (mode "
                                          f"{mode & 0o777:o}); chmod 600 it", path=str(path))


def _context(creds: Credentials, purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=str(creds.ca))
        if purpose == ssl.PROTOCOL_TLS_SERVER:
            ctx.load_cert_chain(str(creds.cert), str(creds.key))
        else:
            ctx.load_cert_chain(str(creds.dir / CLIENT_CERT), str(creds.dir / CLIENT_KEY))
    except (OSError, ssl.SSLError) as exc:
        raise TlsCredentialsError(f"the TLS credentials in {creds.dir} cannot be used: "
                                  f"{getattr(exc, 'strerror', None) or exc}",
                                  path=str(creds.dir)) from None
    return ctx


def server_context(creds: Credentials) -> ssl.SSLContext:
    ctx = _context(creds, ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0  # no session resumption: each connection proves its certificate
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """check_hostname is on: the server's certificate must name the host dialled."""
    return _context(creds, ssl.PROTOCOL_TLS_CLIENT)


def admin_name(cert: dict[str, Any] | None) -> str | None:
    """The administrator a verified peer certificate names (``pool admin``): its common
    name, when its organizational unit is ``admin`` and it names no host."""
    if not cert or cert.get("subjectAltName"):
        return None
    attrs = [(k, v) for rdn in cert.get("subject", ()) for k, v in rdn]
    cns = [v for k, v in attrs if k == "commonName"]
    ous = [v for k, v in attrs if k == "organizationalUnitName"]
    return cns[0] if len(cns) == 1 and ous == [ADMIN_OU] else None


def peer_name(cert: dict[str, Any] | None) -> str | None:
    """The host a verified peer certificate (``getpeercert()``) names: its common name,
    if its DNS subject-alternative names include it too (as pool/pki.py issues them)."""
    if not cert:
        return None
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    dns = {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"}
    return cns[0] if len(cns) == 1 and cns[0] in dns else None


# ---- what a failure means, in one line ------------------------------------------------

_VERIFY = {  # OpenSSL's X509_V_ERR_* codes, as the caller should read them
    9: "its certificate is not valid yet",
    10: "its certificate has expired",
    2: "its certificate is not signed by the pool's CA",
    18: "its certificate is not signed by the pool's CA (self-signed)",
    19: "its certificate is not signed by the pool's CA",
    20: "its certificate is not signed by the pool's CA",
    21: "its certificate is not signed by the pool's CA",
    62: "its certificate is not this host's (it names another host)",
}
_ALERTS = {  # the alert the other side sent: why it refused us
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a certificate of the pool",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says our certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it finds our certificate bad (expired, not yet "
                                   "valid, or malformed)",
    "TLSV1_ALERT_UNKNOWN_CA": "our certificate is not signed by its pool's CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it does not accept our certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (1.3 only)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the handshake failed (no cipher in common?)",
}


def _own_validity(creds: Credentials | None, now: dt.datetime) -> str | None:
    """Why our own certificate would be refused, if its dates say so."""
    if creds is None:
        return None
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((creds.dir / CLIENT_CERT).read_bytes())
    except (OSError, ValueError, ImportError):
        return None
    if now < cert.not_valid_before_utc:
        return f"our certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if now > cert.not_valid_after_utc:
        return f"our certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _own_issuer(creds: Credentials) -> str | None:
    """Why our own certificate would be refused, if the pool's CA did not sign it."""
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((creds.dir / CLIENT_CERT).read_bytes())
        ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
    except (OSError, ValueError, ImportError):
        return None
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # ValueError, TypeError, InvalidSignature: not this CA's
        return "our certificate is not signed by the pool's CA"
    return None


def closed_in_handshake(host: str, where: str, creds: Credentials) -> SanvisorError:
    """TLS 1.3: the server verifies our certificate after our side of the handshake is
    done; a refusal is its closing the connection before any reply."""
    why = (_own_validity(creds, dt.datetime.now(dt.UTC)) or _own_issuer(creds)
           or "it does not accept our certificate (not of its pool's CA, or revoked "
           "by a new CA?)")
    return TlsRefusedError(f"{host} ({where}) refused us: {why}", host=host, address=where)


def failure(exc: BaseException, host: str, where: str,
            creds: Credentials | None = None) -> SanvisorError | None:
    """The one-line error for a failed TLS exchange with ``host`` at ``where``; None when
    ``exc`` is no TLS failure (a refused connection, a timeout: the caller says those)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = _VERIFY.get(exc.verify_code or -1) or exc.verify_message or str(exc)
        return TlsPeerError(f"{host} ({where}): {why}; refused", host=host, address=where,
                            verify_code=exc.verify_code)
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return TlsRefusedError(f"{host} ({where}) closed the connection in the TLS "
                               "handshake (is it an agent of this pool?)", host=host,
                               address=where)
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or "")
        if reason == "WRONG_VERSION_NUMBER":
            return TlsPeerError(f"{host} ({where}) does not speak TLS there", host=host,
                                address=where)
        why = _own_validity(creds, dt.datetime.now(dt.UTC)) or _ALERTS.get(reason) or (
            reason.lower().replace("_", " ") if reason else str(exc))
        return TlsRefusedError(f"{host} ({where}) refused us: {why}", host=host,
                               address=where, reason=reason)
    return None


def describe_peer_failure(exc: BaseException) -> str:
    """A server's note on a client it refused in the handshake (its log line)."""
    if isinstance(exc, ssl.SSLError):
        return str(getattr(exc, "verify_message", "") or getattr(exc, "reason", "") or exc)
    if isinstance(exc, TimeoutError):
        return f"no handshake within {HANDSHAKE_TIMEOUT:g} s"
    return os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)


#: `sanvisor info` and the agent's log warn this many days before a certificate ends
WARN_DAYS = 30
_WHAT = ((CA_CERT, "the pool's CA certificate",
          "make a new pool CA ('sanvisor pool ca --force') and new certificates for "
          "every host"),
         (SERVER_CERT, "this host's certificate", "issue a new one with 'sanvisor pool "
          "cert HOST' (the agent reads it again by itself)"),
         (CLIENT_CERT, "this host's certificate", "issue a new one with 'sanvisor pool "
          "cert HOST' (the agent reads it again by itself)"))


def expiry(creds: Credentials, now: dt.datetime | None = None,
           within_days: int = WARN_DAYS) -> tuple[dt.datetime | None, str | None]:
    """When the first of this host's certificates (its CA's included) ends, and a
    one-line warning if that is within ``within_days`` days or past."""
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - a dependency of the pool layer
        return None, None
    ends: list[tuple[dt.datetime, str, str, str]] = []
    for name, what, hint in _WHAT:
        try:
            cert = x509.load_pem_x509_certificate((creds.dir / name).read_bytes())
        except (OSError, ValueError):
            continue
        ends.append((cert.not_valid_after_utc, name, what, hint))
    if not ends:
        return None, None
    end, name, what, hint = min(ends)
    now = now or dt.datetime.now(dt.UTC)
    left = end - now
    if left > dt.timedelta(days=within_days):
        return end, None
    when = f"{end:%Y-%m-%d %H:%M} UTC"
    if left <= dt.timedelta(0):
        return end, f"{what} ({creds.dir / name}) expired on {when}: peers refuse it; {hint}"
    return end, (f"{what} ({creds.dir / name}) expires on {when}, in {left.days} day(s): "
                 f"{hint}")
