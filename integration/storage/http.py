"""HTTP(S) backend with WebDAV for listings and writes (XrdHttp, our origin, nginx dav).

Reads are plain GET/HEAD with Range, so any HTTP server works for them. Writes upload to
a temporary name next to the target and WebDAV-MOVE it into place: a plain PUT over the
target would expose a half-written object to readers and leave it behind when the
upload fails (XrdHttp writes PUT bodies straight into the destination file).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import ssl as ssl_module
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterable, AsyncIterator
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from yarl import URL

from stashflow.integration import checksums
from stashflow.integration.storage.base import (
    DEFAULT_CHUNK,
    Changed,
    Corrupt,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    Storage,
    StorageError,
    Unavailable,
    Unsupported,
    check_range,
    strong_etag,
)

TEMP_MARKER = ".stashflow-tmp-"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_PROPFIND_BODY = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<D:propfind xmlns:D="DAV:"><D:prop>'
    "<D:resourcetype/><D:getcontentlength/><D:getlastmodified/><D:getetag/>"
    "</D:prop></D:propfind>"
)
_DAV = "{DAV:}"


def error_for_status(url: str, status: int, detail: str = "") -> StorageError:
    """The storage error for an unexpected HTTP status on `url`."""
    reason = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status in (404, 410):
        return NotFound(url, reason)
    if status in (401, 403):
        return PermissionDenied(url, reason)
    if status in (405, 501):
        return Unsupported(url, reason)
    if status == 416:
        return Corrupt(url, reason + " (range beyond the end of the object)")
    if status >= 500 or status in (408, 429):
        return Unavailable(url, reason)
    # any other 4xx (400 for a path the server will not take, 409, 412, 413...): the
    # server refused this request, and sending it again would not change that
    return PermissionDenied(url, reason)


def parse_digest(header: str) -> dict[str, str]:
    """`Digest:` header -> {algorithm: hex}."""
    return checksums.from_digest_header(header)


def _etag(value: str | None) -> str | None:
    if not value:
        return None
    # Quotes are syntax, not part of a strong tag; weak tags keep their W/ marker.
    return value if value.startswith("W/") else value.strip('"')


def _check_version(url: str, response: aiohttp.ClientResponse, tag: str | None) -> None:
    """Changed unless `response` is of the version whose strong ETag is `tag` (None:
    any version). Also checked after If-Match, since some servers ignore it."""
    if tag is None:
        return
    if response.status == 412:
        raise Changed(url, f"HTTP 412: the object no longer has ETag {tag}")
    sent = _etag(response.headers.get("ETag"))
    if response.status in (200, 206) and sent is not None and sent != tag:
        raise Changed(url, f"asked for ETag {tag}, the server sent {sent}")


def _http_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _verbatim_paths(response: aiohttp.ClientResponse) -> bool:
    """XrdHttp (5.5) neither percent-encodes PROPFIND hrefs nor decodes the MOVE
    Destination: with it, names must travel as they are, or "a b" comes back as
    "a%20b" and "x%41" as "xA". Every other server gets RFC 4918 URIs."""
    return response.headers.get("Server", "").startswith("XrootD/")


def _href_path(href: str, verbatim: bool) -> str:
    if not verbatim:
        return unquote(urlsplit(href).path)
    # Not urlsplit: a raw '#' or '?' in a name is part of the name here.
    if "://" in href:
        href = "/" + href.split("://", 1)[1].partition("/")[2]
    return href


class _Exchange:
    """One request whose transport failures become storage errors naming the URL."""

    def __init__(
        self, storage: HTTPStorage, method: str, url: str, report_as: str, **kwargs: Any
    ) -> None:
        self.storage = storage
        self.method = method
        self.url = url
        # Errors name the object the caller asked about, not a temp or collection URL.
        self.report_as = report_as
        self.kwargs = kwargs
        self.response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        session = self.storage._get_session()
        headers = {**self.storage._headers, **self.kwargs.pop("headers", {})}
        try:
            self.response = await session.request(
                self.method,
                URL(self.url, encoded=True),
                headers=headers,
                ssl=self.storage._ssl,
                # Per request, so that it also holds on a session the caller passed in.
                timeout=self.storage._timeout,
                **self.kwargs,
            )
        except aiohttp.ClientError as exc:
            raise transport_error(self.report_as, exc) from exc
        except TimeoutError as exc:
            raise Unavailable(self.report_as, f"{self.method} timed out") from exc
        return self.response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.response is not None:
            self.response.release()


def transport_error(url: str, exc: BaseException) -> StorageError:
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Corrupt(url, f"response body ended early: {exc}")
    if isinstance(exc, TimeoutError):
        return Unavailable(url, "timed out")
    return Unavailable(url, f"{type(exc).__name__}: {exc}")


async def _detail(response: aiohttp.ClientResponse) -> str:
    """A short piece of the error body: servers often say there what went wrong."""
    try:
        text = (await response.content.read(300)).decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError):
        return response.reason or ""
    return " ".join(text.split()) or (response.reason or "")


class HTTPStorage(Storage):
    """http(s):// URL prefix; objects are URLs below it."""

    scheme = "http"
    conditional_reads = True

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30,
        ssl: ssl_module.SSLContext | bool | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(url)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url}: not an http(s):// URL")
        self._base = str(URL(self.url))
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._base_path = unquote(parts.path).rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        # No total limit: a large object may legitimately take long; stalls are caught
        # by the connect and per-read limits.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=timeout
        )
        self._ssl: ssl_module.SSLContext | bool = True if ssl is None else ssl
        self._session = session
        self._owns_session = session is None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._owns_session = True
        return self._session

    def _location(self, path: str) -> str:
        """The request URL of `path`: percent-encoded here, so that a name containing
        '%', '#' or '?' reaches the server as that name."""
        path = self.inside(path)
        return f"{self._base}/{quote(path)}" if path else self._base + "/"

    def _request(
        self, method: str, path: str, *, report_as: str | None = None, **kwargs: Any
    ) -> _Exchange:
        location = self._location(path)
        return _Exchange(self, method, location, report_as or self.url_of(path), **kwargs)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def _head(
        self, path: str, headers: dict[str, str] | None = None, *, tag: str | None = None
    ) -> ObjectInfo:
        url = self.url_of(path)
        headers = {**(headers or {}), **({"If-Match": f'"{tag}"'} if tag else {})}
        async with self._request("HEAD", path, headers=headers, allow_redirects=True) as r:
            _check_version(url, r, tag)
            if r.status != 200:
                raise error_for_status(url, r.status, r.reason or "")
            length = r.headers.get("Content-Length")
            if length is None:
                raise StorageError(url, "the server gave no Content-Length for HEAD")
            return ObjectInfo(
                path=path,
                size=int(length),
                mtime=_http_time(r.headers.get("Last-Modified")),
                etag=_etag(r.headers.get("ETag")),
                checksums=parse_digest(r.headers.get("Digest", "")),
            )

    async def stat(self, path: str) -> ObjectInfo:
        return await self._head(path)

    async def stream(
        self,
        path: str,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        *,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        check_range(offset, length, chunk_size)
        url = self.url_of(path)
        tag = strong_etag(if_match)
        if length is None and offset > 0:
            # An open-ended range ("bytes=N-") is answered with an empty body by XrdHttp
            # 5.5: ask for an explicit range instead, which every server handles.
            size = (await self._head(path, tag=tag)).size
            length = max(size - offset, 0)
        if length == 0:
            return
        headers = {"If-Match": f'"{tag}"'} if tag else {}
        if length is not None:
            headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        async with self._request("GET", path, headers=headers) as response:
            _check_version(url, response, tag)
            expected = await self._check_range(url, response, offset, length)
            received = 0
            try:
                async for chunk in response.content.iter_chunked(chunk_size):
                    if received + len(chunk) > expected:
                        # A 200 for the whole object when we asked for its first bytes.
                        chunk = chunk[: expected - received]
                    received += len(chunk)
                    if chunk:
                        yield chunk
                    if received >= expected:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise transport_error(url, exc) from exc
            if received < expected:
                raise Corrupt(
                    url, f"short read: got {received} of {expected} bytes from offset {offset}"
                )

    @staticmethod
    async def _check_range(
        url: str, response: aiohttp.ClientResponse, offset: int, length: int | None
    ) -> int:
        """How many body bytes to expect, after checking the server sent what we asked."""
        if response.status == 200:
            if offset != 0:
                raise Unsupported(url, "the server ignored the Range header")
            declared = response.content_length
            if length is None:
                if declared is None:
                    raise StorageError(url, "the server gave no Content-Length")
                return declared
            if declared is not None and declared < length:
                raise Corrupt(url, f"object has {declared} bytes, fewer than the {length} asked")
            return length
        if response.status == 206:
            assert length is not None  # we only send Range with a length
            header = response.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.fullmatch(header.strip())
            last = offset + length - 1
            if not match:
                raise Corrupt(url, f"206 without a usable Content-Range ({header!r})")
            start, end, total = int(match[1]), int(match[2]), match[3]
            if total != "*" and end >= int(total):
                raise Corrupt(url, f"range {offset}-{last} goes beyond the object's {total} bytes")
            if (start, end) != (offset, last):
                raise Corrupt(url, f"asked for bytes {offset}-{last}, server sent {header!r}")
            return length
        raise error_for_status(url, response.status, await _detail(response))

    async def write(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        url = self.url_of(self.inside(path))  # the MOVE destination is built from it too
        if not path:
            raise PermissionDenied(url, "cannot write over the storage root")
        directory, _, name = path.rpartition("/")
        temp_name = f".{name}{TEMP_MARKER}{secrets.token_hex(6)}"
        temp = f"{directory}/{temp_name}" if directory else temp_name
        source_error: BaseException | None = None

        async def body(source: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
            # Remembers the caller's own error: aiohttp may wrap it in a ClientError,
            # and it must reach the caller as it was, not as "server unavailable".
            nonlocal source_error
            try:
                async for chunk in source:
                    # An empty chunk would be sent as the chunked-encoding terminator.
                    if chunk:
                        yield chunk
            except BaseException as exc:
                source_error = exc
                raise

        payload: bytes | AsyncIterator[bytes]
        if isinstance(data, bytes | bytearray | memoryview):
            payload = bytes(data)
        else:
            payload = body(data)
        committed = False
        try:
            try:
                async with self._request("PUT", temp, report_as=url, data=payload) as r:
                    if r.status not in (200, 201, 204):
                        raise error_for_status(url, r.status, await _detail(r))
                    verbatim = _verbatim_paths(r)
            except StorageError:
                if source_error is not None:
                    raise source_error from None
                raise
            if verbatim:
                # The trailing '?' (an empty query, which XRootD strips) shields the
                # name from XrdHttp's trimming of the header value, which also eats a
                # final non-ASCII character ("ünï" would become "ün").
                destination = f"{self._origin}{self._base_path}/{path}?"
            else:
                destination = self._location(path)
            move_headers = {"Destination": destination, "Overwrite": "T"}
            async with self._request("MOVE", temp, report_as=url, headers=move_headers) as r:
                if r.status in (405, 501):
                    raise Unsupported(
                        url, f"the server does not support WebDAV MOVE (HTTP {r.status}), "
                        "needed for atomic writes"
                    )
                if r.status not in (200, 201, 204):
                    raise error_for_status(url, r.status, await _detail(r))
            committed = True
        finally:
            if not committed:
                await self._discard(temp)
        return await self._head(path)

    async def _discard(self, temp: str) -> None:
        """Best effort: the upload failed and the server may hold a partial temp file."""
        try:
            # shield: this cleanup must finish even if the write is being cancelled.
            await asyncio.shield(self._delete_quietly(temp))
        except (StorageError, asyncio.CancelledError):
            pass

    async def _delete_quietly(self, path: str) -> None:
        async with self._request("DELETE", path):
            pass

    async def delete(self, path: str) -> None:
        url = self.url_of(path)
        async with self._request("DELETE", path) as r:
            if r.status not in (200, 202, 204):
                raise error_for_status(url, r.status, await _detail(r))

    async def list(self, path: str = "") -> list[ObjectInfo]:
        path = path.strip("/")
        url = self.url_of(path)
        headers = {"Depth": "1", "Content-Type": "application/xml"}
        # Collections are named with a trailing slash.
        collection = f"{path}/" if path else ""
        async with self._request(
            "PROPFIND", collection, report_as=url, headers=headers, data=_PROPFIND_BODY
        ) as r:
            if r.status != 207:
                raise error_for_status(url, r.status, await _detail(r))
            try:
                document = await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise transport_error(url, exc) from exc
        try:
            root = ET.fromstring(document)
        except ET.ParseError as exc:
            raise StorageError(url, f"unreadable PROPFIND answer: {exc}") from exc
        verbatim = _verbatim_paths(r)
        out = [
            info
            for node in root.iter(f"{_DAV}response")
            if (info := self._entry(node, path, verbatim))
        ]
        out.sort(key=lambda info: info.path)
        return out

    def _entry(self, node: ET.Element, directory: str, verbatim: bool) -> ObjectInfo | None:
        href = node.findtext(f"{_DAV}href")
        if not href:
            return None
        full = _href_path(href.strip(), verbatim).rstrip("/")
        prefix = f"{self._base_path}/{directory}/" if directory else f"{self._base_path}/"
        if not full.startswith(prefix):
            return None  # the collection itself, or something the server should not send
        name = full[len(prefix) :]
        if not name or "/" in name or TEMP_MARKER in name:
            return None
        prop: ET.Element | None = None
        for propstat in node.iter(f"{_DAV}propstat"):
            status = propstat.findtext(f"{_DAV}status") or ""
            if " 200 " in f"{status} ":
                prop = propstat.find(f"{_DAV}prop")
                break
        if prop is None:
            return None
        resourcetype = prop.find(f"{_DAV}resourcetype")
        is_dir = resourcetype is not None and resourcetype.find(f"{_DAV}collection") is not None
        length = prop.findtext(f"{_DAV}getcontentlength")
        return ObjectInfo(
            path=f"{directory}/{name}" if directory else name,
            size=0 if is_dir or not length else int(length),
            mtime=_http_time(prop.findtext(f"{_DAV}getlastmodified")),
            etag=None if is_dir else _etag(prop.findtext(f"{_DAV}getetag")),
            is_dir=is_dir,
        )

    async def checksum(self, path: str, algorithm: str, *, if_match: str | None = None) -> str:
        tag = strong_etag(if_match)
        if tag is not None and algorithm in checksums.ALGORITHMS:
            # The digest of a HEAD that still has the tag is that version's: no need to
            # read the object.
            known = await self._digest(path, algorithm, tag)
            if known is not None:
                return known
        return await super().checksum(path, algorithm, if_match=if_match)

    async def server_checksum(self, path: str, algorithm: str) -> str | None:
        return await self._digest(path, algorithm)

    async def _digest(self, path: str, algorithm: str, tag: str | None = None) -> str | None:
        info = await self._head(path, {"Want-Digest": checksums.http_name(algorithm)}, tag=tag)
        # Servers may answer with another algorithm (XrdHttp gives adler32 for sha-256)
        # or none at all: then there is no server-side checksum.
        return info.checksums.get(algorithm)
