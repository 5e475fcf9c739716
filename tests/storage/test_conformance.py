"""One conformance suite for every storage backend, against real servers:
posix (a temp dir), root:// and http:// (one XRootD server with XrdHttp, same data),
s3:// (SeaweedFS), and http-origin: the same http:// adapter against our own origin
(`stashflow origin serve`, a posix directory behind it, a token with storage.read,
storage.create and storage.modify over the export), so that both the adapter and the
origin are held to the same contract as every other backend. Each test runs unchanged
on every backend; what a backend cannot do is tested separately below, per backend,
saying why."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from stashflow.integration.checksums import Hasher
from stashflow.integration.servers import free_port
from stashflow.integration.servers.seaweedfs import SeaweedFS
from stashflow.integration.servers.xrootd import XCacheServer, XRootDServer
from stashflow.integration.storage import (
    CHECKSUM_ALGORITHMS,
    Changed,
    Corrupt,
    NotFound,
    PermissionDenied,
    Storage,
    Unavailable,
    Unsupported,
)
from stashflow.integration.storage.http import HTTPStorage, error_for_status, parse_digest
from stashflow.integration.storage.posix import PosixStorage, map_os_error
from stashflow.integration.storage.s3 import PART_SIZE, S3Storage
from stashflow.integration.storage.s3 import error_for as s3_error_for
from tests.conftest import require_real
from tests.fixtures_servers import OriginServer, own_origin

BACKENDS = ["posix", "root", "http", "http-origin", "s3"]
# Not http-origin: against a port where nothing listens it would be the http test again.
NETWORK_BACKENDS = ["root", "http", "s3"]
MiB = 1 << 20
BUCKET = "stashflow-conformance"


def _root_storage(url: str, timeout: int = 10) -> Storage:
    try:
        from stashflow.integration.storage.root import RootStorage
    except ImportError as exc:
        require_real("xrootd Python bindings", str(exc))
    return RootStorage(url, timeout=timeout)


def _payload(size: int, seed: int = 0) -> bytes:
    # Not periodic: a chunk delivered at the wrong offset changes the bytes.
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="session")
def s3_bucket(seaweedfs_server: SeaweedFS) -> str:
    seaweedfs_server.create_bucket(BUCKET)
    return BUCKET


def _s3_storage(server: SeaweedFS, url: str, **overrides: str) -> S3Storage:
    options = {
        "endpoint_url": server.endpoint_url,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        **overrides,
    }
    return S3Storage(url, **options)


@dataclass
class Subject:
    """A storage under test, and a way to see what its backend really holds."""

    storage: Storage
    backend: str
    # Names in a directory as the server has them, temp files included: list() hides
    # those on purpose, so it cannot be the judge of "nothing left behind".
    raw_names: Callable[[str], set[str]]


def _names_on_disk(root: Path) -> Callable[[str], set[str]]:
    def names(directory: str) -> set[str]:
        # a failed write removes the directories it created: no directory, no names
        path = root / directory
        return set(os.listdir(path)) if path.is_dir() else set()

    return names


def _names_in_s3(storage: S3Storage) -> Callable[[str], set[str]]:
    def names(directory: str) -> set[str]:
        client = storage._client
        prefix = storage._key(directory) + "/"
        answer = client.list_objects_v2(Bucket=storage.bucket, Prefix=prefix)
        found = {item["Key"][len(prefix) :] for item in answer.get("Contents", [])}
        uploads = client.list_multipart_uploads(Bucket=storage.bucket, Prefix=prefix)
        found |= {"(upload) " + u["Key"] for u in uploads.get("Uploads", [])}
        return found

    return names


@pytest.fixture(params=BACKENDS)
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    """A fresh, empty storage root on the backend named by the parameter."""
    unique = uuid.uuid4().hex[:12]
    name: str = request.param
    if name == "posix":
        posix = PosixStorage(f"file://{tmp_path}/{unique}")
        made = Subject(posix, name, _names_on_disk(tmp_path / unique))
    elif name in ("root", "http"):
        # root:// and http:// are two doors into the same XRootD server and files.
        xrootd: XRootDServer = request.getfixturevalue("xrootd_server")
        network: Storage = (
            _root_storage(f"{xrootd.root_url}/{unique}")
            if name == "root"
            else HTTPStorage(f"{xrootd.http_url}/{unique}")
        )
        made = Subject(network, name, _names_on_disk(xrootd.data_dir / unique))
    elif name == "http-origin":
        # The same http:// client against our own origin, a posix directory behind it.
        own: OriginServer = request.getfixturevalue("origin_server")
        made = Subject(
            HTTPStorage(f"{own.url}/{unique}", token=own.token),
            name,
            _names_on_disk(own.data_dir / unique),
        )
    else:
        bucket = request.getfixturevalue("s3_bucket")
        server: SeaweedFS = request.getfixturevalue("seaweedfs_server")
        s3 = _s3_storage(server, f"s3://{bucket}/{unique}")
        made = Subject(s3, name, _names_in_s3(s3))
    try:
        yield made
    finally:
        await made.storage.close()


@pytest.fixture
def storage(subject: Subject) -> Storage:
    return subject.storage


async def _chunks(data: bytes, sizes: Iterator[int]) -> AsyncIterator[bytes]:
    position = 0
    for size in sizes:
        if position >= len(data):
            break
        yield data[position : position + size]
        position += size
        await asyncio.sleep(0)
    if position < len(data):
        yield data[position:]


def _varied_sizes() -> Iterator[int]:
    # Empty, tiny, odd and larger-than-a-chunk pieces.
    while True:
        yield from (0, 1, 4095, 65536, 3, MiB + 17)


# --- the conformance suite: identical on every backend ---------------------------------


async def test_stat_file(subject: Subject) -> None:
    storage = subject.storage
    before = time.time()
    written = await storage.write("dir/a.txt", b"hello world")
    info = await storage.stat("dir/a.txt")
    assert (info.path, info.size, info.is_dir) == ("dir/a.txt", 11, False)
    assert written.size == 11
    if subject.backend == "http":
        # XrdHttp 5.5 sends no Last-Modified on HEAD; its PROPFIND does, see test_list.
        assert info.mtime is None
    else:
        assert info.mtime is not None and before - 5 <= info.mtime <= time.time() + 5


async def test_stat_missing_names_the_url(storage: Storage) -> None:
    with pytest.raises(NotFound) as caught:
        await storage.stat("no/such/object")
    assert caught.value.url == storage.url_of("no/such/object")
    assert storage.url_of("no/such/object") in str(caught.value)


async def test_read_ranges(storage: Storage) -> None:
    data = _payload(10_240)
    await storage.write("r.bin", data)
    assert await storage.read("r.bin", 100, 1000) == data[100:1100]
    assert await storage.read("r.bin", 0, 1) == data[:1]
    assert await storage.read("r.bin", 10_000) == data[10_000:]
    assert await storage.read("r.bin", 10_239, 1) == data[-1:]
    assert await storage.read("r.bin") == data
    assert await storage.read("r.bin", 10_240) == b""
    assert await storage.read("r.bin", 5, 0) == b""


async def test_range_beyond_the_end_is_corrupt(storage: Storage) -> None:
    await storage.write("short.bin", b"0123456789")
    with pytest.raises(Corrupt):
        await storage.read("short.bin", 5, 10)
    with pytest.raises(Corrupt):
        await storage.read("short.bin", 20, 1)


async def test_stream_full_and_partial(storage: Storage) -> None:
    data = _payload(3 * MiB + 123, seed=1)
    await storage.write("big.bin", data)
    chunk_size = 256 * 1024
    chunks = [c async for c in storage.stream("big.bin", chunk_size=chunk_size)]
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert b"".join(chunks) == data
    start, length = MiB + MiB // 2, MiB + 7
    part = [c async for c in storage.stream("big.bin", start, length, chunk_size=chunk_size)]
    assert b"".join(part) == data[start : start + length]
    tail = [c async for c in storage.stream("big.bin", len(data) - 10, chunk_size=chunk_size)]
    assert b"".join(tail) == data[-10:]


async def test_write_and_read_back(storage: Storage) -> None:
    big = _payload(3 * MiB + 5, seed=2)
    info = await storage.write("nested/deeper/big.bin", big)
    assert info.size == len(big) and info.path == "nested/deeper/big.bin"
    assert await storage.read("nested/deeper/big.bin") == big
    empty = await storage.write("empty", b"")
    assert empty.size == 0
    assert (await storage.stat("empty")).size == 0
    assert await storage.read("empty") == b""


async def test_write_from_async_iterable(storage: Storage) -> None:
    data = _payload(2 * MiB + 4321, seed=3)
    info = await storage.write("streamed.bin", _chunks(data, _varied_sizes()))
    assert info.size == len(data)
    assert await storage.read("streamed.bin") == data
    empty = await storage.write("streamed-empty", _chunks(b"", iter([])))
    assert empty.size == 0


async def test_overwrite_is_atomic(storage: Storage) -> None:
    old, new = b"o" * 300_000, b"n" * 700_000
    await storage.write("obj", old)
    seen: set[bytes] = set()

    async def slow_new() -> AsyncIterator[bytes]:
        for start in range(0, len(new), 50_000):
            yield new[start : start + 50_000]
            await asyncio.sleep(0.002)

    writer = asyncio.create_task(storage.write("obj", slow_new()))
    while not writer.done():
        content = await storage.read("obj")
        assert content in (old, new), f"reader saw a mix of {len(content)} bytes"
        seen.add(content)
    await writer
    assert await storage.read("obj") == new
    assert old in seen  # the readers really overlapped the write


async def test_delete(storage: Storage) -> None:
    await storage.write("gone", b"x")
    await storage.delete("gone")
    with pytest.raises(NotFound):
        await storage.stat("gone")
    with pytest.raises(NotFound):
        await storage.read("gone")
    with pytest.raises(NotFound) as caught:
        await storage.delete("gone")
    assert caught.value.url == storage.url_of("gone")


async def test_list(storage: Storage) -> None:
    await storage.write("d/a", b"aaa")
    await storage.write("d/b", b"bbbbb")
    await storage.write("d/sub/c", b"c")
    entries = await storage.list("d")
    assert [(e.path, e.is_dir) for e in entries] == [
        ("d/a", False),
        ("d/b", False),
        ("d/sub", True),
    ]
    assert [e.size for e in entries if not e.is_dir] == [3, 5]
    now = time.time()
    assert all(e.mtime is not None and abs(e.mtime - now) < 300 for e in entries if not e.is_dir)
    assert [(e.path, e.is_dir) for e in await storage.list("d/sub")] == [("d/sub/c", False)]
    top = await storage.list()
    assert [(e.path, e.is_dir) for e in top] == [("d", True)]
    with pytest.raises(NotFound):
        await storage.list("missing-dir")


async def test_names_needing_escapes(storage: Storage) -> None:
    # Names that URLs give meaning to must round-trip as plain names.
    names = ["sp ace.txt", "per%41cent", "hash#tag", "plus+and&amp", "ünï©ødé"]
    for i, name in enumerate(names):
        await storage.write(f"odd/{name}", bytes([i]) * (i + 1))
    assert sorted(e.path for e in await storage.list("odd")) == sorted(f"odd/{n}" for n in names)
    for i, name in enumerate(names):
        assert (await storage.stat(f"odd/{name}")).size == i + 1
        assert await storage.read(f"odd/{name}") == bytes([i]) * (i + 1)
    await storage.delete("odd/per%41cent")
    with pytest.raises(NotFound):
        await storage.stat("odd/per%41cent")


@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
async def test_checksum(storage: Storage, algorithm: str) -> None:
    data = _payload(200_003, seed=4)
    await storage.write("c.bin", data)
    expected = Hasher(algorithm)
    expected.update(data)
    assert await storage.checksum("c.bin", algorithm) == expected.hexdigest()


async def test_checksum_missing_object(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await storage.checksum("nope.bin", "adler32")


async def test_failed_write_leaves_nothing(subject: Subject) -> None:
    storage = subject.storage

    class SourceBroke(Exception):
        pass

    async def breaks_midway() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        await asyncio.sleep(0.01)
        yield b"y" * 100_000
        raise SourceBroke()

    await storage.write("w/existing", b"keep me")
    with pytest.raises(SourceBroke):
        await storage.write("w/new", breaks_midway())
    with pytest.raises(SourceBroke):
        await storage.write("w/existing", breaks_midway())
    with pytest.raises(NotFound):
        await storage.stat("w/new")
    assert await storage.read("w/existing") == b"keep me"
    assert subject.raw_names("w") == {"existing"}


async def test_cancelled_write_leaves_nothing(subject: Subject) -> None:
    storage = subject.storage
    started = asyncio.Event()

    async def never_ends() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 65536
            started.set()
            await asyncio.sleep(0.005)

    writer = asyncio.create_task(storage.write("c/obj", never_ends()))
    await started.wait()
    await asyncio.sleep(0.05)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    with pytest.raises(NotFound):
        await storage.stat("c/obj")
    # Cleanup of a cancelled write may finish in a worker thread just after.
    for _ in range(100):
        if not subject.raw_names("c"):
            break
        await asyncio.sleep(0.05)
    assert subject.raw_names("c") == set()


# --- error mapping, identical on every network backend --------------------------------


def _unreachable(backend: str, seaweed: SeaweedFS | None) -> Storage:
    port = free_port()  # nothing listens there
    if backend == "root":
        return _root_storage(f"root://127.0.0.1:{port}//data", timeout=2)
    if backend == "http":
        return HTTPStorage(f"http://127.0.0.1:{port}/data", timeout=2)
    assert seaweed is not None
    return _s3_storage(seaweed, f"s3://{BUCKET}/x", endpoint_url=f"http://127.0.0.1:{port}")


async def _all_unavailable(storage: Storage) -> None:
    # Concurrently: an XRootD client only gives up on a dead server at its timeout.
    outcomes = await asyncio.gather(
        storage.stat("f"),
        storage.read("f"),
        storage.write("f", b"data"),
        storage.list(),
        return_exceptions=True,
    )
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert {o.url for o in outcomes if isinstance(o, Unavailable)} == {
        storage.url_of("f"),
        storage.url_of(""),
    }


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
async def test_unreachable_server_is_unavailable(
    backend: str, request: pytest.FixtureRequest
) -> None:
    seaweed = request.getfixturevalue("seaweedfs_server") if backend == "s3" else None
    storage = _unreachable(backend, seaweed)
    try:
        await _all_unavailable(storage)
    finally:
        await storage.close()


# --- what only some backends can show, and why -------------------------------------


@pytest.mark.parametrize("backend", ["root", "http", "http-origin"])
async def test_stopped_server_is_unavailable(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Not s3: a private SeaweedFS would cost seconds to start and stop, and the S3
    # client's failure path is the same as for an unreachable port (tested above).
    if backend == "http-origin":
        with own_origin(tmp_path / "stopped") as origin:
            await _used_then_stopped(HTTPStorage(origin.url, token=origin.token), origin.stop)
        return
    xrootd_workdir: Path = request.getfixturevalue("xrootd_workdir")
    with XRootDServer(xrootd_workdir / f"stopped-{uuid.uuid4().hex[:8]}") as server:
        url = server.root_url if backend == "root" else server.http_url
        storage = _root_storage(url, timeout=2) if backend == "root" else HTTPStorage(url)
        await _used_then_stopped(storage, server.stop)


async def _used_then_stopped(storage: Storage, stop: Callable[[], object]) -> None:
    """`storage` works, then its server is stopped: every call reports it unavailable."""
    try:
        await storage.write("f", b"data")
        assert await storage.read("f") == b"data"
        stop()
        await _all_unavailable(storage)
    finally:
        await storage.close()


@pytest.mark.parametrize("backend", ["posix", "root", "s3"])
async def test_stat_directory(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Not http: HTTPStorage.stat is a HEAD, and HTTP gives a HEAD on a collection no
    # meaning of its own (RFC 4918 section 9.4): XrdHttp answers 200 with a
    # Content-Length as for a file, our origin 400 ("list it with PROPFIND").
    # Directories show up in list() instead.
    unique = uuid.uuid4().hex[:12]
    storage: Storage
    if backend == "posix":
        storage = PosixStorage(f"file://{tmp_path}/{unique}")
    elif backend == "root":
        xrootd: XRootDServer = request.getfixturevalue("xrootd_server")
        storage = _root_storage(f"{xrootd.root_url}/{unique}")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        server: SeaweedFS = request.getfixturevalue("seaweedfs_server")
        storage = _s3_storage(server, f"s3://{bucket}/{unique}")
    try:
        await storage.write("top/inner/f", b"1")
        info = await storage.stat("top/inner")
        assert (info.path, info.is_dir, info.size) == ("top/inner", True, 0)
    finally:
        await storage.close()


@pytest.mark.parametrize("backend", ["posix", "root", "http", "http-origin"])
async def test_file_shrinking_during_a_read_is_corrupt(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Needs a hand on the bytes behind the backend's back: the local file for posix,
    # the XRootD server's data directory for root and http, the exported directory for
    # our origin. S3 objects are immutable.
    unique = uuid.uuid4().hex[:12]
    if backend == "posix":
        storage: Storage = PosixStorage(f"file://{tmp_path}/{unique}")
        on_disk = tmp_path / unique
    elif backend == "http-origin":
        own: OriginServer = request.getfixturevalue("origin_server")
        storage = HTTPStorage(f"{own.url}/{unique}", token=own.token)
        on_disk = own.data_dir / unique
    else:
        xrootd: XRootDServer = request.getfixturevalue("xrootd_server")
        on_disk = xrootd.data_dir / unique
        url = f"{xrootd.root_url if backend == 'root' else xrootd.http_url}/{unique}"
        storage = _root_storage(url) if backend == "root" else HTTPStorage(url)
    size = 32 * MiB  # far more than socket buffers can hold ahead of the reader
    try:
        await storage.write("shrinks.bin", _payload(size, seed=5))
        with pytest.raises(Corrupt):
            async for _chunk in storage.stream("shrinks.bin", chunk_size=64 * 1024):
                os.truncate(on_disk / "shrinks.bin", 1000)
    finally:
        await storage.close()


async def test_every_backend_refuses_paths_outside_its_root(subject: Subject) -> None:
    # the root's sibling exists on every backend: a `..` must never reach it
    storage = subject.storage
    await storage.write("inside.txt", b"in")
    for bad in ("../secret", "a/../../secret", "x/..", "a\x00b"):
        calls = (lambda p: storage.stat(p), lambda p: storage.write(p, b"x"),
                 lambda p: storage.list(p), lambda p: storage.delete(p),
                 lambda p: storage.read(p))
        for call in calls:
            with pytest.raises(PermissionDenied, match="storage root"):
                await call(bad)
    assert await storage.read("inside.txt") == b"in"


async def test_posix_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"s")
    storage = PosixStorage(f"file://{tmp_path}/root")
    for bad in ("../secret", "a/../../secret", "/etc/passwd"):
        with pytest.raises(PermissionDenied):
            await storage.stat(bad)
        with pytest.raises(PermissionDenied):
            await storage.write(bad, b"x")
        with pytest.raises(PermissionDenied):
            await storage.list(bad)
    assert (tmp_path / "secret").read_bytes() == b"s"


def test_http_status_mapping_stays_in_the_small_set() -> None:
    from stashflow.integration.storage import StorageError, Unsupported

    url = "http://o/ns/f"
    kinds = {404: NotFound, 410: NotFound, 401: PermissionDenied, 403: PermissionDenied,
             400: PermissionDenied, 409: PermissionDenied, 412: PermissionDenied,
             413: PermissionDenied, 405: Unsupported, 501: Unsupported, 416: Corrupt,
             408: Unavailable, 429: Unavailable, 500: Unavailable, 503: Unavailable}
    for status, kind in kinds.items():
        error = error_for_status(url, status, "why")
        assert type(error) is kind and type(error) is not StorageError, status
        assert error.url == url and f"HTTP {status}: why" in error.reason


def test_posix_errno_mapping() -> None:
    # EACCES cannot be provoked for real here: the suite runs as root, and root
    # reads anything. The mapping itself is what the backend relies on.
    url = "file:///x/f"
    assert isinstance(map_os_error(url, OSError(errno.ENOENT, "gone")), NotFound)
    assert isinstance(map_os_error(url, OSError(errno.ENOTDIR, "not a dir")), NotFound)
    assert isinstance(map_os_error(url, OSError(errno.EACCES, "no")), PermissionDenied)
    assert isinstance(map_os_error(url, OSError(errno.EPERM, "no")), PermissionDenied)
    assert isinstance(map_os_error(url, OSError(errno.EIO, "disk")), Unavailable)
    assert "disk" in str(map_os_error(url, OSError(errno.EIO, "disk")))


@pytest.mark.parametrize("backend", ["root", "http"])
async def test_xrootd_path_outside_the_export_is_denied(
    backend: str, xrootd_server: XRootDServer
) -> None:
    base = xrootd_server.root_url if backend == "root" else xrootd_server.http_url
    outside = base.rsplit("/data", 1)[0] + "/not-exported"
    storage = _root_storage(outside) if backend == "root" else HTTPStorage(outside)
    try:
        with pytest.raises(PermissionDenied) as caught:
            await storage.write("f", b"data")
        assert caught.value.url == storage.url_of("f")
    finally:
        await storage.close()


async def test_s3_wrong_secret_is_denied(seaweedfs_server: SeaweedFS, s3_bucket: str) -> None:
    storage = _s3_storage(seaweedfs_server, f"s3://{s3_bucket}/x", secret_key="wrong" * 8)
    with pytest.raises(PermissionDenied):
        await storage.stat("f")
    with pytest.raises(PermissionDenied):
        await storage.write("f", b"data")


@pytest.mark.parametrize("subject", ["s3"], indirect=True)
async def test_s3_multipart_streamed_write(subject: Subject) -> None:
    # Only S3 splits a stream into parts; more than one part takes > PART_SIZE bytes.
    storage = subject.storage
    data = _payload(PART_SIZE + 3 * MiB + 1, seed=7)
    info = await storage.write("multi.bin", _chunks(data, iter(lambda: MiB, 0)))
    assert info.size == len(data)
    assert "md5" not in info.checksums  # a multipart ETag is not the content MD5
    edge = await storage.read("multi.bin", PART_SIZE - 5, 10)
    assert edge == data[PART_SIZE - 5 : PART_SIZE + 5]
    expected = Hasher("md5")
    expected.update(data)
    assert await storage.checksum("multi.bin", "md5") == expected.hexdigest()

    async def breaks_after_two_parts() -> AsyncIterator[bytes]:
        for _ in range(2 * PART_SIZE // MiB + 1):
            yield b"p" * MiB
        raise ValueError("source failed")

    with pytest.raises(ValueError):
        await storage.write("dir/failed.bin", breaks_after_two_parts())
    assert subject.raw_names("dir") == set()  # neither an object nor a pending upload


def test_http_digest_forms() -> None:
    # XrdHttp sends crc32c in base64 (RFC 9530 style), others in hex; md5 is base64.
    assert parse_digest("crc32c=rJwmFg==") == {"crc32c": "ac9c2616"}
    assert parse_digest("crc32c=ac9c2616") == {"crc32c": "ac9c2616"}
    assert parse_digest("adler32=084b021f, md5=sZRqySSS0jR8YjW00mERhA==") == {
        "adler32": "084b021f",
        "md5": "b1946ac92492d2347c6235b4d2611184",
    }


async def test_xcache_serves_the_origin_bytes(
    xrootd_server: XRootDServer, xrootd_workdir: Path
) -> None:
    data = _payload(3 * MiB + 11, seed=6)
    unique = uuid.uuid4().hex[:12]
    origin = _root_storage(f"{xrootd_server.root_url}/{unique}")
    await origin.write("cached.bin", data)
    origin_address = f"127.0.0.1:{xrootd_server.port}"
    with XCacheServer(xrootd_workdir / f"xcache-{unique}", origin=origin_address) as cache:
        through_root = _root_storage(f"{cache.root_url}/{unique}")
        through_http = HTTPStorage(f"{cache.http_url}/{unique}")
        try:
            assert await through_root.read("cached.bin", MiB, 1000) == data[MiB : MiB + 1000]
            assert await through_http.read("cached.bin") == data
            assert await through_root.checksum("cached.bin", "adler32") == (
                await origin.checksum("cached.bin", "adler32")
            )
        finally:
            await through_http.close()
            await through_root.close()
    await origin.close()


# --- conditional reads: one version per read, on the backends with entity tags ---------


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    return await anext(aiter(chunks))


@pytest.mark.parametrize("subject", ["s3", "http-origin"], indirect=True)
async def test_reads_if_match_deliver_that_version_or_nothing(storage: Storage) -> None:
    """A read conditional on the ETag a stat gave returns that version's bytes, and
    after an overwrite raises Changed before yielding a single byte of the new one
    (SeaweedFS answers PreconditionFailed, our origin 412). Not http (XrdHttp 5.5): it
    sends no ETag at all."""
    assert storage.conditional_reads
    old_data, new_data = _payload(300_000, seed=21), _payload(200_000, seed=22)
    old = await storage.write("v/obj.bin", old_data)
    assert old.etag and not old.etag.startswith("W/")
    assert await _collect(storage.stream("v/obj.bin", if_match=old.etag)) == old_data
    assert await _collect(storage.stream("v/obj.bin", 1000, 50, if_match=old.etag)) == (
        old_data[1000:1050]
    )
    assert await storage.checksum("v/obj.bin", "sha256", if_match=old.etag) == (
        hashlib.sha256(old_data).hexdigest()
    )

    new = await storage.write("v/obj.bin", new_data)
    assert new.etag and new.etag != old.etag
    for offset, length in ((0, None), (1000, 50), (1000, None)):
        with pytest.raises(Changed) as caught:
            await _first_chunk(storage.stream("v/obj.bin", offset, length, if_match=old.etag))
        assert caught.value.url == storage.url_of("v/obj.bin")
    with pytest.raises(Changed):
        await storage.checksum("v/obj.bin", "sha256", if_match=old.etag)
    assert await _collect(storage.stream("v/obj.bin", if_match=new.etag)) == new_data

    # No tag, or a weak one (If-Match compares strongly): read by name, as before.
    for tag in (None, f'W/"{old.etag}"'):
        assert await _collect(storage.stream("v/obj.bin", if_match=tag)) == new_data


@pytest.mark.parametrize("subject", ["s3"], indirect=True)
async def test_s3_read_of_another_version_is_refused_when_if_match_is_ignored(
    subject: Subject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 server that ignores IfMatch sends the new version with its own ETag: that
    answer is refused as Changed too, nothing of it delivered."""
    storage = subject.storage
    assert isinstance(storage, S3Storage)
    old = await storage.write("v/obj.bin", b"old version")
    await storage.write("v/obj.bin", b"the new version")
    get_object = storage._client.get_object

    def ignoring_if_match(**kwargs: Any) -> Any:
        assert kwargs.pop("IfMatch") == f'"{old.etag}"'
        return get_object(**kwargs)

    monkeypatch.setattr(storage._client, "get_object", ignoring_if_match)
    with pytest.raises(Changed, match="S3 sent"):
        await _first_chunk(storage.stream("v/obj.bin", if_match=old.etag))


def test_s3_precondition_failed_is_changed() -> None:
    refused = ClientError(
        {
            "Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-"
                      "conditions you specified did not hold"},
            "ResponseMetadata": {"HTTPStatusCode": 412},
        },
        "GetObject",
    )  # fmt: skip
    assert isinstance(s3_error_for("s3://b/k", refused), Changed)
    assert isinstance(error_for_status("http://h/k", 412), PermissionDenied)  # not a read


@pytest.mark.parametrize("subject", ["posix", "root"], indirect=True)
async def test_reads_without_entity_tags_refuse_if_match(storage: Storage) -> None:
    """posix and root:// cannot make a read conditional on an ETag: they say so
    (Unsupported) rather than read whatever the name holds."""
    assert not storage.conditional_reads
    await storage.write("v/obj.bin", b"data")
    for tag in ("abc", 'W/"abc"'):
        with pytest.raises(Unsupported):
            await _first_chunk(storage.stream("v/obj.bin", if_match=tag))
        with pytest.raises(Unsupported):
            await storage.checksum("v/obj.bin", "md5", if_match=tag)
    assert await _collect(storage.stream("v/obj.bin", if_match=None)) == b"data"


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])
