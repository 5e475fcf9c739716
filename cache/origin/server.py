"""The origin server: any storage backend exported under a namespace over HTTP(S).

Reads (GET/HEAD with ranges, ETag, Last-Modified, RFC 3230 digests; PROPFIND listings)
and writes (PUT, DELETE, MKCOL, MOVE) map onto the Storage interface. Every write goes
through Storage.write, which is atomic, with the request body streamed into it: a
failed, truncated or checksum-mismatched upload makes the body iterator raise before it
ends, so the backend discards its temporary object and the name never appears.

Reads of public exports need no token; everything else needs a WLCG token whose scope
covers the path (read: storage.read; new object: storage.create or storage.modify;
overwrite, delete: storage.modify; rename: storage.modify, or storage.create when the
destination does not exist, as the WLCG profile allows).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from stashflow.cache import validators
from stashflow.cache.namespace import BadPath, clean_path
from stashflow.cache.origin import backend, webdav
from stashflow.cache.ranges import RangeError, Unsatisfiable, multipart_layout, parse_range
from stashflow.integration.checksums import (
    Hasher,
    from_digest_header,
    parse_want_digest,
    to_digest_header,
)
from stashflow.integration.storage import (
    AlreadyExists,
    Changed,
    Corrupt,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    Storage,
    StorageError,
    Unavailable,
    Unsupported,
    open_storage,
)
from stashflow.integration.storage.base import STALE_TEMP_AGE
from stashflow.integration.storage.http import TEMP_MARKER
from stashflow.integration.tokens import (
    Issuer,
    MissingToken,
    Token,
    TokenError,
    TokenVerifier,
    WrongIssuer,
    bearer_token,
    key_source,
)

log = logging.getLogger("stashflow.origin")
CHUNK = 1 << 20
CONTENT_TYPE = "application/octet-stream"
ALLOW = "OPTIONS, GET, HEAD, PROPFIND, PUT, DELETE, MKCOL, MOVE"
REALM = "stashflow-origin"
# What this origin exports and which token issuers (with their base paths) it trusts,
# as JSON: the director reads it to advertise the base path that tokens for a namespace
# must be relative to (X-Pelican-Token-Generation), so that it matches what we enforce.
DECLARATION_PATH = "/.well-known/stashflow-origin"
# Versions of one object a GET tries when each is replaced before its first byte is
# read (conditional reads, backend._Tagged); an object changing faster gets a 503.
VERSION_ATTEMPTS = 3


def error(status: int, message: str, **fields: Any) -> web.Response:
    headers = fields.pop("headers", None)
    body = json.dumps({"error": message, "status": status, **fields})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


@dataclass
class Export:
    """A namespace prefix ("/ns") and the storage behind it."""

    prefix: str
    url: str
    storage: Storage
    public: bool = False

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if rel else self.prefix


@dataclass
class Target:
    export: Export
    key: str  # "/ns/dir/file", validated
    rel: str  # "dir/file" below the export's storage root ("" = the export itself)


_UPLOAD_TEMP = re.compile(r"\.[^/]+" + re.escape(TEMP_MARKER) + r"[0-9a-f]{6,32}")


def _is_upload_temp(key: str) -> bool:
    """Whether `key` names the temporary object of an atomic write by our http storage
    adapter (".<name>.stashflow-tmp-<hex>", PUT then MOVEd into place). A client with
    only storage.create may delete such an object: when its MOVE is refused (the target
    exists and overwriting needs storage.modify), removing its own uncommitted upload
    is cleanup, not destruction of stored data, and otherwise it would stay behind."""
    return _UPLOAD_TEMP.fullmatch(key.rpartition("/")[2]) is not None


class _Refused(Exception):
    """Ends a request with an error response (raised from deep inside a handler)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class UploadRefused(Exception):
    """The upload body is unusable (short, too long, checksum mismatch): raised from
    inside the body iterator so that the storage write aborts and stores nothing."""


def _etag(info: ObjectInfo) -> str:
    return validators.etag(info.size, info.mtime, info.etag)


def _storage_error(key: str, exc: StorageError) -> web.Response:
    if isinstance(exc, backend.Exists):
        return error(405, f"{key} already exists", path=key)
    if isinstance(exc, AlreadyExists):
        return error(409, f"{key} already exists", path=key)
    if isinstance(exc, backend.Conflict):
        return error(409, f"{key}: {exc.reason}", path=key)
    if isinstance(exc, NotFound):
        return error(404, f"{key} not found", path=key, cause=exc.reason)
    if isinstance(exc, PermissionDenied):
        return error(403, f"the storage refused access to {key}: {exc.reason}", path=key)
    if isinstance(exc, Unavailable):
        return error(503, f"the storage of {key} is unavailable: {exc.reason}", path=key)
    if isinstance(exc, Unsupported):
        return error(501, f"{key}: {exc.reason}", path=key)
    if isinstance(exc, Corrupt):
        return error(502, f"the storage returned bad data for {key}: {exc.reason}", path=key)
    return error(502, f"the storage failed for {key}: {exc.reason}", path=key)


def _token_refusal(exc: TokenError, key: str) -> web.Response:
    """401/403/503 with RFC 6750's WWW-Authenticate, naming the failed check."""
    if isinstance(exc, MissingToken):
        challenge = f'Bearer realm="{REALM}"'
    else:
        code = "insufficient_scope" if exc.status == 403 else "invalid_token"
        # Quotes would end the quoted-string early; the JSON body has the full message.
        # Header values must be printable ASCII (claims quoted in the message are
        # already made so, but this header must never be the place that breaks).
        description = "".join(
            c if " " <= c <= "~" and c not in '"\\' else "'" for c in exc.message[:300]
        )
        challenge = f'Bearer realm="{REALM}", error="{code}", error_description="{description}"'
    headers = {"WWW-Authenticate": challenge} if exc.status in (401, 403) else None
    return error(exc.status, exc.message, reason=exc.reason, path=key, headers=headers)


class Origin:
    """Request handling for a set of exports."""

    def __init__(self, exports: list[Export], verifier: TokenVerifier | None) -> None:
        # Longest prefix first, so that /ns/sub wins over /ns.
        self.exports = sorted(exports, key=lambda e: len(e.prefix), reverse=True)
        self.verifier = verifier
        self._checksums: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._methods: dict[str, Callable[[web.Request, Target], Awaitable[web.StreamResponse]]]
        self._methods = {
            "GET": self.get,
            "HEAD": self.get,
            "PROPFIND": self.propfind,
            "PUT": self.put,
            "DELETE": self.delete,
            "MKCOL": self.mkcol,
            "MOVE": self.move,
        }

    async def close(self) -> None:
        for export in self.exports:
            await export.storage.close()
        if self.verifier is not None:
            await self.verifier.close()

    # -- dispatch ------------------------------------------------------------------------

    def declaration(self) -> dict[str, Any]:
        """The public facts a director needs: exports and trusted issuers."""
        issuers = self.verifier.issuers.values() if self.verifier is not None else ()
        return {
            "exports": [{"prefix": e.prefix, "public": e.public} for e in self.exports],
            "issuers": [{"issuer": i.issuer, "base_path": i.base_path} for i in issuers],
        }

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": ALLOW, "DAV": "1"})
        if request.path == DECLARATION_PATH and request.method in ("GET", "HEAD"):
            return web.json_response(self.declaration())
        method = self._methods.get(request.method)
        if method is None:
            return error(405, f"method {request.method} is not supported", headers={"Allow": ALLOW})
        try:
            target = self.resolve(request.raw_path.partition("?")[0], request.path)
        except _Refused as e:
            return e.response
        try:
            return await method(request, target)
        except _Refused as e:
            return e.response
        except TokenError as e:
            return _token_refusal(e, target.key)
        except StorageError as e:
            return _storage_error(target.key, e)

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse an upload before its body is sent when the
        path or the token already rule it out, so that a client with a bad token does
        not push gigabytes only to be told 401."""
        if request.headers.get("Expect", "").strip().lower() != "100-continue":
            return error(417, "only 'Expect: 100-continue' is understood")
        if request.method == "PUT":
            try:
                target = self.resolve(request.raw_path.partition("?")[0], request.path)
                token = await self.authenticate(request, target)
                token.require("create", target.key)
            except _Refused as e:
                return e.response
            except TokenError as e:
                return _token_refusal(e, target.key)
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    def resolve(self, raw: str, decoded: str) -> Target:
        # A collection may be named with a trailing '/' (PROPFIND dir/, MKCOL dir/);
        # clean_path refuses one, since for objects it means a directory.
        if len(decoded) > 1 and decoded.endswith("/"):
            raw, decoded = raw[:-1], decoded[:-1]
        try:
            key = clean_path(raw, decoded)
        except BadPath as e:
            raise _Refused(error(400, f"bad path: {e}")) from None
        for export in self.exports:
            if key == export.prefix or key.startswith(export.prefix + "/"):
                return Target(export, key, key[len(export.prefix) :].lstrip("/"))
        raise _Refused(error(404, f"no export serves {key}", path=key))

    # -- authorisation -------------------------------------------------------------------

    async def authenticate(self, request: web.Request, target: Target) -> Token:
        """The verified token of the request (TokenError if there is none or it is bad)."""
        raw = bearer_token(request.headers.get("Authorization"))
        if raw is None:
            # XRootD and Pelican clients may pass the token as ?authz=Bearer%20<jwt>.
            authz = request.query.get("authz")
            if authz:
                raw = bearer_token(authz) or authz.strip() or None
        if raw is None:
            raise MissingToken(f"{target.key} needs a bearer token (Authorization: Bearer ...)")
        if self.verifier is None or not self.verifier.issuers:
            raise WrongIssuer(
                "this origin trusts no token issuer (it was started without --issuer)"
            )
        token = await self.verifier.verify(raw)
        request["subject"] = token.subject
        return token

    async def authorize_read(self, request: web.Request, target: Target) -> None:
        if target.export.public:
            return  # public data: a token, even a bad one, is neither needed nor checked
        token = await self.authenticate(request, target)
        token.require("read", target.key)

    # -- reads ---------------------------------------------------------------------------

    async def _stat(self, target: Target) -> ObjectInfo:
        if not target.rel:
            return ObjectInfo(path="", size=0, is_dir=True)
        return await target.export.storage.stat(target.rel)

    async def _checksum(
        self, target: Target, version: backend.Version, etag: str, algo: str
    ) -> str:
        known = version.info.checksums.get(algo)
        if known:
            return known
        cache_key = (target.key, etag, algo)
        value = self._checksums.get(cache_key)
        if value is None:
            # Computing may mean reading the whole object: remember it per version.
            value = await version.checksum(algo)
            self._checksums[cache_key] = value
            if len(self._checksums) > 4096:
                self._checksums.popitem(last=False)
        else:
            self._checksums.move_to_end(cache_key)
        return value

    async def get(self, request: web.Request, target: Target) -> web.StreamResponse:
        await self.authorize_read(request, target)
        if not target.rel:
            return self._collection(target)
        # Headers and body from one version: the object may be replaced while we answer.
        for _ in range(VERSION_ATTEMPTS):
            version = await backend.open_version(target.export.storage, target.rel)
            try:
                if version.info.is_dir:
                    return self._collection(target)
                return await self._get(request, target, version)
            except Changed as e:
                # Only before the headers: after them _send cuts the connection instead.
                log.info("%s was replaced before its first byte was sent (%s); again",
                         target.key, e.reason)  # fmt: skip
            finally:
                version.close()
        return error(
            503,
            f"{target.key} was replaced {VERSION_ATTEMPTS} times while being read; try again",
            path=target.key,
            headers={"Retry-After": "1"},
        )

    @staticmethod
    def _collection(target: Target) -> web.Response:
        return error(400, f"{target.key} is a collection: list it with PROPFIND", path=target.key)

    async def _get(
        self, request: web.Request, target: Target, version: backend.Version
    ) -> web.StreamResponse:
        info = version.info
        etag = _etag(info)
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": CONTENT_TYPE}
        if info.mtime is not None:
            headers["Last-Modified"] = validators.http_date(info.mtime)
        if validators.precondition_failed(request.headers, etag, info.mtime):
            return error(412, f"{target.key} is no longer the version asked for", path=target.key,
                         headers={"ETag": etag})  # fmt: skip
        if validators.not_modified(request.headers, etag, info.mtime):
            return web.Response(status=304, headers=headers)

        ranges: list[tuple[int, int]] | None = None
        header = request.headers.get("Range")
        if header is not None and validators.range_applies(request.headers, etag, info.mtime):
            try:
                ranges = parse_range(header, info.size)
            except RangeError as e:
                return error(400, str(e), path=target.key)
            except Unsatisfiable as e:
                return error(
                    416, str(e), path=target.key, headers={"Content-Range": f"bytes */{info.size}"}
                )

        want = request.headers.get("Want-Digest")
        if want:
            for algo in parse_want_digest(want):
                try:
                    value = await self._checksum(target, version, etag, algo)
                except Changed:
                    raise  # a digest of this version no longer can be had: the next one
                except (StorageError, ValueError) as e:
                    log.warning("checksum %s of %s failed: %s", algo, target.key, e)
                    continue
                headers["Digest"] = to_digest_header(algo, value)
                break

        heads: list[bytes] = []
        tail = b""
        if ranges is None:
            status, length = 200, info.size
            spans = [(0, info.size - 1)] if info.size else []
        elif len(ranges) == 1:
            status, spans = 206, ranges
            length = ranges[0][1] - ranges[0][0] + 1
            headers["Content-Range"] = f"bytes {ranges[0][0]}-{ranges[0][1]}/{info.size}"
        else:
            status, spans = 206, ranges
            boundary, heads, tail, length = multipart_layout(ranges, info.size, CONTENT_TYPE)
            headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        if request.method == "HEAD":
            headers["Content-Length"] = str(length)
            return web.Response(status=status, headers=headers)
        return await self._send(request, target, version, status, headers, length, spans,
                                heads, tail)  # fmt: skip

    async def _send(
        self,
        request: web.Request,
        target: Target,
        version: backend.Version,
        status: int,
        headers: dict[str, str],
        length: int,
        spans: list[tuple[int, int]],
        heads: list[bytes],
        tail: bytes,
    ) -> web.StreamResponse:

        async def body() -> AsyncGenerator[bytes, None]:
            for i, (first, last) in enumerate(spans):
                head = heads[i] if heads else b""
                async for chunk in version.stream(first, last - first + 1, CHUNK):
                    if head:
                        # After the range's first read: so that the first read of all
                        # happens before the status goes out (see below).
                        yield head
                        head = b""
                    yield chunk
            if tail:
                yield tail

        parts = body()
        try:
            # The first bytes are read before the status goes out, so that a missing
            # object, a dead backend or a version replaced since (Changed: answered
            # again from the new one) still gets a clean response.
            try:
                first = await anext(parts)
            except StopAsyncIteration:
                first = b""
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = length
            await resp.prepare(request)
            try:
                await resp.write(first)
                async for chunk in parts:
                    await resp.write(chunk)
            except StorageError as e:
                # Headers are gone: cutting the connection is the only way left to tell
                # the client its body is incomplete (it sees fewer bytes than promised).
                log.error("aborting GET %s after the headers: %s", target.key, e)
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError(str(e)) from None
            await resp.write_eof()
            return resp
        finally:
            await parts.aclose()

    async def propfind(self, request: web.Request, target: Target) -> web.StreamResponse:
        depth = request.headers.get("Depth", "infinity").strip().lower()
        if depth not in ("0", "1"):
            if depth != "infinity":
                return error(400, f"Depth must be 0, 1 or infinity, not {depth!r}")
            # RFC 4918 section 9.1: a server may refuse infinite depth with 403 and
            # this precondition; walking a whole export would be unbounded work.
            return web.Response(
                status=403,
                body=webdav.finite_depth_error(),
                content_type="application/xml",
                charset="utf-8",
            )
        if (request.content_length or 0) > webdav.MAX_BODY:
            return error(413, f"PROPFIND body larger than {webdav.MAX_BODY} bytes")
        try:
            props = webdav.parse_propfind(await request.read())
        except webdav.BadPropfind as e:
            return error(400, str(e), path=target.key)
        await self.authorize_read(request, target)
        info = await self._stat(target)
        resources = [self._resource(target.export, target.key, info)]
        if depth == "1" and info.is_dir:
            try:
                children = await target.export.storage.list(target.rel)
            except NotFound:
                children = []  # an S3 directory that exists only as a marker: empty
            resources += [
                self._resource(target.export, target.export.key(child.path), child)
                for child in children
            ]
        return web.Response(
            status=207,
            body=webdav.multistatus(resources, props),
            content_type="application/xml",
            charset="utf-8",
        )

    @staticmethod
    def _resource(export: Export, key: str, info: ObjectInfo) -> webdav.Resource:
        return webdav.Resource(
            path=key,
            is_collection=info.is_dir,
            size=info.size,
            mtime=info.mtime,
            etag=None if info.is_dir else _etag(info),
        )

    # -- writes --------------------------------------------------------------------------

    async def _exists(self, target: Target) -> ObjectInfo | None:
        try:
            return await self._stat(target)
        except NotFound:
            return None

    async def put(self, request: web.Request, target: Target) -> web.StreamResponse:
        if not target.rel:
            return error(405, f"{target.key} is an export root, not an object", path=target.key)
        if "Content-Range" in request.headers:
            # RFC 9110 section 14.5: a server that does not do partial PUT must say so.
            return error(400, "partial PUT (Content-Range) is not supported", path=target.key)
        expected: dict[str, str] = {}
        if "Digest" in request.headers:
            expected = from_digest_header(request.headers["Digest"])
            if not expected:
                return error(
                    400,
                    "the Digest header names no supported algorithm (adler32, md5, crc32c, "
                    "sha-256) or is malformed",
                    path=target.key,
                )
        token = await self.authenticate(request, target)
        token.require("create", target.key)  # nothing at all without create or modify
        existing = await self._exists(target)
        if existing is not None:
            if existing.is_dir:
                return error(409, f"{target.key} is a collection", path=target.key)
            token.require("modify", target.key)  # overwriting is a modification

        length = request.content_length
        source = self._upload(request, target.key, length, expected)
        storage = target.export.storage
        # The check above is long past when a big upload commits: without
        # storage.modify, commit only if the name is still free, so that an object
        # someone else created meanwhile is not replaced.
        may_replace = token.allows("modify", target.key)
        try:
            if may_replace:
                info = await storage.write(target.rel, source)
            else:
                info = await storage.create(target.rel, source)
        except UploadRefused as e:
            return error(400, f"{e} - nothing was stored", path=target.key)
        except AlreadyExists:
            return error(
                403,
                f"{target.key} was created by someone else during this upload and replacing "
                "it needs storage.modify - nothing was stored",
                path=target.key,
                reason="exists",
            )
        log.info("stored %s (%d bytes)", target.key, info.size)
        headers = {"ETag": _etag(info)}
        if existing is not None:
            return web.Response(status=204, headers=headers)
        body = json.dumps({"path": target.key, "size": info.size, "status": 201})
        return web.Response(status=201, text=body, content_type="application/json", headers=headers)

    @staticmethod
    async def _upload(
        request: web.Request, key: str, length: int | None, expected: dict[str, str]
    ) -> AsyncIterator[bytes]:
        """The request body, checked. Every check fails by raising before the last
        byte is handed over, which makes Storage.write abort instead of commit."""
        hashers = {algo: Hasher(algo) for algo in expected}
        received = 0
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                received += len(chunk)
                if length is not None and received > length:
                    raise UploadRefused(f"upload of {key} is longer than its Content-Length")
                for hasher in hashers.values():
                    hasher.update(chunk)
                yield chunk
        except UploadRefused:
            raise
        except Exception as e:
            # aiohttp reports a body cut short (connection lost, bad chunked encoding,
            # Content-Length not reached) as one of several exception types.
            raise UploadRefused(
                f"upload of {key} was cut short after {received} bytes ({type(e).__name__})"
            ) from None
        if length is not None and received != length:
            raise UploadRefused(f"upload of {key} truncated: received {received} of {length} bytes")
        for algo, hasher in hashers.items():
            actual = hasher.hexdigest()
            if actual != expected[algo]:
                raise UploadRefused(
                    f"upload of {key} does not match its Digest: client said "
                    f"{to_digest_header(algo, expected[algo])}, received data has "
                    f"{to_digest_header(algo, actual)}"
                )

    async def delete(self, request: web.Request, target: Target) -> web.StreamResponse:
        if not target.rel:
            return error(405, f"{target.key} is an export root", path=target.key)
        token = await self.authenticate(request, target)
        if not (_is_upload_temp(target.key) and token.allows("create", target.key)):
            token.require("modify", target.key)
        info = await self._stat(target)
        if info.is_dir:
            await backend.remove_collection(target.export.storage, target.rel)
        else:
            await target.export.storage.delete(target.rel)
        return web.Response(status=204)

    async def mkcol(self, request: web.Request, target: Target) -> web.StreamResponse:
        if request.body_exists and (request.content_length or 0) > 0:
            return error(415, "MKCOL with a body is not supported", path=target.key)
        token = await self.authenticate(request, target)
        token.require("create", target.key)
        if not target.rel or await self._exists(target) is not None:
            return error(405, f"{target.key} already exists", path=target.key)
        await backend.make_collection(target.export.storage, target.rel)
        return web.Response(status=201)

    async def move(self, request: web.Request, target: Target) -> web.StreamResponse:
        destination = request.headers.get("Destination")
        if not destination:
            return error(400, "MOVE needs a Destination header", path=target.key)
        parts = urlsplit(destination)
        try:
            dest = self.resolve(parts.path, unquote(parts.path))
        except _Refused as e:
            if e.response.status == 404:
                return error(
                    502, f"MOVE destination {parts.path} is not on this origin", path=target.key
                )
            return e.response
        if dest.export is not target.export:
            return error(
                502,
                f"MOVE from {target.export.prefix} to {dest.export.prefix}: "
                "moves across exports are not supported",
                path=target.key,
            )
        if dest.key == target.key:
            return error(403, "MOVE source and destination are the same", path=target.key)
        if not target.rel or not dest.rel:
            return error(403, "an export root cannot be moved or replaced", path=target.key)
        # RFC 4918 section 10.6: Overwrite is "T" or "F", and absent means "T". Anything
        # else is refused rather than guessed: "Overwrite: false" taken as T would
        # replace exactly what its sender meant to keep.
        flag = request.headers.get("Overwrite", "T").strip().upper()
        if flag not in ("T", "F"):
            return error(
                400, f"the Overwrite header must be T or F, not {flag[:20]!r}", path=target.key
            )
        overwrite = flag == "T"
        token = await self.authenticate(request, target)
        # Scope checks before any stat: a token without rights here learns nothing.
        # Renaming with storage.create alone is what the WLCG profile allows ("renaming
        # files if the destination file does not already exist"): the source needs
        # create or modify, the destination at least create.
        if not token.allows("modify", target.key):
            token.require("create", target.key)
        token.require("create", dest.key)
        if await self._exists(target) is None:
            return error(404, f"{target.key} not found", path=target.key)
        replaced = await self._exists(dest)
        if replaced is not None:
            if not overwrite:
                return error(412, f"{dest.key} exists and Overwrite is F", path=dest.key)
            token.require("modify", dest.key)  # replacing is a modification
            token.require("modify", target.key)  # create-only renames must not replace
        # The check above is not the end of it: the destination may be created between
        # it and the rename (or, on backends that copy, during a long copy). Unless the
        # request may replace, the rename itself refuses a taken name and the source
        # stays as it was, as PUT commits with Storage.create for the same reason.
        may_replace = (
            overwrite and token.allows("modify", dest.key) and token.allows("modify", target.key)
        )
        try:
            await backend.move(target.export.storage, target.rel, dest.rel, replace=may_replace)
        except AlreadyExists:
            if not overwrite:
                return error(412, f"{dest.key} exists and Overwrite is F", path=dest.key)
            return error(
                403,
                f"{dest.key} was created by someone else during this MOVE and replacing it "
                f"needs storage.modify - {target.key} was not moved",
                path=dest.key,
                reason="exists",
            )
        log.info("moved %s to %s", target.key, dest.key)
        return web.Response(status=204 if replaced is not None else 201)


class AccessLogger(AbstractAccessLogger):
    """One JSON object per request. Never headers or the query string: both can carry
    bearer tokens. The token's subject is logged instead, for auditing."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time_: float) -> None:
        self.logger.info(
            json.dumps(
                {
                    "ts": round(time.time(), 3),
                    "peer": request.remote,
                    "method": request.method,
                    "path": request.path,
                    "range": request.headers.get("Range"),
                    "status": response.status,
                    "bytes": response.body_length,
                    "sub": request.get("subject"),
                    "seconds": round(time_, 6),
                }
            )
        )


@dataclass
class OriginConfig:
    listen: str
    exports: dict[str, str]
    public: set[str] = field(default_factory=set)  # export prefixes readable without token
    issuers: dict[str, str | None] = field(default_factory=dict)  # iss -> JWKS (None: discover)
    # iss -> the path its scope paths are relative to; "/" (absolute scopes) when absent
    base_paths: dict[str, str] = field(default_factory=dict)
    audiences: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    access_log: str | None = "-"
    jwks_ttl: float = 600.0
    jwks_min_refresh: float = 30.0
    leeway: float = 60.0
    stale_upload_age: float = STALE_TEMP_AGE  # seconds; see sweep_stale_uploads

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"invalid listen address {self.listen!r}: use HOST:PORT")
        return host.strip("[]"), int(port)

    @property
    def base_url(self) -> str:
        host, port = self.host_port
        scheme = "https" if self.tls_cert else "http"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{port}"


def build_exports(cfg: OriginConfig) -> list[Export]:
    exports = []
    for prefix, url in cfg.exports.items():
        norm = "/" + prefix.strip("/")
        if norm == "/":
            raise ValueError("exporting '/' is not allowed: name a namespace, e.g. /ns")
        if norm == "/.well-known" or norm.startswith("/.well-known/"):
            raise ValueError(f"export {prefix!r}: /.well-known is reserved for the origin")
        try:
            clean_path(norm, norm)
        except BadPath as e:
            raise ValueError(f"export {prefix!r}: {e}") from None
        storage = open_storage(url)
        exports.append(Export(norm, url, storage, public="*" in cfg.public or norm in cfg.public))
    return exports


SWEEP_TIMEOUT = 20.0  # seconds per export


async def sweep_stale_uploads(exports: list[Export], older_than: float) -> None:
    """Remove what uploads of a crashed origin left (a kill -9 runs no cleanup, and
    nothing else would ever delete it): temp files in posix exports, incomplete
    multipart uploads in S3 exports. A failure is a warning, never a failed start."""
    for export in exports:
        try:
            # a storage server that does not answer must not hold the start for long
            async with asyncio.timeout(SWEEP_TIMEOUT):
                removed = await export.storage.remove_stale_temps(older_than)
        except StorageError as e:
            log.warning("cannot sweep stale uploads of %s: %s", export.prefix, e)
            continue
        except TimeoutError:
            log.warning("cannot sweep stale uploads of %s: no answer within %gs; the next "
                        "start tries again", export.prefix, SWEEP_TIMEOUT)
            continue
        if removed:
            what = "multipart upload(s)" if export.storage.scheme == "s3" else "upload temp file(s)"
            log.info(
                "removed %d stale %s older than %gs from %s: %s",
                len(removed),
                what,
                older_than,
                export.prefix,
                ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""),
            )


def make_app(cfg: OriginConfig) -> web.Application:
    verifier = None
    if cfg.issuers:
        verifier = TokenVerifier(
            [
                Issuer(
                    iss,
                    key_source(
                        jwks, issuer=iss, ttl=cfg.jwks_ttl, min_refresh=cfg.jwks_min_refresh
                    ),
                    base_path=cfg.base_paths.get(iss, "/"),
                )
                for iss, jwks in cfg.issuers.items()
            ],
            audiences=[cfg.base_url, *cfg.audiences],
            leeway=cfg.leeway,
            jwks_ttl=cfg.jwks_ttl,
            jwks_min_refresh=cfg.jwks_min_refresh,
        )
    origin = Origin(build_exports(cfg), verifier)
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        await sweep_stale_uploads(origin.exports, cfg.stale_upload_age)

    async def on_cleanup(app: web.Application) -> None:
        await origin.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{path:.*}", origin.__call__, expect_handler=origin.expect)
    return app


def ssl_context(cfg: OriginConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return context


def _setup_logging(access_log: str | None) -> None:
    import os
    import sys

    logging.basicConfig(
        level=os.environ.get("STASHFLOW_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    access = logging.getLogger("stashflow.origin.access")
    access.propagate = False
    if access_log is None:
        access.disabled = True
        return
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if access_log == "-" else logging.FileHandler(access_log)
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)


async def run(cfg: OriginConfig, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    import signal

    host, port = cfg.host_port
    app = make_app(cfg)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("stashflow.origin.access"),
        handle_signals=False,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context(cfg), reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise SystemExit(
                f"stashflow origin: cannot listen on {cfg.listen}: {e.strerror or e}"
            ) from None
        if ready is not None:
            ready(cfg.base_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(cfg: OriginConfig, ready: Callable[[str], None] | None = None) -> None:
    _setup_logging(cfg.access_log)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop  # optional extra "fast"

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run(cfg, ready))
