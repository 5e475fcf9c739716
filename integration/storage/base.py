"""The one small async interface every storage backend implements.

Paths given to a backend are relative to the root of its URL ("a/b/file"), always
'/'-separated and already validated by the caller (no '..', no empty segments).
Errors are reported with the small exception family below so that callers (the cache,
the origin server, transfer engines) can map them to HTTP statuses or retry decisions
without knowing which backend failed.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

CHECKSUM_ALGORITHMS = ("adler32", "md5", "crc32c", "sha256")
DEFAULT_CHUNK = 1 << 20
# What an upload whose writer died (a crash or kill -9 runs no cleanup) leaves behind is
# removed once untouched this long: a live upload keeps touching its leftovers (each
# chunk or part it writes), and a younger one may belong to another process.
STALE_TEMP_AGE = 3600.0


class StorageError(Exception):
    """A storage operation failed; `url` names the object, `reason` says why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class NotFound(StorageError):
    """The object or directory does not exist."""


class AlreadyExists(StorageError):
    """Storage.create found the name taken: nothing was stored, the existing object
    (or directory) is untouched."""


class PermissionDenied(StorageError):
    """The backend refused access (credentials, ACLs, read-only export)."""


class Unavailable(StorageError):
    """The backend could not be reached or failed; retrying later may help."""


class Corrupt(StorageError):
    """Data did not match what was promised: short read, size or checksum mismatch."""


class Unsupported(StorageError):
    """The backend cannot do this operation (e.g. no server-side checksum)."""


class Changed(StorageError):
    """The object no longer is the version asked for (`if_match` names another entity
    tag): nothing of the new version was delivered."""


def strong_etag(etag: str | None) -> str | None:
    """The opaque tag of `etag` (as ObjectInfo.etag holds it) when it can name one
    version in an If-Match: None for a missing or weak tag (If-Match compares strongly,
    RFC 9110 section 13.1.1) and for one that cannot travel in an entity-tag."""
    if not etag or etag.startswith("W/"):
        return None
    if all(c == "!" or "#" <= c <= "~" for c in etag):
        return etag
    return None


def check_range(offset: int, length: int | None, chunk_size: int) -> None:
    """The argument checks every backend's `stream` starts with."""
    if offset < 0 or (length is not None and length < 0) or chunk_size <= 0:
        raise ValueError("offset, length and chunk_size must be non-negative")


@dataclass(frozen=True)
class ObjectInfo:
    """What a backend knows about one object without reading it."""

    path: str
    size: int
    mtime: float | None = None
    etag: str | None = None
    is_dir: bool = False
    # Checksums the backend got for free (response headers, object metadata),
    # as lowercase hex keyed by algorithm name from CHECKSUM_ALGORITHMS.
    checksums: dict[str, str] = field(default_factory=dict)


class Storage(abc.ABC):
    """An async view of one storage root. Instances are cheap; `close()` releases pools."""

    scheme: str = ""
    # Whether `stream` and `checksum` honour `if_match` (backends with entity tags).
    conditional_reads: bool = False

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def url_of(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}" if path else self.url

    def inside(self, path: str) -> str:
        """`path`, refused (PermissionDenied) if it could leave the storage root: a `..`
        segment, an absolute path or a NUL. Every backend builds its names through this,
        whatever checks its callers make first."""
        if path.startswith("/") or "\x00" in path:
            raise PermissionDenied(self.url_of(path), "path must be relative to the storage root")
        if any(part == ".." for part in path.split("/")):
            raise PermissionDenied(self.url_of(path), "path escapes the storage root")
        return path

    @abc.abstractmethod
    async def stat(self, path: str) -> ObjectInfo:
        """Size, mtime, etag of an object (or a directory, with is_dir=True)."""

    async def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read `length` bytes at `offset` (to the end when length is None)."""
        parts = [c async for c in self.stream(path, offset, length)]
        return b"".join(parts)

    @abc.abstractmethod
    def stream(
        self,
        path: str,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        *,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Yield the bytes of a range in order. Raises Corrupt if the backend delivers
        fewer bytes than the range it promised.

        `if_match` (an etag as ObjectInfo.etag gives it) reads that version only: Changed
        is raised, before anything is yielded, when the object has another tag by then.
        A weak tag cannot name one version and is ignored. Backends whose
        `conditional_reads` is False raise Unsupported for any `if_match` rather than
        read whatever the name holds."""

    @abc.abstractmethod
    async def write(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        """Store an object atomically: readers see the old object or the whole new one,
        never a part; a failed write leaves nothing behind. Parent directories are
        created as needed."""

    async def create(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        """Store a new object like `write`, but never replace an existing one: raise
        AlreadyExists instead (for callers allowed to create but not to overwrite).

        This default looks for the name once the last byte has arrived, just before
        `write` commits, which leaves only the commit itself open to a concurrent
        creation; backends with an atomic create-if-absent override it."""

        async def then_check() -> AsyncIterator[bytes]:
            if isinstance(data, bytes | bytearray | memoryview):
                yield bytes(data)
            else:
                async for chunk in data:
                    yield chunk
            try:
                await self.stat(path)
            except NotFound:
                return
            # Raised from inside the data source: `write` aborts and stores nothing.
            raise AlreadyExists(self.url_of(path), "already exists")

        return await self.write(path, then_check())

    async def remove_stale_temps(self, older_than: float = STALE_TEMP_AGE) -> list[str]:
        """Remove what uploads whose writer died (a crash or kill -9 runs no cleanup)
        left behind and nothing has written for more than `older_than` seconds; return
        what was removed as paths relative to the root (posix: the temp files; S3: the
        objects of the aborted multipart uploads). The default has nothing to remove;
        backends whose writes can leave something override it."""
        return []

    @abc.abstractmethod
    async def delete(self, path: str) -> None:
        """Remove an object. NotFound if it does not exist."""

    @abc.abstractmethod
    async def list(self, path: str = "") -> list[ObjectInfo]:
        """The direct children of a directory (paths relative to the storage root)."""

    async def server_checksum(self, path: str, algorithm: str) -> str | None:
        """The checksum as the server knows or computes it (no object bytes cross the
        network), or None when it cannot. Backends with such a facility override this."""
        return None

    async def checksum(self, path: str, algorithm: str, *, if_match: str | None = None) -> str:
        """Lowercase hex checksum: the server's if it has one, else computed by
        streaming the object. With `if_match`, of that version only, as `stream`."""
        from stashflow.integration.checksums import ALGORITHMS, Hasher

        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
        # A server-side checksum is of whatever the name holds when asked.
        known = None if if_match is not None else await self.server_checksum(path, algorithm)
        if known is not None:
            return known
        hasher = Hasher(algorithm)
        async for chunk in self.stream(path, if_match=if_match):
            hasher.update(chunk)
        return hasher.hexdigest()

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. The default has nothing to release."""

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
