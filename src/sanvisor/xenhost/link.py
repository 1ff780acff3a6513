"""The agent's end of a nested Xen host's command channel (QEMU already running).

`lab up --xen-hosts` boots the nested Xen and lets go of its channel; the host's
agent then connects here. QEMU's socket takes one client at a time, so there is
exactly one user of dom0's command server: this link, serialised by a lock.
"""

from __future__ import annotations

import threading
import time

from sanvisor.xenhost.channel import Channel, ChannelError, put_file


class Dom0Link:
    def __init__(self, sock: str, connect_timeout: float = 30.0) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._channel: Channel | None = None
        self._timeout = connect_timeout

    def _chan(self) -> Channel:
        if self._channel is None:
            deadline = time.monotonic() + self._timeout
            while True:
                try:
                    self._channel = Channel(self.sock)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise ChannelError(f"cannot reach dom0 at {self.sock}") from None
                    time.sleep(0.05)
        return self._channel

    def run(self, argv: list[str], stdin: bytes | None = None,
            timeout: float = 120) -> tuple[int, str, str]:
        with self._lock:
            try:
                return self._chan().call(argv, timeout, stdin)
            except (ChannelError, OSError):
                if self._channel is not None:
                    self._channel.close()
                self._channel = None
                raise

    def put_file(self, path: str, data: bytes) -> None:
        put_file(self.run, path, data)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
