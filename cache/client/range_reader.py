"""One byte range of a large download, received in a thread.

The event loop of one process can only use one core, and receiving a large file through
aiohttp there costs a new `bytes` per piece of at most 64 KiB plus the loop's bookkeeping
around it. A range read here goes through a plain blocking socket: `readinto` a buffer
that is reused, `pwrite` from it, one checksum update. All three release the GIL, so
several ranges in several threads share the cores. Only plain-HTTP sources and ranges
the caller already knows the size of come here; everything else (TLS, redirects, the
first request that learns the size and checksum) stays with aiohttp.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

from stashflow.cache.client.errors import (
    Retryable,
    Stalled,
    StashError,
    error_cause,
    status_error,
)
from stashflow.integration.checksums import Hasher

# Bytes per readinto: large enough that the per-call cost vanishes, small enough to stay
# in the CPU caches between the receive and the write.
BUFFER = 1 << 20


class Redirected(Exception):
    """The source answered with a redirect: the caller fetches the range its own way."""


class RangeReader:
    """GET bytes [start, end] of `url` into the file `fd` at the same offsets.

    `pos` is how far the bytes written reach, also after an error, so the caller can
    record what arrived and ask another source for the rest. Progress is reported
    through `on_bytes` (called from the thread). `stop()` ends the transfer from another
    thread: the socket is shut down and `run` returns or raises at once."""

    def __init__(self, obj: str, server: str, url: str, start: int, end: int, fd: int,
                 headers: dict[str, str], piece: Hasher | None, *, connect_timeout: float,
                 header_timeout: float, stall_window: float, min_rate: float,
                 on_bytes: Callable[[int], None]) -> None:
        self.obj, self.server, self.url = obj, server, url
        self.start, self.end, self.pos = start, end, start
        self.fd, self.headers, self.piece = fd, headers, piece
        self.connect_timeout, self.header_timeout = connect_timeout, header_timeout
        self.stall_window, self.min_rate = stall_window, min_rate
        self.on_bytes = on_bytes
        self._conn: http.client.HTTPConnection | None = None
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                          timeout=self.connect_timeout)
        self._conn = conn
        try:
            conn.connect()
            if self._stopped.is_set():
                raise Retryable(self.obj, "transfer cancelled", server=self.server)
            assert conn.sock is not None
            conn.sock.settimeout(self.header_timeout)
            conn.request("GET", target, headers={
                **self.headers, "Range": f"bytes={self.start}-{self.end}"})
            resp = conn.getresponse()
            self._check(resp)
            conn.sock.settimeout(self.stall_window)
            self._body(resp)
        except StashError:
            raise
        except TimeoutError:
            waited = self.stall_window if self.pos > self.start else self.header_timeout
            raise Stalled(self.obj, f"{self.server} stalled: nothing received for "
                                    f"{waited:g}s", server=self.server) from None
        except (OSError, http.client.HTTPException) as e:
            if self._stopped.is_set():
                raise Retryable(self.obj, "transfer cancelled", server=self.server) from None
            text = str(e) or type(e).__name__
            raise Retryable(self.obj, f"{self.server} broke off the transfer: {text}",
                            server=self.server) from None
        finally:
            conn.close()

    def _check(self, resp: http.client.HTTPResponse) -> None:
        status = resp.status
        if status in (301, 302, 303, 307, 308):
            raise Redirected(resp.getheader("Location") or "")
        if status != 206:
            if status == 200:
                raise Retryable(self.obj, f"{self.server} ignores Range requests",
                                server=self.server)
            raise status_error(self.obj, self.server, status, _cause(resp), resp.headers)
        first, last = _content_range(resp.getheader("Content-Range"))
        if first != self.start or last != self.end:
            raise Retryable(self.obj, f"{self.server} sent a bad Content-Range",
                            server=self.server)

    def _body(self, resp: http.client.HTTPResponse) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        window_start, window_bytes = time.monotonic(), 0
        while self.pos <= self.end:
            if self._stopped.is_set():
                raise Retryable(self.obj, "transfer cancelled", server=self.server)
            n = resp.readinto(view[: min(BUFFER, self.end - self.pos + 1)])
            if not n:
                raise Retryable(self.obj, f"{self.server} sent {self.pos - self.start} of "
                                          f"{self.end - self.start + 1} bytes",
                                server=self.server)
            data = view[:n]
            written = os.pwrite(self.fd, data, self.pos)
            if written != n:
                raise OSError(f"short write at offset {self.pos} (disk full?)")
            if self.piece is not None:
                self.piece.update(data)
            self.pos += n
            self.on_bytes(n)
            window_bytes += n
            now = time.monotonic()
            if now - window_start >= self.stall_window:
                if window_bytes < self.min_rate * (now - window_start):
                    raise Stalled(self.obj, f"{self.server} stalled: {window_bytes} bytes in "
                                            f"{now - window_start:.1f}s", server=self.server)
                window_start, window_bytes = now, 0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """First and last byte of `bytes a-b/size`."""
    if not value or not value.startswith("bytes "):
        return None, None
    span = value[6:].split("/", 1)[0]
    first, _, last = span.partition("-")
    try:
        return int(first), int(last)
    except ValueError:
        return None, None


def _cause(resp: http.client.HTTPResponse) -> str:
    try:
        body = resp.read(8192)
    except (OSError, http.client.HTTPException):
        body = b""
    return error_cause(resp.status, resp.reason, body)
