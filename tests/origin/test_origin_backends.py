"""The origin in front of real network storage: S3 (SeaweedFS) and XRootD (root://).
One origin process exports both, public for reads, token-protected for writes; each test
runs against each backend and checks what the backend really holds afterwards."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import random
import socket
import threading
import time
import uuid
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stashflow.integration.checksums import from_digest_header, to_digest_header
from stashflow.integration.servers.seaweedfs import SeaweedFS
from stashflow.integration.servers.xrootd import XRootDServer
from stashflow.integration.storage import open_storage
from tests.cache.harness import Response
from tests.origin.harness import AUDIENCE, Issuer, OriginProcess, curl, curl_status

BUCKET = "stashflow-origin"
D = "{DAV:}"


@dataclass
class Backend:
    name: str
    prefix: str  # export prefix on the origin
    # names the backend holds under a directory, temp and partial objects included
    raw_names: Callable[[str], list[str]]


@dataclass
class Site:
    origin: OriginProcess
    issuer: Issuer
    backends: dict[str, Backend]


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    seaweedfs_server: SeaweedFS,
    xrootd_server: XRootDServer,
) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("origin-backends")
    issuer = Issuer(base / "keys")
    seaweedfs_server.create_bucket(BUCKET)
    s3 = seaweedfs_server.client()

    def s3_names(directory: str) -> list[str]:
        answer = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"data/{directory}/")
        # a key ending in '/' is a directory marker (MKCOL), not an object
        names = [
            o["Key"].split("/", 2)[2]
            for o in answer.get("Contents", [])
            if not o["Key"].endswith("/")
        ]
        uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"data/{directory}/")
        names += [f"(multipart) {u['Key']}" for u in uploads.get("Uploads", [])]
        return sorted(names)

    def xrootd_names(directory: str) -> list[str]:
        root = Path(xrootd_server.data_dir) / directory
        if not root.exists():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    args = [
        "--export", f"/s3=s3://{BUCKET}/data",
        "--export", f"/xrd={xrootd_server.root_url}",
        "--public",
        "--issuer", issuer.issuer,
        "--jwks", str(issuer.jwks),
        "--audience", AUDIENCE,
        "--access-log", "off",
    ]  # fmt: skip
    env = {
        "STASHFLOW_S3_ENDPOINT": seaweedfs_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": seaweedfs_server.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs_server.secret_key,
    }
    with OriginProcess(args, base, env=env) as origin:
        yield Site(
            origin,
            issuer,
            {
                "s3": Backend("s3", "/s3", s3_names),
                "xrootd": Backend("xrootd", "/xrd", xrootd_names),
            },
        )


@pytest.fixture(params=["s3", "xrootd"])
def backend(request: pytest.FixtureRequest, site: Site) -> Backend:
    return site.backends[request.param]


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _wait_for(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_upload_then_read_ranges_digests_and_listing(
    site: Site, backend: Backend, tmp_path: Path
) -> None:
    directory = f"rt-{uuid.uuid4().hex[:8]}"
    path = f"{backend.prefix}/{directory}/obj.bin"
    data = _payload(1_200_000, seed=11)
    source = tmp_path / "obj.bin"
    source.write_bytes(data)
    token = site.issuer.token(f"storage.create:{backend.prefix}/{directory}")
    digest = to_digest_header("md5", hashlib.md5(data).hexdigest())
    code, body = curl_status(
        curl(
            "-T", str(source), "-H", f"Authorization: Bearer {token}",
            "-H", f"Digest: {digest}", site.origin.url + path,
        )
    )  # fmt: skip
    assert code == 201, body
    assert backend.raw_names(directory) == ["obj.bin"]

    code, body = curl_status(curl(site.origin.url + path))
    assert code == 200 and body == data
    code, body = curl_status(curl("-r", "500000-500999", site.origin.url + path))
    assert code == 206 and body == data[500000:501000]
    r = site.origin.call("GET", path, headers={"Range": "bytes=0-99,-100"})
    assert r.status == 206
    message = email.message_from_bytes(
        f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode() + r.body,
        policy=email.policy.HTTP,
    )
    assert [p.get_payload(decode=True) for p in message.iter_parts()] == [data[:100], data[-100:]]

    head = site.origin.call("HEAD", path, headers={"Want-Digest": "adler32"})
    assert head.headers["content-length"] == str(len(data))
    assert "etag" in head.headers
    assert from_digest_header(head.headers["digest"]) == {
        "adler32": f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"
    }

    r = site.origin.call("PROPFIND", f"{backend.prefix}/{directory}/", headers={"Depth": "1"})
    assert r.status == 207
    root = ET.fromstring(r.body)
    lengths = {
        resp.findtext(f"{D}href"): resp.findtext(f"{D}propstat/{D}prop/{D}getcontentlength")
        for resp in root.iter(f"{D}response")
    }
    # collections carry a length of 0, as XrdHttp and Pelican origins send (pelicanfs needs it)
    assert lengths == {f"{backend.prefix}/{directory}/": "0", path: str(len(data))}


def test_failed_uploads_leave_nothing(site: Site, backend: Backend) -> None:
    directory = f"fail-{uuid.uuid4().hex[:8]}"
    token = site.issuer.token(f"storage.modify:{backend.prefix}/{directory}")
    path = f"{backend.prefix}/{directory}/obj.bin"
    data = _payload(300_000, seed=12)
    wrong = to_digest_header("sha256", hashlib.sha256(b"something else").hexdigest())
    r = site.origin.call("PUT", path, token=token, data=data, headers={"Digest": wrong})
    assert r.status == 400 and "Digest" in r.json()["error"]
    assert backend.raw_names(directory) == []

    # a body cut short on the wire: nothing may appear, not even after a while
    with socket.create_connection(("127.0.0.1", site.origin.port), timeout=10) as s:
        s.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:100_000]
        )
        time.sleep(0.3)
    time.sleep(0.5)
    assert not _wait_for(lambda: bool(backend.raw_names(directory)), timeout=1)
    assert site.origin.call("HEAD", path).status == 404
    r = site.origin.call("PUT", path, data=data)
    assert r.status == 401


def test_mkcol_move_delete(site: Site, backend: Backend) -> None:
    directory = f"ns-{uuid.uuid4().hex[:8]}"
    token = site.issuer.token(f"storage.modify:{backend.prefix}/{directory}")
    call = site.origin.call
    base = f"{backend.prefix}/{directory}"
    assert call("MKCOL", base, token=token).status == 201
    assert call("PROPFIND", base + "/", headers={"Depth": "0"}).status == 207
    assert call("PUT", f"{base}/a.bin", token=token, data=b"payload").status == 201
    moved = call("MOVE", f"{base}/a.bin", token=token, headers={"Destination": f"{base}/b.bin"})
    assert moved.status == 201
    assert call("GET", f"{base}/b.bin").body == b"payload"
    assert call("GET", f"{base}/a.bin").status == 404
    assert call("DELETE", f"{base}/b.bin", token=token).status == 204
    assert call("GET", f"{base}/b.bin").status == 404
    assert backend.raw_names(directory) == []
    assert call("DELETE", base, token=token).status == 204
    assert call("PROPFIND", base + "/", headers={"Depth": "0"}).status == 404


@pytest.mark.parametrize(
    ("scope", "headers", "status"),
    [
        ("storage.create", {}, 403),  # may not replace: refused as PUT refuses, 403
        ("storage.modify", {"Overwrite": "F"}, 412),  # may, but was asked not to
    ],
)
def test_move_does_not_replace_a_target_created_during_the_copy(
    site: Site, scope: str, headers: dict[str, str], status: int
) -> None:
    """On S3 a MOVE copies the object through the origin and then deletes the source.
    The destination was free when the MOVE started; another client creating it while
    the copy runs must not have its object replaced by a MOVE that may not replace,
    and the source must stay."""
    backend = site.backends["s3"]
    directory = f"mvrace-{uuid.uuid4().hex[:8]}"
    base = f"{backend.prefix}/{directory}"
    mover = site.issuer.token(f"{scope}:{base}")
    other = site.issuer.token(f"storage.create:{base}")
    data = _payload(48 << 20, seed=14)
    assert site.origin.call("PUT", f"{base}/src.bin", token=mover, data=data).status == 201

    answer: dict[str, Response] = {}

    def move() -> None:
        answer["move"] = site.origin.call(
            "MOVE",
            f"{base}/src.bin",
            token=mover,
            headers={"Destination": f"{base}/dst.bin", **headers},
        )

    thread = threading.Thread(target=move)
    thread.start()
    try:
        # the copy to dst.bin is under way once its multipart upload exists
        copying = _wait_for(lambda: any("multipart" in n for n in backend.raw_names(directory)))
        theirs = site.origin.call("PUT", f"{base}/dst.bin", token=other, data=b"theirs")
    finally:
        thread.join(timeout=120)
    assert copying, "the MOVE never started copying"
    assert theirs.status == 201, "the MOVE finished before the other client's PUT"
    moved = answer["move"]
    assert moved.status == status, moved.body
    if status == 403:
        assert moved.json()["reason"] == "exists" and "storage.modify" in moved.json()["error"]
    assert site.origin.call("GET", f"{base}/dst.bin").body == b"theirs"
    source = site.origin.call("GET", f"{base}/src.bin")
    assert source.status == 200 and source.body == data
    assert backend.raw_names(directory) == ["dst.bin", "src.bin"]


def test_http_storage_adapter_writes_through_the_origin(site: Site, backend: Backend) -> None:
    directory = f"ad-{uuid.uuid4().hex[:8]}"
    token = site.issuer.token(f"storage.create:{backend.prefix}/{directory}")
    data = _payload(2_000_000, seed=13)

    async def scenario() -> None:
        async with open_storage(f"{site.origin.url}{backend.prefix}", token=token) as st:
            await st.write(f"{directory}/x.bin", data)
            assert await st.read(f"{directory}/x.bin", 10, 20) == data[10:30]
            assert [i.path for i in await st.list(directory)] == [f"{directory}/x.bin"]

    asyncio.run(scenario())
    assert backend.raw_names(directory) == ["x.bin"]
