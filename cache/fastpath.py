"""The small-object fast path: plain GETs of cached inline objects answered straight
from the connection's protocol, without aiohttp's per-request machinery.

Jobs reading many small files make the cache's request rate, not its bandwidth, the
limit, and most of a request's cost in aiohttp is framework (request and response
objects, routing, middleware, the writer), not the cache. So each connection starts
here: a request that is a plain `GET` of an inline object already cached and fresh,
with none of the headers that need more (Range, conditionals, Want-Digest,
Authorization, a body, ...), is answered from the index in one write. Anything else
hands the connection, with the bytes not yet handled, to aiohttp's protocol for good;
responses stay in order because the fast path only answers requests that come before
the first one it does not handle.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from stashflow.cache import metrics
from stashflow.cache.index import Record
from stashflow.cache.namespace import BadPath, clean_path
from stashflow.cache.service import CacheService
from stashflow.cache.validators import etag, http_date
from stashflow.integration.checksums import block_crc

MAX_HEAD = 16 << 10
KEEPALIVE = 75.0
# any of these makes a request one for the full handler
_SLOW_HEADERS = frozenset({
    b"range", b"if-range", b"if-none-match", b"if-modified-since", b"if-match",
    b"if-unmodified-since", b"want-digest", b"authorization", b"content-length",
    b"transfer-encoding", b"expect", b"upgrade", b"connection",
})
_access = logging.getLogger("stashflow.cache.access")


class _Dates:
    """The `Date` header, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True).encode()
        return self._value


_DATES = _Dates()
_CRC = struct.Struct("<I")
# key -> (the record's bytes before its access statistics, the record, response head
# up to the Date)
_MEMO: dict[str, tuple[bytes, Record, bytes]] = {}


def _head(rec: Record) -> bytes:
    lines = [
        b"HTTP/1.1 200 OK",
        b"Content-Type: application/octet-stream",
        b"Content-Length: " + str(rec.size).encode(),
        b"ETag: " + etag(rec.size, rec.mtime, rec.etag).encode(),
        b"Accept-Ranges: bytes",
        b"X-Stashflow-Cache: hit",
    ]
    if rec.mtime is not None:
        lines.append(b"Last-Modified: " + http_date(rec.mtime).encode())
    return b"\r\n".join(lines) + b"\r\nDate: "


class _Counts:
    """Counters and latencies of fast hits, added to the shared Prometheus metrics at
    most every half second (each increment of a multiprocess metric is a write to a
    mapped file, a noticeable share of a 4 KiB hit)."""

    def __init__(self) -> None:
        self.hits = 0
        self.bytes = 0
        self.latency = metrics.BatchedObservations(metrics.LATENCY.labels("hit"))
        self._scheduled = False

    def add(self, nbytes: int, seconds: float) -> None:
        self.hits += 1
        self.bytes += nbytes
        self.latency.observe(seconds)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(0.5, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        hits, nbytes, self.hits, self.bytes = self.hits, self.bytes, 0, 0
        self.latency.flush()
        if hits:
            metrics.HITS.inc(hits)
            metrics.REQUESTS.labels("hit").inc(hits)
            metrics.BYTES_TO_CLIENTS.inc(nbytes)


_COUNTS = _Counts()


class FastPathProtocol(asyncio.Protocol):
    def __init__(self, service: CacheService, fallback: Callable[[], asyncio.Protocol],
                 connections: set[FastPathProtocol]) -> None:
        self.svc = service
        self._fallback = fallback
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._idle: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._peer = "-"

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if peer else "-"
        self._connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._hand_over()  # aiohttp answers over-long heads properly
                return
            if not self._serve(self._buf[:end]):
                self._hand_over()
                return
            self._buf = self._buf[end + 4 :]
            self._arm()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- internals ------------------------------------------------------------------------

    def _arm(self) -> None:
        # one timer per connection, pushed back lazily: re-arming a timer on every
        # request costs more than answering a small hit
        self._last = time.monotonic()
        if self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(KEEPALIVE, self._expire)

    def _expire(self) -> None:
        idle = time.monotonic() - self._last
        if idle >= KEEPALIVE:
            self.close()
        else:
            self._idle = asyncio.get_running_loop().call_later(KEEPALIVE - idle, self._expire)

    def _hand_over(self) -> None:
        """Give the connection, and what it sent that was not answered, to aiohttp."""
        transport, self._transport = self._transport, None
        if transport is None:
            return
        if self._idle is not None:
            self._idle.cancel()
        self._connections.discard(self)
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buf:
            protocol.data_received(self._buf)
        self._buf = b""

    def _serve(self, head: bytes) -> bool:
        """Answer one request head if it is a fast-path hit; False otherwise."""
        started = time.perf_counter()
        line, _, fields = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
            return False
        raw = parts[1]
        if b"%" in raw or b"?" in raw or b"#" in raw:
            return False  # encoded or with a query: the full handler decodes properly
        for field in fields.split(b"\r\n"):
            name, sep, _ = field.partition(b":")
            if not sep or name.strip().lower() in _SLOW_HEADERS:
                return False
        try:
            path = raw.decode("ascii")
            key = clean_path(path, path)
        except (UnicodeDecodeError, BadPath):
            return False
        ns = self.svc.namespaces.match(key)
        if ns is None or ns.protected or key == ns.prefix:
            return False
        hit = self.svc.index.inline_hit(key)
        if hit is None:
            return False
        raw, stored = hit
        # the access statistics at the end of the record change every few seconds; what
        # the answer depends on is before them
        identity = raw[: raw.rfind(b',"hits":')]
        memo = _MEMO.get(key)
        if memo is None or memo[0] != identity:
            rec = Record.loads(raw)
            if not rec.inline or not rec.complete:
                return False
            memo = _MEMO[key] = (identity, rec, _head(rec))
            if len(_MEMO) > 100_000:
                _MEMO.clear()
        _, rec, head_bytes = memo
        if time.time() - rec.validated >= self.svc.cfg.revalidate_ttl:
            return False  # due for revalidation with the origin: the full handler does it
        data = stored[4:]
        if block_crc(data) != _CRC.unpack_from(stored)[0]:
            return False  # the full handler refetches (and counts) a bad copy
        assert self._transport is not None
        self._transport.write(head_bytes + _DATES.now() + b"\r\n\r\n" + data)
        self.svc.touch(rec)
        elapsed = time.perf_counter() - started
        _COUNTS.add(len(data), elapsed)
        if not _access.disabled and _access.handlers:
            _access.info(json.dumps({
                "ts": round(time.time(), 3), "peer": self._peer, "method": "GET",
                "path": key, "range": None, "status": 200, "bytes": len(data),
                "seconds": round(elapsed, 6),
            }))
        return True


def protocol_factory(service: CacheService, fallback: Callable[[], Any],
                     connections: set[FastPathProtocol]) -> Callable[[], asyncio.Protocol]:
    def make() -> asyncio.Protocol:
        return FastPathProtocol(service, fallback, connections)

    return make
