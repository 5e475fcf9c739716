"""Local directory backend (file:// URLs).

Blocking system calls run in the default thread pool so that a slow disk (or a network
filesystem behind the mount) never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import stat as stat_module
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from stashflow.integration.storage.base import (
    DEFAULT_CHUNK,
    STALE_TEMP_AGE,
    AlreadyExists,
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

_T = TypeVar("_T")

TEMP_MARKER = ".stashflow-tmp-"
# A temp file untouched for STALE_TEMP_AGE belongs to a writer that died (an upload in
# progress rewrites its temp file with every chunk, so its mtime stays fresh).

_NOT_FOUND_ERRNOS = {errno.ENOENT, errno.ENOTDIR}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _link_new(temp: str, local: str, url: str) -> None:
    """Give the finished temp file its final name unless that name is taken: link(2)
    fails with EEXIST atomically, where rename(2) would silently replace whatever
    another writer committed meanwhile."""
    try:
        os.link(temp, local)
    except FileExistsError:
        raise AlreadyExists(url, "already exists (created while this upload was running)") from None
    except OSError as exc:
        # link(2): EPERM (or EOPNOTSUPP) when the filesystem has no hard links. There a
        # check right before rename is the best available: it leaves only this instant.
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        if os.path.lexists(local):
            raise AlreadyExists(url, "already exists") from None
        os.rename(temp, local)


def _missing_dirs(root: str, directory: str) -> list[str]:
    """The directories between `root` and `directory` that do not exist yet, deepest
    first: what a makedirs for `directory` is about to create."""
    out: list[str] = []
    root = os.path.normpath(root)
    current = os.path.normpath(directory)
    while current != root and current.startswith(root + os.sep) and not os.path.isdir(current):
        out.append(current)
        current = os.path.dirname(current)
    return out


def _remove_empty_dirs(dirs: list[str]) -> None:
    """rmdir `dirs` (deepest first) until one is not empty: another upload may have put
    something there meanwhile, and then it and its parents stay."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


def map_os_error(url: str, exc: OSError) -> StorageError:
    """The storage error for a failed system call on `url`."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EISDIR:
        return StorageError(url, "is a directory, not an object")
    if exc.errno in _NOT_FOUND_ERRNOS:
        return NotFound(url, reason)
    if exc.errno in _DENIED_ERRNOS:
        return PermissionDenied(url, reason)
    return Unavailable(url, reason)


class _FdOwner:
    """One open file descriptor used from worker threads.

    A cancelled coroutine does not stop the thread it was waiting on, so closing the
    descriptor right away could close it under a running pread/write, or close a
    number the kernel has already handed to someone else. Closing (and any cleanup
    tied to it) is therefore deferred until the in-flight call has returned.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending: asyncio.Future[Any] | None = None

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, fn, self.fd, *args)
        self._pending = fut
        # shield: cancellation reaches us, but `fut` keeps tracking the real thread.
        result: _T = await asyncio.shield(fut)
        return result

    def close(self, then: Callable[[], None] | None = None) -> None:
        """Close now if idle, else as soon as the running call returns."""

        def finish() -> None:
            try:
                os.close(self.fd)
            finally:
                if then is not None:
                    then()

        def after_pending(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled():
                fut.exception()  # nobody awaits it any more; do not log it as lost
            finish()

        if self._pending is None or self._pending.done():
            finish()
        else:
            self._pending.add_done_callback(after_pending)


def _pread_exact_or_less(fd: int, size: int, offset: int) -> bytes:
    """pread may return less than asked before EOF (signals, some filesystems): loop."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        data = os.pread(fd, remaining, offset)
        if not data:
            break
        parts.append(data)
        offset += len(data)
        remaining -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_version(path: str) -> tuple[int | None, os.stat_result]:
    """(descriptor, its fstat) of an object; (None, stat) of a directory."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if stat_module.S_ISDIR(st.st_mode):
        os.close(fd)
        return None, st
    return fd, st


class OpenVersion:
    """One version of a posix object (see `PosixStorage.open_version`)."""

    def __init__(self, url: str, info: ObjectInfo, fd: int | None) -> None:
        self.url = url
        self.info = info
        self._owner = _FdOwner(fd) if fd is not None else None

    async def stream(
        self, offset: int = 0, length: int | None = None, chunk_size: int = DEFAULT_CHUNK
    ) -> AsyncIterator[bytes]:
        check_range(offset, length, chunk_size)
        end = max(self.info.size, offset) if length is None else offset + length
        position = offset
        while position < end:
            if self._owner is None:
                raise StorageError(self.url, "nothing to read: a directory, or closed")
            want = min(chunk_size, end - position)
            try:
                data = await self._owner.run(_pread_exact_or_less, want, position)
            except OSError as exc:
                raise map_os_error(self.url, exc) from exc
            if len(data) < want:
                raise Corrupt(
                    self.url,
                    f"short read: got {position - offset + len(data)} of "
                    f"{end - offset} bytes from offset {offset} (file shrank?)",
                )
            position += len(data)
            yield data

    def close(self) -> None:
        """Release the descriptor (idempotent; deferred while a read is running)."""
        if self._owner is not None:
            self._owner.close()
            self._owner = None


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable, not only the file's data.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PosixStorage(Storage):
    """A directory on a local (or locally mounted) filesystem."""

    scheme = "file"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.scheme not in ("", "file"):
            raise ValueError(f"{url}: not a file:// URL")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url}: file:// URLs on another host are not supported")
        root = unquote(parts.path) if parts.scheme else url
        if not root:
            raise ValueError(f"{url}: no directory given")
        self.root = Path(root)
        # Files are created readable by everyone the umask allows: the data is meant
        # to be served, and mkstemp's 0600 would hide it from server processes.
        self.file_mode: int = int(options.get("file_mode", 0o644))

    def _local(self, path: str) -> str:
        path = self.inside(path)
        return os.path.join(self.root, path) if path else str(self.root)

    def _info(self, path: str, st: os.stat_result) -> ObjectInfo:
        is_dir = stat_module.S_ISDIR(st.st_mode)
        return ObjectInfo(
            path=path,
            # Directory sizes are filesystem bookkeeping, not content; 0 keeps all
            # backends in agreement.
            size=0 if is_dir else st.st_size,
            mtime=st.st_mtime,
            # Inode, size and mtime together change whenever the content is replaced,
            # which is what caches need an ETag for.
            etag=None if is_dir else f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}",
            is_dir=is_dir,
        )

    async def stat(self, path: str) -> ObjectInfo:
        local = self._local(path)
        try:
            st = await asyncio.to_thread(os.stat, local)
        except OSError as exc:
            raise map_os_error(self.url_of(path), exc) from exc
        return self._info(path, st)

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
        if if_match is not None:
            # One version is read through one descriptor instead: see open_version.
            raise Unsupported(self.url_of(path), "posix reads are not conditional on an ETag")
        version = await self.open_version(path)
        try:
            if version.info.is_dir:
                raise map_os_error(
                    self.url_of(path), IsADirectoryError(errno.EISDIR, "is a directory")
                )
            async for data in version.stream(offset, length, chunk_size):
                yield data
        finally:
            version.close()

    async def open_version(self, path: str) -> OpenVersion:
        """The object's current version, read through one descriptor: what its `info`
        says and the bytes its `stream` yields stay one version even when the name is
        replaced meanwhile (rename(2) over it, as every atomic write does). A directory
        comes back with `info.is_dir` set and nothing to read. close() it."""
        local = self._local(path)
        try:
            fd, st = await asyncio.to_thread(_open_version, local)
        except OSError as exc:
            raise map_os_error(self.url_of(path), exc) from exc
        return OpenVersion(self.url_of(path), self._info(path, st), fd)

    async def write(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        return await self._store(path, data, replace=True)

    async def create(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        return await self._store(path, data, replace=False)

    async def _store(
        self, path: str, data: bytes | AsyncIterable[bytes], *, replace: bool
    ) -> ObjectInfo:
        url = self.url_of(path)
        local = self._local(path)
        if not path:
            raise PermissionDenied(url, "cannot write over the storage root")
        directory, name = os.path.split(local)
        temp = os.path.join(directory, f".{name}{TEMP_MARKER}{secrets.token_hex(6)}")
        # The directories this upload creates: a failed upload removes them again, so
        # that it leaves nothing behind (not even an empty parent).
        created: list[str] = []

        def create() -> int:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            for attempt in range(3):
                created[:] = _missing_dirs(str(self.root), directory)
                try:
                    os.makedirs(directory, exist_ok=True)
                    return os.open(temp, flags, self.file_mode)
                except FileNotFoundError:
                    # a failed upload next door removed the directory it had created
                    # between our makedirs and open: create it again
                    if attempt == 2:
                        _remove_empty_dirs(created)
                        raise
                except OSError:
                    _remove_empty_dirs(created)
                    raise
            raise AssertionError("unreachable")

        try:
            fd = await asyncio.to_thread(create)
        except OSError as exc:
            raise map_os_error(url, exc) from exc
        owner = _FdOwner(fd)
        committed = False

        def discard() -> None:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            if not committed:
                _remove_empty_dirs(created)

        async def call(fn: Callable[..., _T], *args: Any) -> _T:
            # Only our own system calls are mapped: an error raised by the caller's
            # data source propagates as it is.
            try:
                return await owner.run(fn, *args)
            except OSError as exc:
                raise map_os_error(url, exc) from exc

        try:
            if isinstance(data, bytes | bytearray | memoryview):
                await call(_write_all, data)
            else:
                async for chunk in data:
                    if chunk:
                        await call(_write_all, chunk)
            await call(os.fsync)
            try:
                if replace:
                    await asyncio.to_thread(os.replace, temp, local)
                else:
                    await asyncio.to_thread(_link_new, temp, local, url)
                committed = True
                await asyncio.to_thread(_fsync_dir, directory)
                st = await asyncio.to_thread(os.stat, local)
            except OSError as exc:
                raise map_os_error(url, exc) from exc
        finally:
            # Synchronous on purpose: it must also run when the task is being cancelled.
            # After a link the temp name is a second name of the object: drop it too.
            owner.close(then=None if committed and replace else discard)
        return self._info(path, st)

    async def remove_stale_temps(self, older_than: float = STALE_TEMP_AGE) -> list[str]:
        """Delete the temp files of uploads whose writer died (a crash or kill -9 runs no
        cleanup) that were last written more than `older_than` seconds ago; returns
        their paths relative to the root. Younger ones may belong to a live upload of
        another process sharing this storage, so they stay."""

        def sweep() -> list[str]:
            removed: list[str] = []
            cutoff = time.time() - older_than
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    if TEMP_MARKER not in name:
                        continue
                    full = os.path.join(dirpath, name)
                    try:
                        if os.lstat(full).st_mtime > cutoff:
                            continue
                        os.unlink(full)
                    except FileNotFoundError:
                        continue  # finished or swept by someone else meanwhile
                    removed.append(os.path.relpath(full, self.root))
            return sorted(removed)

        try:
            return await asyncio.to_thread(sweep)
        except OSError as exc:
            raise map_os_error(self.url, exc) from exc

    async def delete(self, path: str) -> None:
        local = self._local(path)
        try:
            await asyncio.to_thread(os.unlink, local)
        except OSError as exc:
            raise map_os_error(self.url_of(path), exc) from exc

    async def list(self, path: str = "") -> list[ObjectInfo]:
        local = self._local(path)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""

        def scan() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            with os.scandir(local) as entries:
                for entry in entries:
                    # Another writer's in-flight temp file is not an object yet.
                    if TEMP_MARKER in entry.name:
                        continue
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue  # removed while we were listing
                    out.append(self._info(prefix + entry.name, st))
            out.sort(key=lambda info: info.path)
            return out

        try:
            return await asyncio.to_thread(scan)
        except OSError as exc:
            raise map_os_error(self.url_of(path), exc) from exc
