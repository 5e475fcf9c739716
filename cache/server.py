"""HTTP face of the cache: object GET/HEAD, the admin API and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from stashflow.cache import metrics, validators
from stashflow.cache.admission import Overloaded
from stashflow.cache.config import CacheConfig
from stashflow.cache.fetch import BlockFuture, CacheFull, ObjectGone, Stalled, guarded
from stashflow.cache.index import Record
from stashflow.cache.namespace import BadPath, Namespace, clean_path
from stashflow.cache.ranges import RangeError, Unsatisfiable, multipart_layout, parse_range
from stashflow.cache.service import CacheService, OriginTimeout
from stashflow.integration.checksums import parse_want_digest, to_digest_header
from stashflow.integration.storage import (
    Corrupt,
    NotFound,
    PermissionDenied,
    StorageError,
    Unavailable,
)
from stashflow.integration.tokens import TokenError

log = logging.getLogger("stashflow.cache")
SERVICE: web.AppKey[CacheService] = web.AppKey("service", CacheService)
ADMIN = "/.stashflow"
CONTENT_TYPE = "application/octet-stream"


def error(status: int, message: str, **fields: Any) -> web.Response:
    body = json.dumps({"error": message, "status": status, **fields})
    headers = {"Retry-After": str(fields.pop("retry_after"))} if "retry_after" in fields else None
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class ObjectHandler:
    def __init__(self, service: CacheService) -> None:
        self.svc = service
        self.cfg = service.cfg
        self._per_result: dict[str, tuple[Any, Any]] = {}  # labelled metrics, by result

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        outcome = {"result": "error"}
        try:
            return await self._handle(request, outcome)
        finally:
            result = outcome["result"]
            children = self._per_result.get(result)
            if children is None:
                children = (metrics.REQUESTS.labels(result), metrics.LATENCY.labels(result))
                self._per_result[result] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - started)

    async def _handle(self, request: web.Request, outcome: dict[str, str]) -> web.StreamResponse:
        try:
            key = clean_path(request.raw_path.partition("?")[0], request.path)
        except BadPath as e:
            return error(400, f"bad path: {e}")
        ns = self.svc.namespaces.match(key)
        if ns is None:
            return error(404, f"no namespace serves {key}", path=key)
        if key == ns.prefix:
            return error(404, f"{key} is a namespace, not an object", path=key)
        if ns.protected:
            try:
                await self.svc.authorize(
                    ns, key, request.headers.get("Authorization"), request.query.get("authz")
                )
            except TokenError as e:
                outcome["result"] = "denied"
                resp = error(e.status, f"{key}: {e}", path=key, reason=e.reason)
                if e.status == 401:
                    resp.headers["WWW-Authenticate"] = 'Bearer realm="stashflow"'
                return resp
        try:
            rec = await self.svc.lookup(ns, key)
        except NotFound as e:
            outcome["result"] = "not_found"
            return error(
                404,
                f"{key} not found at the origin",
                path=key,
                origin=ns.origin_url,
                cause=e.reason,
            )
        except (Unavailable, PermissionDenied, Corrupt, StorageError) as e:
            return error(
                502,
                f"origin {ns.origin_url} failed for {key}: {e.reason}",
                path=key,
                origin=ns.origin_url,
                cause=e.reason,
            )
        except OriginTimeout as e:
            return error(504, str(e), path=key, origin=ns.origin_url, cause="timeout")

        etag = validators.etag(rec.size, rec.mtime, rec.etag)
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Content-Type": CONTENT_TYPE,
        }
        if rec.mtime is not None:
            headers["Last-Modified"] = validators.http_date(rec.mtime)
        if validators.precondition_failed(request.headers, etag, rec.mtime):
            outcome["result"] = "precondition_failed"
            refused = error(412, f"{key} is no longer the version asked for", path=key)
            # the version there is now, for a reader that wants to start over on it
            for name in ("ETag", "Last-Modified"):
                if name in headers:
                    refused.headers[name] = headers[name]
            return refused
        if validators.not_modified(request.headers, etag, rec.mtime):
            outcome["result"] = "not_modified"
            return web.Response(status=304, headers=headers)

        ranges: list[tuple[int, int]] | None = None
        range_header = request.headers.get("Range")
        if range_header is not None and validators.range_applies(request.headers, etag, rec.mtime):
            try:
                ranges = parse_range(range_header, rec.size)
            except RangeError as e:
                return error(400, str(e), path=key)
            except Unsatisfiable as e:
                return web.Response(
                    status=416,
                    text=json.dumps({"error": str(e), "status": 416, "path": key}),
                    content_type="application/json",
                    headers={"Content-Range": f"bytes */{rec.size}"},
                )

        want = request.headers.get("Want-Digest")
        if want:
            # A GET of a large object does not wait for a checksum nobody has yet (it
            # would need the whole object before the first byte): the origin is asked
            # for its own, and failing that it is computed in the background for a GET
            # of the whole object (which fetches all of it anyway), never for a range
            # (a 1% read must not pull in the rest); a HEAD, or a later request, gets it.
            wait = request.method == "HEAD" or rec.inline
            for algorithm in parse_want_digest(want):
                try:
                    value = await self.svc.checksum(
                        ns, rec, algorithm, wait=wait, compute=ranges is None
                    )
                except (StorageError, CacheFull, ObjectGone, Stalled) as e:
                    log.warning("checksum %s of %s failed: %s", algorithm, key, e)
                    continue
                if value is not None:
                    headers["Digest"] = to_digest_header(algorithm, value)
                    break

        self.svc.touch(rec)
        try:
            if rec.inline:
                return await self._send_inline(request, ns, rec, ranges, headers, outcome)
            return await self._send_blocks(request, ns, rec, ranges, headers, outcome)
        except Overloaded as e:
            outcome["result"] = "overloaded"
            return error(429, str(e), path=key, origin=ns.origin_url, retry_after=e.retry_after)
        except NotFound as e:
            return error(404, f"{key} vanished from the origin", path=key, cause=e.reason)
        except Stalled as e:
            return error(504, str(e), path=key, origin=ns.origin_url, cause="stalled")
        except OriginTimeout as e:
            return error(504, str(e), path=key, origin=ns.origin_url, cause="timeout")
        except StorageError as e:
            return error(
                502,
                f"origin {ns.origin_url} failed for {key}: {e.reason}",
                path=key,
                origin=ns.origin_url,
                cause=e.reason,
            )

    # -- small objects: from LMDB, in memory --------------------------------------------

    async def _send_inline(
        self,
        request: web.Request,
        ns: Namespace,
        rec: Record,
        ranges: list[tuple[int, int]] | None,
        headers: dict[str, str],
        outcome: dict[str, str],
    ) -> web.StreamResponse:
        stored = self.svc.index.inline_data(rec)
        cached = stored is not None or self.svc.fetcher.in_memory(rec, 0)
        outcome["result"] = "hit" if cached else "miss"
        try:
            data = await self.svc.inline_bytes(ns, rec, stored)
        except (CacheFull, ObjectGone) as e:
            outcome["result"] = "bypass"
            log.warning("serving %s uncached: %s", rec.key, e)
            data = await self._origin_bytes(ns, rec)
        (metrics.HITS if outcome["result"] == "hit" else metrics.MISSES).inc()
        headers["X-Stashflow-Cache"] = outcome["result"]
        head = request.method == "HEAD"
        if ranges is None:
            metrics.BYTES_TO_CLIENTS.inc(0 if head else len(data))
            if head:
                headers["Content-Length"] = str(len(data))
                return web.Response(status=200, headers=headers)
            return web.Response(status=200, body=data, headers=headers)
        if len(ranges) == 1:
            first, last = ranges[0]
            headers["Content-Range"] = f"bytes {first}-{last}/{rec.size}"
            body = data[first : last + 1]
        else:
            boundary, heads, tail, _ = multipart_layout(ranges, rec.size, CONTENT_TYPE)
            headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
            body = b"".join(h + data[a : b + 1] for h, (a, b) in zip(heads, ranges, strict=True))
            body += tail
        metrics.BYTES_TO_CLIENTS.inc(0 if head else len(body))
        if head:
            headers["Content-Length"] = str(len(body))
            return web.Response(status=206, headers=headers)
        return web.Response(status=206, body=body, headers=headers)

    async def _origin_bytes(self, ns: Namespace, rec: Record) -> bytes:
        async with self.svc.admission.slot(ns.prefix):
            parts = [
                c
                async for c in guarded(
                    ns.storage.stream(ns.relative(rec.key), 0, rec.size),
                    ns.origin_url,
                    self.cfg.stall_window,
                    self.cfg.min_rate,
                )
            ]
        data = b"".join(parts)
        if len(data) != rec.size:
            raise Corrupt(
                ns.storage.url_of(ns.relative(rec.key)),
                f"origin sent {len(data)} of {rec.size} bytes",
            )
        return data

    # -- block objects: sparse data file, sendfile ----------------------------------------

    async def _send_blocks(
        self,
        request: web.Request,
        ns: Namespace,
        rec: Record,
        ranges: list[tuple[int, int]] | None,
        headers: dict[str, str],
        outcome: dict[str, str],
    ) -> web.StreamResponse:
        spans = ranges if ranges is not None else ([(0, rec.size - 1)] if rec.size else [])
        heads: list[bytes] = []
        tail = b""
        if ranges is None:
            status, length = 200, rec.size
        elif len(ranges) == 1:
            status, length = 206, ranges[0][1] - ranges[0][0] + 1
            headers["Content-Range"] = f"bytes {ranges[0][0]}-{ranges[0][1]}/{rec.size}"
        else:
            boundary, heads, tail, length = multipart_layout(ranges, rec.size, CONTENT_TYPE)
            status = 206
            headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        headers["Content-Length"] = str(length)

        # Start the first window before sending headers, so that a cache that cannot
        # store anything, or an origin that fails at once, still gets a clean answer.
        reader = _BlockReader(self, request, ns, rec, outcome)
        self.svc.index.set_open(rec, +1)
        try:
            if spans and request.method != "HEAD":
                reader.prime(spans[0][0], spans[0][1])
                await reader.first_ready()
            else:
                outcome["result"] = "hit" if rec.complete else "miss"
            headers["X-Stashflow-Cache"] = outcome["result"]
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = length
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            with _corked(request.transport):
                for i, (first, last) in enumerate(spans):
                    if heads:
                        await resp.write(heads[i])
                    await reader.send(resp, first, last)
                if tail:
                    await resp.write(tail)
                await resp.write_eof()
            (metrics.HITS if outcome["result"] == "hit" else metrics.MISSES).inc()
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            outcome["result"] = "client_gone"
            raise
        finally:
            reader.close()
            self.svc.index.set_open(rec, -1)


def _sendfile_now(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
    """Send what the socket takes at once of `count` bytes at `offset` of `fd`, straight
    from the page cache; returns how many (0 at the end of the file: `loop.sendfile`
    then reports the short file). A whole small object usually fits, and
    asyncio's `loop.sendfile` (a duplicated file object, futures, reading paused and
    resumed) cost more than the copy itself for objects of 100 KiB. Nothing is sent
    while the transport still buffers earlier bytes, or over TLS."""
    if transport.get_write_buffer_size() or transport.get_extra_info("ssl_object"):
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    # One call: it returns when the socket's buffer is full, so a large object does not
    # keep the event loop from the other clients.
    try:
        return os.sendfile(sock.fileno(), fd, offset, count)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as e:
        raise ConnectionResetError(f"client went away: {e.strerror}") from None


@contextlib.contextmanager
def _corked(transport: asyncio.BaseTransport | None) -> Iterator[None]:
    """TCP_CORK on the client's socket while a body goes out in large pieces: the kernel
    then sends only full segments, and the short segment at the end of each sendfile run
    or block no longer goes out on its own (aiohttp sets TCP_NODELAY). Measured on
    loopback, 1 GiB hits: 1.7-2.0 GB/s without, 2.3-2.5 GB/s with (nginx corks its
    sendfile bodies the same way, `tcp_nopush`). Uncorking at the end pushes the rest."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        yield
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except OSError:  # not TCP after all, or already closed: send uncorked
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


class _ResponseStarted(Exception):
    """An error after the headers went out: the only honest signal left is to cut the
    connection, so that the client sees a short body instead of padded data."""


class _BlockReader:
    """Sends ranges of one block-stored object, fetching missing blocks a window ahead."""

    def __init__(
        self,
        handler: ObjectHandler,
        request: web.Request,
        ns: Namespace,
        rec: Record,
        outcome: dict[str, str],
    ) -> None:
        self.h = handler
        self.svc = handler.svc
        self.request = request
        self.ns = ns
        self.rec = rec
        self.outcome = outcome
        self.futures: dict[int, BlockFuture] = {}
        self.horizon = -1  # blocks below have been ensured
        self.first_block = 0
        self.last_block = 0
        self.bypass: str | None = None
        self.fd: int | None = None
        self.present = 0
        self.missing = 0
        self.sent = 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        metrics.BYTES_TO_CLIENTS.inc(self.sent)

    def prime(self, first: int, last: int) -> None:
        bs = self.rec.block_size
        self.first_block, self.last_block = first // bs, last // bs
        self.horizon = self.first_block
        self._ensure_window()

    async def first_ready(self) -> None:
        fut = self.futures.get(self.first_block)
        if fut is not None and self.bypass is None:
            try:
                await asyncio.shield(fut)
            except (CacheFull, ObjectGone) as e:
                self._to_bypass(str(e))

    def _to_bypass(self, reason: str) -> None:
        if self.bypass is None:
            log.warning("serving %s from the origin without caching: %s", self.rec.key, reason)
        self.bypass = reason
        self.outcome["result"] = "bypass"

    def _ensure_window(self) -> None:
        """Make sure blocks up to one window past the horizon are being fetched."""
        if self.bypass is not None or self.horizon > self.last_block:
            return
        cfg = self.h.cfg
        end = min(self.horizon + cfg.window - 1, self.last_block)
        if end == self.last_block:
            end = min(end + cfg.readahead, self.rec.nblocks - 1)
        try:
            fill = self.svc.fetcher.ensure(self.ns, self.rec, self.horizon, end, self.last_block)
        except CacheFull as e:
            self._to_bypass(str(e))
            return
        self.futures.update(fill.futures)
        self.present += fill.was_present
        self.missing += fill.was_missing
        if self.outcome["result"] != "bypass":
            self.outcome["result"] = (
                "hit" if self.missing == 0 else "miss" if self.present == 0 else "partial"
            )
        self.horizon = end + 1

    async def send(self, resp: web.StreamResponse, first: int, last: int) -> None:
        bs = self.rec.block_size
        if self.horizon < 0 or first // bs != self.first_block:
            self.prime(first, last)
        else:
            self.last_block = last // bs
        pos = first
        while pos <= last:
            if self.bypass is not None:
                await self._stream_from_origin(resp, pos, last)
                return
            idx = pos // bs
            if self.horizon <= self.last_block and self.horizon - idx <= self.h.cfg.window // 2:
                self._ensure_window()
            if idx >= self.horizon:
                self._ensure_window()
                continue
            fut = self.futures.pop(idx, None)
            if fut is not None:
                try:
                    parts = await asyncio.shield(fut)
                except (CacheFull, ObjectGone) as e:
                    self._to_bypass(str(e))
                    continue
                except Exception as e:
                    raise _ResponseStarted(str(e)) from e
                if parts is not None:
                    # this worker fetched the block: send it from memory, without
                    # waiting for it to reach the disk
                    pos = await self._send_parts(resp, parts, idx * bs, pos, last)
                    continue
            # extend over blocks that are on disk too, to send them in one sendfile
            end_idx = idx
            limit = min(last // bs, self.horizon - 1)
            while end_idx < limit:
                nxt = self.futures.get(end_idx + 1)
                if nxt is not None and not (
                    nxt.done() and nxt.exception() is None and nxt.result() is None
                ):
                    break
                end_idx += 1
                if nxt is not None:
                    self.futures.pop(end_idx, None)
            crcs = self.svc.index.present_blocks(self.rec, idx, end_idx)
            if len(crcs) != end_idx - idx + 1 or not await self._verified(crcs):
                # evicted or corrupted meanwhile: ask for those blocks again
                self.horizon = min(self.horizon, idx)
                for j in range(idx, end_idx + 1):
                    self.futures.pop(j, None)
                self._ensure_window()
                continue
            stop = min(last, (end_idx + 1) * bs - 1)
            await self._sendfile(resp, pos, stop - pos + 1)
            pos = stop + 1

    async def _send_parts(
        self, resp: web.StreamResponse, parts: list[Any], start: int, pos: int, last: int
    ) -> int:
        """Send bytes pos..last that fall in a block held in memory (beginning at
        object offset `start`); returns the next position to send."""
        for part in parts:
            end = start + len(part)
            if end > pos and start <= last:
                view = memoryview(part)[pos - start : min(end, last + 1) - start]
                await resp.write(view)
                self.sent += len(view)
                pos += len(view)
            start = end
        return pos

    async def _verified(self, crcs: dict[int, int]) -> bool:
        if self.fd is None:
            try:
                self.fd = os.open(self.svc.index.data_path(self.rec), os.O_RDONLY)
            except FileNotFoundError:
                self._to_bypass("data file disappeared (evicted)")
                return True
        if self.svc.all_verified(self.fd, self.rec, crcs):
            return True
        bad = await asyncio.to_thread(self.svc.verify_blocks, self.fd, self.rec, crcs)
        if bad:
            self.svc.corrupted(self.rec, bad)
            return False
        return True

    async def _sendfile(self, resp: web.StreamResponse, offset: int, count: int) -> None:
        if self.bypass is not None:
            await self._stream_from_origin(resp, offset, offset + count - 1)
            return
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        assert self.fd is not None
        sent = _sendfile_now(transport, self.fd, offset, count)
        self.sent += sent
        offset, count = offset + sent, count - sent
        if not count:
            return
        loop = asyncio.get_running_loop()
        with os.fdopen(os.dup(self.fd), "rb") as fobj:
            try:
                await loop.sendfile(transport, fobj, offset, count)
            except NotImplementedError:
                remaining = count
                while remaining:
                    chunk = await asyncio.to_thread(
                        os.pread, self.fd, min(remaining, 1 << 20), offset
                    )
                    if not chunk:
                        raise _ResponseStarted("data file shorter than its index") from None
                    await resp.write(chunk)
                    offset += len(chunk)
                    remaining -= len(chunk)
        self.sent += count

    async def _stream_from_origin(self, resp: web.StreamResponse, first: int, last: int) -> None:
        rel = self.ns.relative(self.rec.key)
        cfg = self.h.cfg
        try:
            async with self.svc.admission.slot(self.ns.prefix):
                got = 0
                stream = self.ns.storage.stream(rel, first, last - first + 1)
                async for chunk in guarded(
                    stream, self.ns.origin_url, cfg.stall_window, cfg.min_rate
                ):
                    await resp.write(chunk)
                    got += len(chunk)
                    self.sent += len(chunk)
                    metrics.ORIGIN_BYTES.labels(self.ns.prefix, "demand").inc(len(chunk))
        except (StorageError, Stalled, Overloaded) as e:
            raise _ResponseStarted(str(e)) from e
        if got != last - first + 1:
            raise _ResponseStarted(f"origin sent {got} of {last - first + 1} bytes")


@web.middleware
async def _cut_on_late_error(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except _ResponseStarted as e:
        log.error("aborting response for %s: %s", request.path, e)
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError(str(e)) from None


# -- admin API -----------------------------------------------------------------------------


def _admin_allowed(request: web.Request, cfg: CacheConfig) -> bool:
    if cfg.admin_token:
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {cfg.admin_token}".encode())
    peer = request.remote or ""
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def admin_routes(service: CacheService) -> list[web.RouteDef]:
    cfg = service.cfg

    def guard(fn: Any) -> Any:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            if not _admin_allowed(request, cfg):
                return error(
                    403,
                    "admin API: give the admin token as 'Authorization: Bearer' "
                    "(or connect from loopback when the cache has none)",
                )
            result: web.StreamResponse = await fn(request)
            return result

        return wrapper

    async def body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "request body must be a JSON object", "status": 400}),
                content_type="application/json",
            ) from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "request body must be a JSON object", "status": 400}),
                content_type="application/json",
            )
        return data

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(service.stats))

    async def objects(request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        try:
            limit = min(int(request.query.get("limit", "1000")), 100_000)
        except ValueError:
            return error(400, "limit must be an integer")
        # this worker's latest counts; the other workers' arrive within
        # ACCESS_FLUSH_INTERVAL
        await asyncio.to_thread(service.flush_accesses)
        items = [
            {
                "path": r.key,
                "size": r.size,
                "cached_bytes": r.present,
                "complete": r.complete,
                "pinned": r.pinned,
                "hits": r.hits,
                "last_access": r.atime,
                "etag": r.etag,
                "inline": r.inline,
            }
            for r in service.index.objects(prefix, limit)
        ]
        return web.json_response({"objects": items, "count": len(items)})

    async def pin(request: web.Request) -> web.Response:
        data = await body(request)
        path = data.get("path")
        if not isinstance(path, str):
            return error(400, 'give the object as {"path": "/ns/file"}')
        pinned = request.match_info["action"] == "pin"
        rec = await asyncio.to_thread(service.index.set_pinned, path, pinned)
        if rec is None and pinned:
            # pinning an object not cached yet: fetch its metadata so the pin sticks
            ns = service.namespaces.match(path)
            if ns is None:
                return error(404, f"no namespace serves {path}")
            try:
                await service.lookup(ns, path)
            except NotFound as e:
                return error(404, f"cannot pin {path}: {e.reason}", path=path, cause=e.reason)
            except OriginTimeout as e:
                return error(504, f"cannot pin {path}: {e}", path=path,
                             origin=ns.origin_url, cause="timeout")
            except StorageError as e:
                return error(502, f"cannot pin {path}: origin {ns.origin_url} failed: "
                             f"{e.reason}", path=path, origin=ns.origin_url, cause=e.reason)
            rec = await asyncio.to_thread(service.index.set_pinned, path, True)
        if rec is None:
            return error(404, f"{path} is not in the cache")
        return web.json_response({"path": path, "pinned": rec.pinned})

    async def evict(request: web.Request) -> web.Response:
        data = await body(request)
        path, prefix = data.get("path"), data.get("prefix")
        force = bool(data.get("force", False))
        if isinstance(path, str):
            result = await asyncio.to_thread(
                service.index.remove, lambda r: r.key == path, force=force
            )
        elif isinstance(prefix, str) and prefix.startswith("/"):
            # whole path segments: /ns/run1 purges /ns/run1 and /ns/run1/..., not /ns/run10
            top = prefix.rstrip("/")
            result = await asyncio.to_thread(
                service.index.remove,
                lambda r: r.key == top or r.key.startswith(top + "/"),
                force=force,
            )
        else:
            return error(400, 'give {"path": "/ns/file"} or {"prefix": "/ns/dir/"}')
        metrics.EVICTIONS.inc(result.objects)
        metrics.EVICTED_BYTES.inc(result.bytes)
        return web.json_response({"evicted_objects": result.objects, "freed_bytes": result.bytes})

    async def health(request: web.Request) -> web.Response:
        ok = service.disk_state == "ok"
        return web.json_response(
            {"status": "ok" if ok else "degraded", "disk": service.disk_state},
            status=200 if ok else 503,
        )

    return [
        web.get(f"{ADMIN}/stats", guard(stats)),
        web.get(f"{ADMIN}/objects", guard(objects)),
        web.post(f"{ADMIN}/{{action:pin|unpin}}", guard(pin)),
        web.post(f"{ADMIN}/evict", guard(evict)),
        web.post(f"{ADMIN}/purge", guard(evict)),
        web.get(f"{ADMIN}/health", health),
    ]


class AccessLogger(AbstractAccessLogger):
    """One JSON object per request. Only the method, path, status, sizes, peer and
    timing are logged: never headers, so tokens cannot leak into logs."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            json.dumps(
                {
                    "ts": round(_now(), 3),
                    "peer": request.remote,
                    "method": request.method,
                    "path": request.path,
                    "range": request.headers.get("Range"),
                    "status": response.status,
                    "bytes": response.body_length,
                    "seconds": round(time, 6),
                }
            )
        )


def _now() -> float:
    return time.time()


def make_app(service: CacheService) -> web.Application:
    app = web.Application(middlewares=[_cut_on_late_error], client_max_size=1 << 20)
    app[SERVICE] = service
    handler = ObjectHandler(service)

    async def metrics_view(request: web.Request) -> web.Response:
        def state() -> dict[str, float]:
            fs = service.filesystem()
            info = service.index.info()
            return {
                "disk_usage_bytes": float(info["usage_bytes"]),
                "disk_size_bytes": float(service.cfg.size),
                "objects": float(info["objects"]),
                "fs_free_bytes": fs["fs_free_bytes"],
                "inode_use_ratio": fs["inode_use_ratio"],
            }

        body, ctype = await asyncio.to_thread(metrics.render, state)
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def on_startup(app: web.Application) -> None:
        await service.start()

    async def on_cleanup(app: web.Application) -> None:
        await service.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.add_routes(admin_routes(service))
    app.router.add_get("/metrics", metrics_view)
    app.router.add_route("GET", "/{path:.*}", handler)
    app.router.add_route("HEAD", "/{path:.*}", handler)
    return app
