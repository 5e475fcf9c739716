"""Operations the Storage interface does not have (yet): create and remove a directory,
rename, and reading one version of an object. WebDAV needs the first three (MKCOL,
DELETE of a collection, MOVE; the HTTP storage adapter's atomic writes rely on MOVE),
GET the last (see `open_version`).

Each backend gets its native operation where it has one (rename(2), XRootD mv/mkdir);
otherwise MOVE falls back to copy-then-delete through the Storage interface, which keeps
the destination atomic (Storage.write is) but is not atomic as a whole: for an instant
both names exist. Directory operations without a native equivalent raise Unsupported.

A move that must not replace its target (the client may only create, or sent
`Overwrite: F`) refuses a taken name at the commit itself, as uploads do
(Storage.create): posix links the object to its new name (link(2) fails with EEXIST
atomically, where rename(2) would replace) and then removes the old name; the other
backends look for the target right before the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from typing import Any

from stashflow.integration.checksums import ALGORITHMS, Hasher
from stashflow.integration.storage import (
    AlreadyExists,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    Storage,
    StorageError,
    Unsupported,
)
from stashflow.integration.storage.base import DEFAULT_CHUNK, strong_etag
from stashflow.integration.storage.posix import OpenVersion, PosixStorage, map_os_error


class Conflict(StorageError):
    """The operation cannot be done in the current state (parent missing, directory
    not empty, target exists): HTTP 409 or 405, as the caller decides."""


class Exists(Conflict):
    """The target already exists."""


def _posix_path(storage: PosixStorage, rel: str) -> str:
    # `rel` comes from clean_path (no '..', no empty segments): it cannot leave the root.
    return os.path.join(storage.root, rel) if rel else str(storage.root)


def _root_parts(storage: Storage) -> tuple[Any, str] | None:
    """(XRootD FileSystem, absolute base path) for a root:// storage, else None."""
    if storage.scheme != "root":
        return None
    from XRootD import client

    server = getattr(storage, "server", None)
    base = getattr(storage, "base", None)
    if not isinstance(server, str) or not isinstance(base, str):
        return None
    return client.FileSystem(server), base.rstrip("/")


async def _xrootd(
    root: tuple[Any, str], storage: Storage, rel: str, method: str, *args: Any
) -> None:
    from stashflow.integration.storage.root import error_for_status

    fs, _ = root
    timeout = int(getattr(storage, "timeout", 30))
    status, _ = await asyncio.to_thread(getattr(fs, method), *args, timeout=timeout)
    if not status.ok:
        raise error_for_status(storage.url_of(rel), status)


def _s3_client(storage: Storage) -> tuple[Any, str, str] | None:
    """(boto3 client, bucket, key prefix) of an s3:// storage, else None. The S3
    adapter has no directory call; a "folder marker" object (key ending in '/') is the
    S3 convention for an empty directory, and the adapter already treats one as such."""
    if storage.scheme != "s3":
        return None
    client = getattr(storage, "_client", None)
    bucket = getattr(storage, "bucket", None)
    prefix = getattr(storage, "prefix", "")
    if client is None or not isinstance(bucket, str):
        return None
    return client, bucket, str(prefix)


async def make_collection(storage: Storage, rel: str) -> None:
    """Create the directory `rel`; its parent must exist (RFC 4918: 409 otherwise)."""
    url = storage.url_of(rel)
    parent = rel.rpartition("/")[0]
    if isinstance(storage, PosixStorage):
        try:
            await asyncio.to_thread(os.mkdir, _posix_path(storage, rel), 0o755)
        except FileExistsError:
            raise Exists(url, "already exists") from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise Conflict(url, "parent directory does not exist") from None
            raise map_os_error(url, e) from None
        return
    if parent:
        try:
            if not (await storage.stat(parent)).is_dir:
                raise Conflict(url, "parent is not a directory")
        except NotFound:
            raise Conflict(url, "parent directory does not exist") from None
    root = _root_parts(storage)
    if root is not None:
        from XRootD.client.flags import MkDirFlags

        await _xrootd(root, storage, rel, "mkdir", f"{root[1]}/{rel}", MkDirFlags.NONE, 0o755)
        return
    s3 = _s3_client(storage)
    if s3 is not None:
        client, bucket, prefix = s3
        key = f"{prefix}/{rel}/" if prefix else f"{rel}/"
        try:
            await asyncio.to_thread(client.put_object, Bucket=bucket, Key=key, Body=b"")
        except Exception as e:  # botocore's error family, mapped by the adapter's helper
            from stashflow.integration.storage.s3 import error_for

            raise error_for(url, e) from None
        return
    raise Unsupported(url, f"the {storage.scheme} backend cannot create directories")


async def remove_collection(storage: Storage, rel: str) -> None:
    """Remove the empty directory `rel` (409 Conflict when it is not empty)."""
    url = storage.url_of(rel)
    if isinstance(storage, PosixStorage):
        try:
            await asyncio.to_thread(os.rmdir, _posix_path(storage, rel))
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise Conflict(url, "directory is not empty") from None
            raise map_os_error(url, e) from None
        return
    try:
        children = await storage.list(rel)
    except NotFound:
        children = []
    if children:
        raise Conflict(url, "directory is not empty")
    root = _root_parts(storage)
    if root is not None:
        await _xrootd(root, storage, rel, "rmdir", f"{root[1]}/{rel}")
        return
    s3 = _s3_client(storage)
    if s3 is not None:
        client, bucket, prefix = s3
        key = f"{prefix}/{rel}/" if prefix else f"{rel}/"
        await asyncio.to_thread(client.delete_object, Bucket=bucket, Key=key)
        return
    raise Unsupported(url, f"the {storage.scheme} backend cannot remove directories")


def _rename_new(src: str, dst: str, url: str) -> None:
    """Rename `src` to `dst` unless `dst` is taken (AlreadyExists; `src` untouched).

    An object is linked to its new name first: link(2) fails with EEXIST atomically
    even when the name was taken a moment ago (rename(2) would silently replace it);
    the old name is removed afterwards. A directory cannot be linked, and some
    filesystems have no hard links: there the name is checked right before rename(2),
    which leaves only that instant open (and rename(2) of a directory cannot replace
    a file or a non-empty directory anyway)."""
    if not os.path.isdir(src) or os.path.islink(src):
        try:
            # follow_symlinks=False: a symlink is moved as itself, as rename(2) does
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            raise AlreadyExists(url, "already exists") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
        else:
            try:
                os.unlink(src)
            except FileNotFoundError:
                pass  # someone else removed or renamed the old name meanwhile
            except OSError:
                # a move that cannot finish must not leave a second name behind
                with contextlib.suppress(OSError):
                    os.unlink(dst)
                raise
            return
    if os.path.lexists(dst):
        raise AlreadyExists(url, "already exists")
    os.rename(src, dst)


async def move(storage: Storage, source: str, target: str, *, replace: bool = True) -> None:
    """Rename `source` to `target` within one storage, replacing `target` when
    `replace`; otherwise raise AlreadyExists, leaving `source` as it was, when `target`
    exists at the moment of the rename (see the module docstring for how exactly)."""
    url = storage.url_of(source)
    target_url = storage.url_of(target)
    if isinstance(storage, PosixStorage):
        src, dst = _posix_path(storage, source), _posix_path(storage, target)

        def rename() -> None:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if replace:
                os.replace(src, dst)  # atomic: readers of `target` see old or new, never half
            else:
                _rename_new(src, dst, target_url)

        try:
            await asyncio.to_thread(rename)
        except OSError as e:
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise Conflict(url, f"cannot replace {target}: {e.strerror}") from None
            raise map_os_error(url, e) from None
        return
    root = _root_parts(storage)
    if root is not None:
        if not replace:
            await _refuse_taken(storage, target)
        base = root[1]
        await _xrootd(root, storage, source, "mv", f"{base}/{source}", f"{base}/{target}")
        return
    info = await storage.stat(source)
    if info.is_dir:
        raise Unsupported(url, f"the {storage.scheme} backend cannot rename directories")
    # Copy then delete: the destination appears whole (write is atomic); if the delete
    # fails the source stays behind, which loses nothing. Without `replace` the copy is
    # committed by Storage.create, which checks for the target after the last byte.
    if replace:
        await storage.write(target, storage.stream(source))
    else:
        await storage.create(target, storage.stream(source))
    try:
        await storage.delete(source)
    except NotFound:
        pass
    except PermissionDenied as e:
        raise StorageError(url, f"copied to {target} but could not remove it: {e.reason}") from e


async def _refuse_taken(storage: Storage, target: str) -> None:
    try:
        await storage.stat(target)
    except NotFound:
        return
    raise AlreadyExists(storage.url_of(target), "already exists")


class Version:
    """One version of an object, held for the length of a response: what GET and HEAD
    say about it (ETag, Last-Modified, Content-Length, Digest) and the bytes they send
    must describe the same representation (RFC 9110 sections 8.6, 8.8), also when the
    name is replaced meanwhile by an atomic write, which is exactly what writers do.

    This default knows the object only by name: `info` comes from a stat, and the reads
    go to whatever the name holds by then (root://: XRootD has no ETag). Posix reads
    through one descriptor (_OneFile); backends with entity tags read conditionally on
    the tag (_Tagged)."""

    def __init__(self, storage: Storage, rel: str, info: ObjectInfo) -> None:
        self.storage = storage
        self.rel = rel
        self.info = info

    def stream(
        self, offset: int = 0, length: int | None = None, chunk_size: int = DEFAULT_CHUNK
    ) -> AsyncIterator[bytes]:
        return self.storage.stream(self.rel, offset, length, chunk_size)

    async def checksum(self, algorithm: str) -> str:
        return await self.storage.checksum(self.rel, algorithm)

    def close(self) -> None:
        """Release what the version holds (idempotent)."""


class _OneFile(Version):
    """A posix object read through one open descriptor (PosixStorage.open_version): a
    rename(2) over the name (an atomic write replacing it) leaves this version intact."""

    def __init__(self, storage: Storage, rel: str, opened: OpenVersion) -> None:
        super().__init__(storage, rel, opened.info)
        self._opened = opened

    def stream(
        self, offset: int = 0, length: int | None = None, chunk_size: int = DEFAULT_CHUNK
    ) -> AsyncIterator[bytes]:
        return self._opened.stream(offset, length, chunk_size)

    async def checksum(self, algorithm: str) -> str:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
        hasher = Hasher(algorithm)
        async for chunk in self.stream():
            hasher.update(chunk)
        return hasher.hexdigest()

    def close(self) -> None:
        self._opened.close()


class _Tagged(Version):
    """An object of a storage with `conditional_reads`, read only while it still has
    the strong ETag of its `info`: a replaced object makes the reads raise Changed
    (before any byte of it is delivered) instead of mixing versions."""

    def stream(
        self, offset: int = 0, length: int | None = None, chunk_size: int = DEFAULT_CHUNK
    ) -> AsyncIterator[bytes]:
        return self.storage.stream(self.rel, offset, length, chunk_size, if_match=self.info.etag)

    async def checksum(self, algorithm: str) -> str:
        return await self.storage.checksum(self.rel, algorithm, if_match=self.info.etag)


async def open_version(storage: Storage, rel: str) -> Version:
    """The current version of `rel` (NotFound etc. as Storage.stat raises them); the
    caller must close() it. A directory comes back as a Version whose info.is_dir is
    set, which has nothing to read. The reads of a version may raise Changed when the
    object was replaced since: open it again for the new one."""
    if isinstance(storage, PosixStorage):
        return _OneFile(storage, rel, await storage.open_version(rel))
    info = await storage.stat(rel)
    if storage.conditional_reads and not info.is_dir and strong_etag(info.etag) is not None:
        return _Tagged(storage, rel, info)
    # No strong tag to hold the object to: read by name, as the default does.
    return Version(storage, rel, info)
