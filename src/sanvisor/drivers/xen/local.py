"""dom0 as the place the agent runs: the Xen driver's transport on a real Xen host.

On a real host the agent runs in dom0 and calls `xl` directly: :class:`LocalDom0`
gives the driver the same three things the lab's command channel gives it
(``run`` to completion, ``put_file``, ``spawn`` a streaming process, with a pty
for `xl console`), with local processes. The channel to a nested host's dom0
(xenhost/channel.py) is one transport among others; this is the plain case.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sanvisor.errors import HypervisorError

Sink = Callable[[bytes], None]


class LocalProc:
    """A process of dom0 started by the agent: output to the sinks (or collected),
    input written to it, an optional deadline after which it is killed."""

    def __init__(self, argv: list[str], *, timeout: float = 0, pty: bool = False,
                 on_out: Sink | None = None, on_err: Sink | None = None) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self._on_out = on_out or self.out.extend
        self._on_err = on_err or self.err.extend
        self._master = -1
        try:
            if pty:
                self._master, slave = os.openpty()
                try:
                    self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave,
                                                 stderr=slave, start_new_session=True)
                finally:
                    os.close(slave)
                readers = [(self._master, self._on_out)]
            else:
                self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             start_new_session=True)
                assert self.proc.stdout is not None and self.proc.stderr is not None
                readers = [(self.proc.stdout.fileno(), self._on_out),
                           (self.proc.stderr.fileno(), self._on_err)]
        except OSError as exc:
            if self._master >= 0:
                os.close(self._master)
            raise HypervisorError(f"dom0: cannot run {argv[0]}: {exc.strerror}",
                                  argv=argv) from exc
        self._threads = [threading.Thread(target=self._pump, args=(fd, sink), daemon=True)
                         for fd, sink in readers]
        for t in self._threads:
            t.start()
        self._timer = threading.Timer(timeout, self.kill) if timeout > 0 else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    @staticmethod
    def _pump(fd: int, sink: Sink) -> None:
        with contextlib.suppress(OSError):  # EIO: the pty's other side closed
            while data := os.read(fd, 65536):
                sink(data)

    def write(self, data: bytes, deadline: float | None = None) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            if self._master >= 0:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._master, view):]
            elif self.proc.stdin is not None:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self._master < 0 and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def kill(self, signum: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise HypervisorError(f"dom0 process {self.proc.args!r} still running after "
                                  f"{timeout:.0f}s") from exc
        if self._timer is not None:
            self._timer.cancel()
        for t in self._threads:
            if self._master < 0:
                t.join(5)
        if self._master >= 0:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = -1
        return rc


class LocalDom0:
    """run / put_file / spawn in this dom0, for the Xen driver."""

    def run(self, argv: list[str], stdin: bytes | None = None,
            timeout: float = 120) -> tuple[int, str, str]:
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                                  stdin=None if stdin is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            return 127, "", f"{argv[0]}: command not found"
        except subprocess.TimeoutExpired:
            return 137, "", f"{argv[0]}: killed after {timeout:g}s"
        return (proc.returncode, proc.stdout.decode(errors="replace"),
                proc.stderr.decode(errors="replace"))

    def put_file(self, path: str, data: bytes) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def spawn(self, argv: list[str], *, timeout: float = 0, pty: bool = False,
              on_out: Sink | None = None, on_err: Sink | None = None) -> LocalProc:
        return LocalProc(argv, timeout=timeout, pty=pty, on_out=on_out, on_err=on_err)
