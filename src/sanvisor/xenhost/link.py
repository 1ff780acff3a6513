"""The agent's end of a nested Xen host's command channel (QEMU already running).

`lab up --xen-hosts` boots the nested Xen and lets go of its channel; the host's
agent then connects here. QEMU's socket takes one client at a time, so this link is
the only user of dom0's server; it reconnects after the connection broke.
"""

from __future__ import annotations

import threading

from sanvisor.errors import TimeoutError_
from sanvisor.waiting import wait_until
from sanvisor.xenhost.channel import Channel, ChannelError, Proc, Sink, put_file
from sanvisor.xenhost.faults import Dom0Faults


class Dom0Link:
    def __init__(self, sock: str, connect_timeout: float = 30.0) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._channel: Channel | None = None
        self._timeout = connect_timeout
        self._faults = Dom0Faults.from_env()  # TEST-ONLY (xenhost/faults.py): else None

    def channel(self) -> Channel:
        with self._lock:
            if self._channel is not None and not self._channel.closed:
                return self._channel
            last: list[BaseException] = []

            def connected() -> Channel | None:
                try:
                    return Channel(self.sock)
                except (OSError, ChannelError) as exc:
                    last[:] = [exc]
                    return None

            try:
                self._channel = wait_until(f"dom0 at {self.sock}", connected, self._timeout)
            except TimeoutError_:
                raise ChannelError(f"cannot reach dom0 at {self.sock}: "
                                   f"{last[0] if last else 'no answer'}") from None
            return self._channel

    def run(self, argv: list[str], stdin: bytes | None = None,
            timeout: float = 120) -> tuple[int, str, str]:
        if self._faults is not None:
            failed = self._faults.fail(argv)
            if failed is not None:
                return failed
        result = self.channel().run(argv, timeout, stdin)
        if self._faults is not None:
            self._faults.hold(argv)
        return result

    def spawn(self, argv: list[str], *, timeout: float = 0, pty: bool = False,
              on_out: Sink | None = None, on_err: Sink | None = None) -> Proc:
        return self.channel().spawn(argv, timeout=timeout, pty=pty, on_out=on_out,
                                    on_err=on_err)

    def put_file(self, path: str, data: bytes) -> None:
        put_file(self.run, path, data)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
