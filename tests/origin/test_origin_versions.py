"""One version per GET on an S3 export: the ETag, Content-Length and Digest the origin
sends and the bytes that follow are of the same object, also when a writer replaces it
while the origin answers. In-process (real SeaweedFS behind a real origin app), so that
the replacement can be made to land exactly between the origin's stat and its reads:
the export's reads are wrapped to overwrite the object right before they start."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from stashflow.cache.origin.server import VERSION_ATTEMPTS, OriginConfig, make_app
from stashflow.integration.checksums import from_digest_header
from stashflow.integration.servers import free_port
from stashflow.integration.servers.seaweedfs import SeaweedFS
from stashflow.integration.storage.s3 import S3Storage

BUCKET = "stashflow-origin-versions"
OBJECT = "dir/obj.bin"


@dataclass
class Site:
    url: str  # of the object, through the origin
    writer: S3Storage  # the same object, written behind the origin's back
    session: aiohttp.ClientSession


@pytest.fixture
async def site(seaweedfs_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Site]:
    seaweedfs_server.create_bucket(BUCKET)
    monkeypatch.setenv("STASHFLOW_S3_ENDPOINT", seaweedfs_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs_server.secret_key)
    prefix = f"data-{uuid.uuid4().hex[:8]}"
    port = free_port()
    cfg = OriginConfig(
        listen=f"127.0.0.1:{port}",
        exports={"/s3": f"s3://{BUCKET}/{prefix}"},
        public={"*"},
        access_log=None,
    )
    runner = web.AppRunner(make_app(cfg))
    await runner.setup()
    writer = S3Storage(f"s3://{BUCKET}/{prefix}")
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with aiohttp.ClientSession() as session:
            yield Site(f"{cfg.base_url}/s3/{OBJECT}", writer, session)
    finally:
        await writer.close()
        await runner.cleanup()


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def replace_before_reads(
    monkeypatch: pytest.MonkeyPatch, writer: S3Storage, when: Callable[[int], bool]
) -> list[bytes]:
    """Make the origin's n-th read of the object (counted from 1) first replace it with
    a new version of another size, for each n that `when` picks: a writer between the
    origin's stat and that read. Returns what the replacements stored, in order."""
    stored: list[bytes] = []
    original = S3Storage.stream
    calls = 0

    async def stream(self: S3Storage, path: str, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        nonlocal calls
        if self is not writer:
            calls += 1
            if when(calls):
                data = _payload(150_000 + 1000 * calls, seed=100 + calls)
                await writer.write(OBJECT, data)
                stored.append(data)
        async for chunk in original(self, path, *args, **kwargs):
            yield chunk

    monkeypatch.setattr(S3Storage, "stream", stream)
    return stored


async def test_a_version_replaced_before_the_first_byte_is_answered_from_the_new_one(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = await site.writer.write(OBJECT, _payload(100_000, seed=1))
    stored = replace_before_reads(monkeypatch, site.writer, lambda n: n == 1)

    async with site.session.get(site.url, headers={"Want-Digest": "sha-256"}) as r:
        body = await r.read()
    assert r.status == 200
    assert len(stored) == 1  # the first read (of the digest) found the object replaced
    new = stored[0]
    current = await site.writer.stat(OBJECT)
    assert current.etag != old.etag
    # everything about the answer is of the new version, none of it of the old one
    assert body == new
    assert r.headers["Content-Length"] == str(len(new))
    assert r.headers["ETag"] == f'"{current.etag}"'
    assert from_digest_header(r.headers["Digest"]) == {"sha256": hashlib.sha256(new).hexdigest()}


async def test_a_multi_range_answer_replaced_between_ranges_is_cut_short(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _payload(100_000, seed=2)
    await site.writer.write(OBJECT, old)
    # the first range is read before the headers go out, the second after
    stored = replace_before_reads(monkeypatch, site.writer, lambda n: n == 2)

    received = b""
    async with site.session.get(site.url, headers={"Range": "bytes=0-99,50000-50099"}) as r:
        assert r.status == 206
        promised = int(r.headers["Content-Length"])
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in r.content.iter_any():
                received += chunk
    assert len(stored) == 1
    assert old[:100] in received and len(received) < promised
    assert stored[0][50000:50100] not in received and old[50000:50100] not in received


async def test_an_object_that_keeps_changing_gets_503_after_the_attempts(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    await site.writer.write(OBJECT, _payload(100_000, seed=3))
    stored = replace_before_reads(monkeypatch, site.writer, lambda n: True)

    async with site.session.get(site.url) as r:
        answer = await r.json()
    assert r.status == 503
    assert r.headers["Retry-After"] == "1"
    assert answer["error"] == (
        f"/s3/{OBJECT} was replaced {VERSION_ATTEMPTS} times while being read; try again"
    )
    assert len(stored) == VERSION_ATTEMPTS  # one read per version, none of them sent
