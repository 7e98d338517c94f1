"""Wake an I/O thread blocked in ``zmq.Poller.poll`` from other threads, cheaply.

Many threads may call :meth:`Wakeup.set`; only the first since the I/O thread last drained
writes a byte, so a burst of results costs one system call.
"""

from __future__ import annotations

import os


class Wakeup:
    """A self-pipe: poll :attr:`fd`, ``set()`` from any thread, ``drain()`` when readable."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        self._pending = False

    def set(self) -> None:
        if not self._pending:
            self._pending = True
            try:
                os.write(self._w, b"x")
            except OSError:  # closed at shutdown, or the pipe is full (a wake is queued anyway)
                pass

    def drain(self) -> None:
        """Call when :attr:`fd` is readable, BEFORE looking at the work the wake announced.

        Drain first, then clear the flag: a ``set()`` landing in between must leave a byte in the
        pipe. (Clearing first would let that byte be read here while the flag stays set, and every
        later ``set()`` would be skipped: the I/O thread would only wake on its poll timeout.)
        """
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass
        self._pending = False

    def close(self) -> None:
        for fd in (self.fd, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
