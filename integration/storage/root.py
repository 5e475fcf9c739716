"""XRootD backend (root:// URLs) on the `xrootd` Python bindings.

The bindings are synchronous; every call runs in the default thread pool with the
storage's timeout passed to the server call, so a dead server costs `timeout` seconds,
not the client library's default of half an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from XRootD import client
from XRootD.client.flags import DirListFlags, OpenFlags, QueryCode, StatInfoFlags

from stashflow.integration.storage.base import (
    DEFAULT_CHUNK,
    Corrupt,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    Storage,
    StorageError,
    Unavailable,
    Unsupported,
    check_range,
)

TEMP_MARKER = ".stashflow-tmp-"
# Request timeouts are only checked every TimeoutResolution seconds (15 by default),
# which would turn a 3 s timeout into 15 s. EnvPutInt leaves a value the user set
# through XRD_TIMEOUTRESOLUTION alone.
client.EnvPutInt("TimeoutResolution", 1)

# Server error numbers (XProtocol.hh) carried by a status with code errErrorResponse.
_kXR_NotAuthorized = 3010
_kXR_NotFound = 3011
_kXR_NotFile = 3015
_kXR_isDirectory = 3016
_kXR_ChkSumErr = 3019
_kXR_fsReadOnly = 3025
_kXR_AuthFailed = 3030
_ERR_ERROR_RESPONSE = 400
# Client-side status codes (XrdClStatus.hh)
_ERR_NOT_FOUND = 304
_ERR_AUTH = (203, 204)


def error_for_status(url: str, status: Any) -> StorageError:
    """The storage error for a failed XRootDStatus."""
    reason = " ".join(str(status.message).split()) or f"XRootD error code {status.code}"
    code, server_errno = status.code, status.errno
    if code == _ERR_ERROR_RESPONSE:
        if server_errno == _kXR_NotFound:
            return NotFound(url, reason)
        if server_errno in (_kXR_NotAuthorized, _kXR_AuthFailed, _kXR_fsReadOnly):
            return PermissionDenied(url, reason)
        if server_errno in (_kXR_NotFile, _kXR_isDirectory):
            return StorageError(url, reason)
        if server_errno == _kXR_ChkSumErr:
            return Corrupt(url, reason)
        return Unavailable(url, reason)
    if code == _ERR_NOT_FOUND:
        return NotFound(url, reason)
    if code in _ERR_AUTH:
        return PermissionDenied(url, reason)
    # Connection refused, timeouts, disconnects, redirect loops: worth retrying later.
    return Unavailable(url, reason)


class _OpenFile:
    """An XRootD File used from worker threads.

    A cancelled coroutine does not stop the thread it waited on; closing (and removing
    an abandoned temp file) waits for the in-flight call instead of racing it.
    """

    def __init__(self, timeout: int) -> None:
        self.file = client.File()
        self.timeout = timeout
        self._pending: asyncio.Future[Any] | None = None

    async def run(self, method: str, *args: Any) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        fn = getattr(self.file, method)
        fut = loop.run_in_executor(None, lambda: fn(*args, timeout=self.timeout))
        self._pending = fut
        result: tuple[Any, Any] = await asyncio.shield(fut)
        return result

    async def finish(self, then: Callable[[], object] | None = None) -> None:
        """Close the file (ignoring errors) and run `then` in a thread, after whatever
        call is still running; waits only when nothing is."""

        def close_and_then() -> None:
            # Cleanup after a failure or an early stop: its own errors change nothing.
            with contextlib.suppress(Exception):
                if self.file.is_open():
                    self.file.close(timeout=self.timeout)
            if then is not None:
                with contextlib.suppress(Exception):
                    then()

        loop = asyncio.get_running_loop()
        if self._pending is not None and not self._pending.done():

            def after_pending(fut: asyncio.Future[Any]) -> None:
                if not fut.cancelled():
                    fut.exception()  # nobody awaits it any more; do not log it as lost
                loop.run_in_executor(None, close_and_then)

            self._pending.add_done_callback(after_pending)
            return
        await asyncio.shield(loop.run_in_executor(None, close_and_then))


class RootStorage(Storage):
    """root://host:port//path on an XRootD server."""

    scheme = "root"

    def __init__(self, url: str, *, timeout: int = 30) -> None:
        super().__init__(url)
        parts = urlsplit(self.url)
        if parts.scheme not in ("root", "roots") or not parts.netloc:
            raise ValueError(f"{url}: not a root:// URL")
        self.server = f"{parts.scheme}://{parts.netloc}"
        self.base = "/" + parts.path.lstrip("/")
        self.timeout = int(timeout)
        self._fs = client.FileSystem(self.server)

    def _full(self, path: str) -> str:
        path = self.inside(path)
        return f"{self.base.rstrip('/')}/{path}" if path else self.base

    def _file_url(self, path: str) -> str:
        return f"{self.server}/{self._full(path)}"

    async def _fs_call(self, url: str, method: str, *args: Any) -> Any:
        fn = getattr(self._fs, method)
        status, response = await asyncio.to_thread(fn, *args, timeout=self.timeout)
        if not status.ok:
            raise error_for_status(url, status)
        return response

    @staticmethod
    def _info(path: str, statinfo: Any) -> ObjectInfo:
        is_dir = bool(statinfo.flags & StatInfoFlags.IS_DIR)
        mtime = getattr(statinfo, "mtime", None) or getattr(statinfo, "modtime", None)
        return ObjectInfo(
            path=path,
            # Directory sizes are filesystem bookkeeping; 0 keeps backends in agreement.
            size=0 if is_dir else int(statinfo.size),
            mtime=float(mtime) if mtime else None,
            is_dir=is_dir,
        )

    async def stat(self, path: str) -> ObjectInfo:
        statinfo = await self._fs_call(self.url_of(path), "stat", self._full(path))
        return self._info(path, statinfo)

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
        if if_match is not None:
            raise Unsupported(url, "XRootD has no entity tags to make a read conditional on")
        handle = _OpenFile(self.timeout)
        try:
            status, _ = await handle.run("open", self._file_url(path), OpenFlags.READ, 0)
            if not status.ok:
                raise error_for_status(url, status)
            if length is None:
                status, statinfo = await handle.run("stat", False)
                if not status.ok:
                    raise error_for_status(url, status)
                end = max(int(statinfo.size), offset)
            else:
                end = offset + length
            position = offset
            while position < end:
                want = min(chunk_size, end - position)
                status, data = await handle.run("read", position, want)
                if not status.ok:
                    raise error_for_status(url, status)
                data = data or b""
                if len(data) < want:
                    raise Corrupt(
                        url,
                        f"short read: got {position - offset + len(data)} of {end - offset} "
                        f"bytes from offset {offset} (file shrank?)",
                    )
                position += len(data)
                yield data
        finally:
            await handle.finish()

    async def write(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        url = self.url_of(path)
        if not path:
            raise PermissionDenied(url, "cannot write over the storage root")
        directory, _, name = path.rpartition("/")
        temp_name = f".{name}{TEMP_MARKER}{secrets.token_hex(6)}"
        temp = f"{directory}/{temp_name}" if directory else temp_name
        handle = _OpenFile(self.timeout)
        created = committed = False

        async def call(method: str, *args: Any) -> None:
            status, _ = await handle.run(method, *args)
            if not status.ok:
                raise error_for_status(url, status)

        try:
            flags = OpenFlags.NEW | OpenFlags.MAKEPATH
            await call("open", self._file_url(temp), flags, 0o644)
            # Only now is there something to remove. (An open whose answer was lost
            # can leave an empty temp file; list() hides those.)
            created = True
            position = 0
            if isinstance(data, bytes | bytearray | memoryview):
                view = memoryview(data)
                # One request per chunk keeps each message within the server's buffers.
                for start in range(0, len(view), DEFAULT_CHUNK):
                    piece = bytes(view[start : start + DEFAULT_CHUNK])
                    await call("write", piece, position, len(piece))
                    position += len(piece)
            else:
                async for chunk in data:
                    if chunk:
                        await call("write", bytes(chunk), position, len(chunk))
                        position += len(chunk)
            # close() flushes: its failure is a failed write.
            await call("close")
            await self._fs_call(url, "mv", self._full(temp), self._full(path))
            committed = True
        finally:
            if created and not committed:
                full_temp = self._full(temp)
                await handle.finish(then=lambda: self._fs.rm(full_temp, timeout=self.timeout))
            elif not committed:
                await handle.finish()
        return await self.stat(path)

    async def delete(self, path: str) -> None:
        await self._fs_call(self.url_of(path), "rm", self._full(path))

    async def list(self, path: str = "") -> list[ObjectInfo]:
        path = path.strip("/")
        listing = await self._fs_call(
            self.url_of(path), "dirlist", self._full(path), DirListFlags.STAT
        )
        prefix = f"{path}/" if path else ""
        out = [
            self._info(prefix + entry.name, entry.statinfo)
            for entry in listing
            # Another writer's in-flight temp file is not an object yet.
            if TEMP_MARKER not in entry.name and entry.statinfo is not None
        ]
        out.sort(key=lambda info: info.path)
        return out

    async def server_checksum(self, path: str, algorithm: str) -> str | None:
        url = self.url_of(path)
        query = f"{self._full(path)}?cks.type={algorithm}"
        status, answer = await asyncio.to_thread(
            self._fs.query, QueryCode.CHECKSUM, query, timeout=self.timeout
        )
        if status.ok:
            # e.g. b"adler32 0a1b2c3d\x00"
            name, _, value = answer.rstrip(b"\x00").decode(errors="replace").partition(" ")
            value = value.strip().lower()
            if name.lower() == algorithm and value:
                if algorithm in ("adler32", "crc32c"):
                    return f"{int(value, 16):08x}"
                return value
        else:
            error = error_for_status(url, status)
            # "checksum not supported" comes back as a generic server error; anything
            # that says the object or the server is not there is final.
            if not isinstance(error, Unavailable) or status.code != _ERR_ERROR_RESPONSE:
                raise error
        return None
