"""Live migration of a Xen domain between two hosts with ``xl migrate``, arranged by the
agents instead of ssh.

Over the LAN (both dom0s have an address on it, ``/run/sv-lan``): the target agent
starts a one-shot TCP listener in its dom0 (:class:`NetReceiver`, running
:mod:`sanvisor.xenhost.mignet`) that takes one connection presenting a fresh random
token and runs the receiver on it; the address and token reach the source agent
over the agents' authenticated API (``tcp:IP:PORT:TOKEN``), and its dom0 runs ``xl
migrate -s CMD`` with CMD connecting there: xl's stream goes dom0 to dom0, never
through the agents. Without a LAN, the stream crosses the command channels:

Target: ``xl migrate-receive`` runs in its dom0 (stdin/stdout streamed over the
host's channel) and its agent relays them to a one-shot unix socket
(:class:`Receiver`). Source: ``xl migrate -s CMD DOM peer`` runs in its dom0, where
CMD joins xl's stream to two FIFOs; two more dom0 processes stream the FIFOs over
the source's channel, and the source agent relays them to the target's socket
(:func:`send`). xl's own protocol (ready banner, memory rounds, the final "go")
passes through unchanged, so xl keeps its guarantees: the domain stays on the source
until the target has it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sanvisor.errors import HypervisorError, MigrationNotStartedError

log = logging.getLogger(__name__)

MIG_DIR = "/run/sv-migrate"
ACCEPT_TIMEOUT = 60.0
Run = Callable[[list[str], bytes | None], tuple[int, str, str]]
NET = "tcp:"  # an address over the LAN: tcp:IP:PORT:TOKEN
#: dom0's address on the LAN, written by a nested dom0's init (xenhost/scripts.py)
LAN_FILE = "/run/sv-lan"


def _mignet() -> list[str]:
    """dom0's Python running xenhost/mignet.py (-S: only its bundled standard library).
    Imported here, not above: a real host's agent never loads xenhost/."""
    from sanvisor.xenhost.pybundle import MIGNET, PYTHON_HOME

    return [f"{PYTHON_HOME}/bin/python3", "-S", MIGNET]


def _pump_socket(conn: socket.socket, proc: Any) -> None:
    """Bytes from the peer's socket into a dom0 process's stdin, then its EOF."""
    with contextlib.suppress(Exception):
        while data := conn.recv(1 << 20):
            proc.write(data)
    with contextlib.suppress(Exception):
        proc.close_stdin()


def _to_socket(conn: socket.socket) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        with contextlib.suppress(OSError):  # the peer is gone: xl will notice
            conn.sendall(data)
    return send


def receive_argv(live: bool, cfg: str) -> list[str]:
    """The target's dom0 command: xl's live receiver, or a restore from the stream."""
    if live:
        return ["xl", "migrate-receive"]
    return ["sh", "-c", 'exec xl restore -p "$1" /proc/self/fd/0', "sh", cfg]


class Receiver:
    """Target side: ``argv`` (:func:`receive_argv`) in dom0, fed from a unix socket."""

    def __init__(self, spawn: Callable[..., Any], sock_path: Path, argv: list[str]) -> None:
        self.spawn = spawn
        self.argv = argv
        self.sock_path = sock_path
        self.address = str(sock_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path.unlink(missing_ok=True)
        self._listener.bind(str(sock_path))
        os.chmod(sock_path, 0o600)
        self._listener.listen(1)
        self._listener.settimeout(ACCEPT_TIMEOUT)
        self._done = threading.Event()
        self.rc: int | None = None
        self.error = ""
        self._proc: Any = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._serve, name="xl-migrate-receive",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn: socket.socket | None = None
        try:
            conn, _ = self._listener.accept()
            conn.settimeout(None)
            if self._cancelled:
                raise HypervisorError("the incoming migration was cancelled")
            proc = self._proc = self.spawn(self.argv, on_out=_to_socket(conn))
            feeder = threading.Thread(target=_pump_socket, args=(conn, proc), daemon=True)
            feeder.start()
            self.rc = proc.wait()
            self.error = bytes(proc.err).decode(errors="replace")
            self._said_end()
        except Exception as exc:  # no sender came, or the channel broke
            self.error = str(exc)
        finally:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._listener.close()
            self.sock_path.unlink(missing_ok=True)
            self._done.set()

    def _said_end(self) -> None:
        log.info("the incoming stream ended: %s exited with status %s",
                 "xl migrate-receive" if self.argv[0] == "xl" else "xl restore", self.rc)

    def cancel(self) -> None:
        """The source gave up: no sender is taken any more, and a receiving xl is killed
        (it then leaves no domain: xl destroys what it had not finished)."""
        self._cancelled = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.kill()
        self._done.wait(10)

    def wait(self, timeout: float) -> None:
        """Until xl migrate-receive has finished; raises with xl's reason on failure."""
        from sanvisor.drivers.xen.xl import xl_reason

        if not self._done.wait(timeout):
            raise HypervisorError(f"the migration did not finish within {timeout:.0f}s")
        if self.rc != 0:
            what = "xl migrate-receive" if self.argv[0] == "xl" else "xl restore"
            raise HypervisorError(f"{what} on the target failed: "
                                  f"{xl_reason(self.error, '', self.rc or 1)}")


def dom0_lan(run: Run) -> str | None:
    """dom0's address on the LAN (``IP``), or None when it has none."""
    rc, out, _ = run(["cat", LAN_FILE], None)
    ip = out.strip().split("/")[0] if rc == 0 else ""
    return ip or None


class NetReceiver(Receiver):
    """Target side over the LAN: mignet's one-shot listener in dom0 runs ``argv`` on
    the first connection that presents the token (``xl migrate-receive`` on the
    socket itself; ``xl restore`` fed through a pipe). ``address`` is what the
    source needs: ``tcp:IP:PORT:TOKEN``."""

    def __init__(self, spawn: Callable[..., Any], argv: list[str], live: bool) -> None:
        self.spawn = spawn
        self.argv = argv
        self.rc = None
        self.error = ""
        self._done = threading.Event()
        self._cancelled = False
        token = secrets.token_hex(32)
        said = bytearray()
        heard = threading.Event()

        def on_out(data: bytes) -> None:
            said.extend(data)
            if b"\n" in said:
                heard.set()

        mode = "exec" if live else "pipe"
        self._proc = spawn([*_mignet(), "listen", token, mode, *argv], on_out=on_out,
                           timeout=ACCEPT_TIMEOUT + 7200)
        self._thread = threading.Thread(target=self._serve, name="xl-migrate-receive",
                                        daemon=True)
        self._thread.start()
        if not heard.wait(30) or len(words := bytes(said).split()) != 2:
            self.cancel()
            raise HypervisorError(f"dom0 could not listen for the migration: "
                                  f"{self.error.strip() or bytes(said).decode()!r}")
        self.address = f"{NET}{words[0].decode()}:{words[1].decode()}:{token}"

    def _serve(self) -> None:
        try:
            self.rc = self._proc.wait()
            self.error = bytes(self._proc.err).decode(errors="replace")
            self._said_end()
        except Exception as exc:  # the channel broke
            self.error = str(exc)
        finally:
            self._done.set()

    def cancel(self) -> None:
        """No sender is taken any more, and a receiving xl is killed (it then leaves no
        domain: xl destroys what it had not finished)."""
        self._cancelled = True
        with contextlib.suppress(Exception):
            self._proc.kill()
        self._done.wait(10)


LOGDIRTY_HINT = ("live migration needs Xen's log-dirty mode, which this Xen refuses for "
                 "PV guests (EOPNOTSUPP: built without shadow paging); PVH guests "
                 "(type = \"pvh\") migrate live on hosts with HAP; migrate without -l "
                 "stops, copies and restarts the guest instead")


#: libxl's words when its save failed before the guest suspended (the live rounds, or
#: the guest's answer to the suspend request): xl resumes nothing, the guest ran on
NOT_SUSPENDED = "domain did not respond to suspend request"


def _runs(run: Run, name: str) -> bool:
    """``name`` is on this dom0 and not stopped (neither shut down nor dying)."""
    rc, out, _ = run(["xl", "list", name], None)
    rows = [ln.split() for ln in out.splitlines()[1:] if ln.split()]
    return rc == 0 and len(rows) == 1 and not any(c in rows[0][-2] for c in "scd")


def settle(run: Run, name: str, resume: bool) -> None:
    """After an agent restart (``Instance.settle_outgoing``): what an outgoing migration
    its dead agent left is cleared (the stream's FIFOs), and the copy ``xl save -p`` (or
    an unfinished ``xl migrate``) left paused runs on here if ``resume``. Blocking."""
    from sanvisor.drivers.xen.xl import Xl

    run(["rm", "-rf", f"{MIG_DIR}/{name}"], None)
    xl = Xl(run)
    info = xl.info(name)
    if resume and info is not None and info.letter == "p":
        log.warning("%s: left paused by a migration whose agent died; resuming it", name)
        xl("unpause", name)


class XlLog:
    """xl's stderr as it comes, each line with the time it arrived (for the downtime:
    xl prints none of its own)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lines: list[tuple[float, str]] = []
        self._part = b""

    def __call__(self, data: bytes) -> None:
        now = time.monotonic()
        self.data.extend(data)
        *done, self._part = (self._part + data).split(b"\n")
        self.lines += [(now, ln.decode(errors="replace")) for ln in done]

    def text(self) -> str:
        return bytes(self.data).decode(errors="replace")

    def between(self, first: str, last: str) -> float | None:
        """Seconds from the first line holding ``first`` to the last holding ``last``."""
        a = next((t for t, ln in self.lines if first in ln), None)
        b = next((t for t, ln in reversed(self.lines) if last in ln), None)
        return None if a is None or b is None or b < a else b - a


#: the source xl's lines around the guest's stop: the last memory round begins with
#: the guest suspended (libxl's debug line), the target reports it started the guest
SUSPENDED = "guest has suspended"
STARTED = "Target reports successful startup"


def _relay(spawn: Callable[..., Any], conn: socket.socket, peer_sock: str, d: str,
           name: str, live: bool, procs: list[Any]) -> list[str]:
    """The stream through the agents: xl's FIFOs in dom0 streamed over the channel to
    the target agent's unix socket. Returns xl's argv."""
    conn.connect(peer_sock)
    procs.append(spawn(["cat", f"{d}/out"], on_out=_to_socket(conn)))
    if not live:
        return ["xl", "save", "-p", name, f"{d}/out"]
    into = spawn(["sh", "-c", 'exec cat > "$1"', "sh", f"{d}/in"])  # the target talks back
    procs.append(into)
    threading.Thread(target=_pump_socket, args=(conn, into), daemon=True).start()
    inner = f"cat {shlex.quote(d + '/in')} & exec cat > {shlex.quote(d + '/out')}"
    bridge = f"sh -c {shlex.quote(inner)}"  # xl runs it through a shell
    return ["xl", "migrate", "-s", bridge, name, "peer"]


def send(run: Run, spawn: Callable[..., Any], name: str, peer_sock: str,
         timeout: float, *, live: bool) -> None:
    """Source side: ``name`` to the target listening on ``peer_sock``; returns when the
    domain is on the target. Live: ``xl migrate`` (xl's protocol both ways). Not
    live (xm's default): ``xl save -p`` into the stream: the guest stops and is
    copied, and stays here, paused, until the caller knows the target has it."""
    from sanvisor.drivers.xen.xl import xl_reason

    d = f"{MIG_DIR}/{name}"
    rc, _, err = run(["sh", "-c", 'rm -rf "$1" && mkdir -p "$1" && mkfifo "$1/in" "$1/out"',
                      "sh", d], None)
    if rc != 0:
        raise HypervisorError(f"dom0: cannot prepare the migration: {err.strip()}")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    procs: list[Any] = []
    try:
        if peer_sock.startswith(NET):  # dom0 to dom0 over the LAN: xl's bytes skip us
            ip, port, token = peer_sock[len(NET):].split(":")
            log.info("%s: xl's stream goes to %s:%s over the LAN", name, ip, port)
            connect = [*_mignet(), "connect", ip, port, token]
            if live:  # xl runs CMD through a shell, appending words mignet ignores
                argv = ["xl", "migrate", "-s", shlex.join(connect), name, "peer"]
            else:
                procs.append(spawn([*connect, f"{d}/out"]))
                argv = ["xl", "save", "-p", name, f"{d}/out"]
        else:
            argv = _relay(spawn, conn, peer_sock, d, name, live, procs)
        if live:  # xl's debug lines date the guest's suspension (not shown otherwise)
            argv = ["xl", "-vvv", *argv[1:]]
        verb = "migrate" if live else "save"
        xl_log = XlLog()
        xl = spawn(argv, timeout=timeout, on_err=xl_log)
        procs.append(xl)
        xl.close_stdin()
        rc = xl.wait(timeout + 10)
        if live:
            log.debug("xl migrate log:\n%s", "\n".join(f"{t:.3f} {ln}" for t, ln in xl_log.lines))
        if live and rc == 0 and (down := xl_log.between(SUSPENDED, STARTED)) is not None:
            log.info("xl migrate %s: downtime %.0f ms by xl's log", name, down * 1000)
        if rc != 0:
            err_text = xl_log.text() or bytes(xl.err).decode(errors="replace")
            log.warning("xl %s %s failed (rc %s):\n%s", verb, name, rc, err_text)
            if "Failed to enable logdirty" in err_text:
                raise HypervisorError(f"xl migrate failed: {LOGDIRTY_HINT}")
            said = "\n".join(ln for ln in err_text.splitlines()  # not -vvv's debug lines
                             if ": debug:" not in ln and "xc: detail:" not in ln)
            why = f"xl {verb} failed: {xl_reason(said, '', rc)}"
            if live and NOT_SUSPENDED in err_text and _runs(run, name):
                raise MigrationNotStartedError(why, domain=name)
            raise HypervisorError(why)
        if not live and procs[0].wait(timeout) != 0:  # else all of it left for the target
            why = bytes(procs[0].err).decode(errors="replace").strip()
            raise HypervisorError(f"the stream to the target failed: {why or 'no reason'}")
    except OSError as exc:
        raise HypervisorError(f"cannot reach the target host's agent: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
        with contextlib.suppress(Exception):
            run(["rm", "-rf", d], None)
