"""The origin server over a posix directory, with real clients: curl, urllib, raw
sockets and the project's own http storage adapter. One origin process serves the
module: /pub (public reads) and /prot (every request needs a token) over two
directories; an issuer's JWKS file is trusted."""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import pytest

from stashflow.integration.checksums import from_digest_header, to_digest_header
from stashflow.integration.storage import PermissionDenied, open_storage
from tests.origin.harness import (
    AUDIENCE,
    Issuer,
    OriginProcess,
    curl,
    curl_status,
    leftovers,
)

D = "{DAV:}"


@dataclass
class Site:
    origin: OriginProcess
    issuer: Issuer
    pub: Path
    prot: Path

    @property
    def url(self) -> str:
        return self.origin.url


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("origin-posix")
    pub, prot = base / "pub", base / "prot"
    pub.mkdir()
    prot.mkdir()
    issuer = Issuer(base / "keys")
    args = [
        "--export", f"/pub=file://{pub}",
        "--export", f"/prot=file://{prot}",
        "--public-export", "/pub",
        "--issuer", issuer.issuer,
        "--jwks", str(issuer.jwks),
        "--audience", AUDIENCE,
        "--access-log", str(base / "access.log"),
    ]  # fmt: skip
    with OriginProcess(args, base) as origin:
        yield Site(origin, issuer, pub, prot)


def _payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- reads ---------------------------------------------------------------------------------


def test_get_head_and_validators(site: Site) -> None:
    data = _payload(300_000)
    _write(site.pub, "read/obj.bin", data)
    r = site.origin.call("GET", "/pub/read/obj.bin")
    assert r.status == 200 and r.body == data
    etag, modified = r.headers["etag"], r.headers["last-modified"]
    assert etag.startswith('"') and modified.endswith("GMT")
    head = site.origin.call("HEAD", "/pub/read/obj.bin")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(data))
    assert head.headers["etag"] == etag and head.headers["accept-ranges"] == "bytes"
    assert (
        site.origin.call("GET", "/pub/read/obj.bin", headers={"If-None-Match": etag}).status == 304
    )
    since = {"If-Modified-Since": modified}
    assert site.origin.call("GET", "/pub/read/obj.bin", headers=since).status == 304
    # If-Range with a stale validator: the whole object, not the range
    stale = {"Range": "bytes=0-9", "If-Range": '"other"'}
    r = site.origin.call("GET", "/pub/read/obj.bin", headers=stale)
    assert r.status == 200 and len(r.body) == len(data)
    # If-Match: only the version named, compared strongly (RFC 9110 section 13.1.1)
    for value in (etag, f'"other", {etag}', "*"):
        r = site.origin.call("GET", "/pub/read/obj.bin", headers={"If-Match": value})
        assert r.status == 200 and r.body == data, value
    for value in ('"other"', f"W/{etag}"):
        r = site.origin.call("GET", "/pub/read/obj.bin", headers={"If-Match": value})
        assert r.status == 412 and b"no longer the version" in r.body, value
    before = email.utils.formatdate(time.time() - 86400 * 365, usegmt=True)
    unmodified = {"If-Unmodified-Since": before}
    assert site.origin.call("GET", "/pub/read/obj.bin", headers=unmodified).status == 412
    unmodified = {"If-Unmodified-Since": modified}
    assert site.origin.call("GET", "/pub/read/obj.bin", headers=unmodified).status == 200


def test_ranges_single_suffix_multi_and_unsatisfiable(site: Site) -> None:
    data = _payload(100_000, seed=2)
    _write(site.pub, "read/ranges.bin", data)
    url = f"{site.url}/pub/read/ranges.bin"
    code, body = curl_status(curl("-r", "1000-1999", url))
    assert code == 206 and body == data[1000:2000]
    code, body = curl_status(curl("-H", "Range: bytes=-500", url))
    assert code == 206 and body == data[-500:]
    code, body = curl_status(curl("-H", "Range: bytes=99990-", url))
    assert code == 206 and body == data[99990:]

    r = site.origin.call(
        "GET", "/pub/read/ranges.bin", headers={"Range": "bytes=0-9,50000-50099,-10"}
    )
    assert r.status == 206
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/byteranges")
    message = email.message_from_bytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + r.body, policy=email.policy.HTTP
    )
    parts = [(p["Content-Range"], p.get_payload(decode=True)) for p in message.iter_parts()]
    assert parts == [
        ("bytes 0-9/100000", data[:10]),
        ("bytes 50000-50099/100000", data[50000:50100]),
        ("bytes 99990-99999/100000", data[-10:]),
    ]
    r = site.origin.call("GET", "/pub/read/ranges.bin", headers={"Range": "bytes=200000-"})
    assert r.status == 416 and r.headers["content-range"] == "bytes */100000"
    assert r.json()["status"] == 416
    assert (
        site.origin.call("GET", "/pub/read/ranges.bin", headers={"Range": "lines=1-2"}).status
        == 400
    )


def test_want_digest_answers_each_algorithm(site: Site) -> None:
    data = _payload(70_000, seed=3)
    _write(site.pub, "read/sums.bin", data)
    expected = {
        "adler32": f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
        "md5": hashlib.md5(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "crc32c": f"{crc32c.crc32c(data):08x}",
    }
    for http_name, ours in (
        ("adler32", "adler32"),
        ("md5", "md5"),
        ("sha-256", "sha256"),
        ("crc32c", "crc32c"),
    ):
        r = site.origin.call("HEAD", "/pub/read/sums.bin", headers={"Want-Digest": http_name})
        assert from_digest_header(r.headers["digest"]) == {ours: expected[ours]}
    # q-values: the preferred supported algorithm wins
    r = site.origin.call(
        "GET", "/pub/read/sums.bin", headers={"Want-Digest": "md5;q=0.3, sha-256;q=1"}
    )
    assert r.headers["digest"] == to_digest_header("sha256", expected["sha256"])


def _propfind(site: Site, path: str, depth: str | None, token: str | None = None) -> ET.Element:
    headers = {"Depth": depth} if depth is not None else {}
    r = site.origin.call("PROPFIND", path, token=token, headers=headers)
    assert r.status == 207, r.body
    return ET.fromstring(r.body)


def _entries(root: ET.Element) -> dict[str, dict[str, str | bool | None]]:
    out: dict[str, dict[str, str | bool | None]] = {}
    for response in root.iter(f"{D}response"):
        href = response.findtext(f"{D}href")
        assert href is not None
        prop = response.find(f"{D}propstat/{D}prop")
        assert prop is not None
        rtype = prop.find(f"{D}resourcetype")
        out[href] = {
            "collection": rtype is not None and rtype.find(f"{D}collection") is not None,
            "length": prop.findtext(f"{D}getcontentlength"),
            "modified": prop.findtext(f"{D}getlastmodified"),
            "etag": prop.findtext(f"{D}getetag"),
        }
    return out


def test_propfind_depth_0_and_1(site: Site) -> None:
    _write(site.pub, "list/a.bin", b"a" * 10)
    _write(site.pub, "list/with space.bin", b"b" * 20)
    _write(site.pub, "list/sub/c.bin", b"c")
    listing = _entries(_propfind(site, "/pub/list/", "1"))
    assert set(listing) == {
        "/pub/list/",
        "/pub/list/a.bin",
        "/pub/list/with%20space.bin",
        "/pub/list/sub/",
    }
    assert listing["/pub/list/"]["collection"] is True
    assert listing["/pub/list/sub/"]["collection"] is True
    assert listing["/pub/list/a.bin"]["length"] == "10"
    assert listing["/pub/list/with%20space.bin"]["length"] == "20"
    assert listing["/pub/list/a.bin"]["collection"] is False
    assert str(listing["/pub/list/a.bin"]["modified"]).endswith("GMT")
    head = site.origin.call("HEAD", "/pub/list/a.bin")
    assert listing["/pub/list/a.bin"]["etag"] == head.headers["etag"]

    only = _entries(_propfind(site, "/pub/list", "0"))
    assert list(only) == ["/pub/list/"]
    one = _entries(_propfind(site, "/pub/list/a.bin", "1"))
    assert list(one) == ["/pub/list/a.bin"]
    # the export root is a collection too
    assert "/pub/list/" in _entries(_propfind(site, "/pub/", "1"))


def test_propfind_named_properties_and_infinite_depth(site: Site) -> None:
    _write(site.pub, "list2/x.bin", b"x" * 5)
    body = (
        b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:Z="urn:z"><D:prop>'
        b"<D:getcontentlength/><Z:color/></D:prop></D:propfind>"
    )
    r = site.origin.call("PROPFIND", "/pub/list2/x.bin", headers={"Depth": "0"}, data=body)
    assert r.status == 207
    root = ET.fromstring(r.body)
    statuses = {
        ps.findtext(f"{D}status"): [child.tag for child in ps.find(f"{D}prop") or []]
        for ps in root.iter(f"{D}propstat")
    }
    assert statuses == {
        "HTTP/1.1 200 OK": [f"{D}getcontentlength"],
        "HTTP/1.1 404 Not Found": ["{urn:z}color"],
    }
    for headers in ({"Depth": "infinity"}, {}):  # no Depth header means infinity
        r = site.origin.call("PROPFIND", "/pub/list2/", headers=headers)
        assert r.status == 403
        assert ET.fromstring(r.body).find(f"{D}propfind-finite-depth") is not None
    bad = site.origin.call("PROPFIND", "/pub/list2/", headers={"Depth": "1"}, data=b"<nope")
    assert bad.status == 400 and "XML" in bad.json()["error"]


@pytest.mark.parametrize(
    "raw_path",
    ["/pub/../etc/passwd", "/pub//x", "/pub/%2e%2e/x", "/pub/a%00b", "/pub/./x"],
)
def test_bad_paths_are_400(site: Site, raw_path: str) -> None:
    with socket.create_connection(("127.0.0.1", site.origin.port), timeout=10) as s:
        s.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"status": 400' in answer


def test_missing_objects_and_unknown_exports_are_json_404(site: Site) -> None:
    r = site.origin.call("GET", "/pub/nothing/here")
    assert r.status == 404 and r.json()["path"] == "/pub/nothing/here"
    r = site.origin.call("GET", "/elsewhere/x")
    assert r.status == 404 and "no export" in r.json()["error"]
    r = site.origin.call("PATCH", "/pub/x")
    assert r.status == 405 and "PUT" in r.headers["allow"]


# -- tokens --------------------------------------------------------------------------------


def _refusal(
    site: Site, method: str, path: str, token: str | None, **kw: object
) -> tuple[int, str, str]:
    r = site.origin.call(method, path, token=token, **kw)  # type: ignore[arg-type]
    body = r.json()
    return r.status, body["reason"], body["error"]


def test_protected_export_without_token_is_401(site: Site) -> None:
    _write(site.prot, "secret.bin", b"s")
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        r = site.origin.call(method, "/prot/secret.bin", data=b"x" if method == "PUT" else None)
        assert r.status == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        if method != "HEAD":
            assert r.json()["reason"] == "missing_token"
    r = site.origin.call("PROPFIND", "/prot/", headers={"Depth": "1"})
    assert r.status == 401
    assert (site.prot / "secret.bin").read_bytes() == b"s"


def test_read_scope_reads_but_cannot_write(site: Site) -> None:
    _write(site.prot, "team/data.bin", b"team data")
    token = site.issuer.token("storage.read:/prot/team")
    r = site.origin.call("GET", "/prot/team/data.bin", token=token)
    assert r.status == 200 and r.body == b"team data"
    assert _entries(_propfind(site, "/prot/team/", "1", token=token))
    for method, data in (("PUT", b"new"), ("DELETE", None)):
        status, reason, message = _refusal(site, method, "/prot/team/data.bin", token, data=data)
        assert (status, reason) == (403, "insufficient_scope")
        assert "storage.modify" in message and "/prot/team/data.bin" in message
    assert (site.prot / "team/data.bin").read_bytes() == b"team data"
    # the scope stops at path-segment boundaries
    _write(site.prot, "teamx/other.bin", b"o")
    status, reason, message = _refusal(site, "GET", "/prot/teamx/other.bin", token)
    assert (status, reason) == (403, "insufficient_scope")
    assert "does not cover /prot/teamx/other.bin" in message


def test_create_scope_uploads_atomically_but_does_not_overwrite(site: Site) -> None:
    token = site.issuer.token("storage.create:/prot/up", "storage.read:/prot/up")
    data = _payload(3_000_000, seed=4)
    source = site.prot.parent / "upload.bin"
    source.write_bytes(data)
    code, body = curl_status(
        curl(
            "-T", str(source), "-H", f"Authorization: Bearer {token}", f"{site.url}/prot/up/new.bin"
        )
    )
    assert code == 201, body
    assert (site.prot / "up/new.bin").read_bytes() == data
    assert leftovers(site.prot / "up") == ["new.bin"]
    # overwriting needs storage.modify
    code, body = curl_status(
        curl(
            "-T", str(source), "-H", f"Authorization: Bearer {token}", f"{site.url}/prot/up/new.bin"
        )
    )
    assert code == 403 and b"storage.modify" in body
    modify = site.issuer.token("storage.modify:/prot/up")
    r = site.origin.call("PUT", "/prot/up/new.bin", token=modify, data=b"v2")
    assert r.status == 204
    assert (site.prot / "up/new.bin").read_bytes() == b"v2"
    assert site.origin.call("DELETE", "/prot/up/new.bin", token=modify).status == 204
    assert not (site.prot / "up/new.bin").exists()


@pytest.mark.parametrize(
    ("case", "status", "reason", "words"),
    [
        ("expired", 401, "expired", "expired"),
        ("not_yet_valid", 401, "not_yet_valid", "not valid before"),
        ("issued_in_future", 401, "not_yet_valid", "issued in the future"),
        ("wrong_audience", 401, "wrong_audience", "audience"),
        ("wrong_issuer", 401, "wrong_issuer", "not trusted"),
        ("bad_signature", 401, "bad_signature", "signature"),
        ("unknown_kid", 401, "bad_signature", "no ES256 key with kid"),
        ("malformed", 401, "malformed", "not a JWT"),
        ("not_wlcg", 401, "malformed", "wlcg.ver"),
        ("scope_elsewhere", 403, "insufficient_scope", "does not cover"),
        ("scope_prefix_not_segment", 403, "insufficient_scope", "does not cover"),
    ],
)
def test_each_token_failure_says_which(
    site: Site, case: str, status: int, reason: str, words: str
) -> None:
    _write(site.prot, "fail/obj.bin", b"f")
    iss = site.issuer
    now = time.time()
    scope = "storage.read:/prot/fail"
    token = {
        "expired": lambda: iss.token(scope, now=now - 7200, lifetime=3600),
        "not_yet_valid": lambda: iss.token(scope, not_before=now + 3600, lifetime=7200),
        "issued_in_future": lambda: iss.token(scope, now=now + 3600, not_before=now),
        "wrong_audience": lambda: iss.token(scope, audience="https://someone-else.test"),
        "wrong_issuer": lambda: iss.token(scope, issuer="https://evil.test"),
        "bad_signature": lambda: iss.token(scope, key=iss.rogue.private_key, kid="k1"),
        "unknown_kid": lambda: iss.token(scope, kid="k-unknown"),
        "malformed": lambda: "not-a-token",
        "not_wlcg": lambda: iss.token(scope, extra_claims={"wlcg.ver": None}),
        "scope_elsewhere": lambda: iss.token("storage.read:/prot/other"),
        "scope_prefix_not_segment": lambda: iss.token("storage.read:/prot/fai"),
    }[case]()
    r = site.origin.call("GET", "/prot/fail/obj.bin", token=token)
    assert r.status == status
    body = r.json()
    assert body["reason"] == reason
    assert words in body["error"]
    assert token not in r.body.decode()
    if status == 401:
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_hostile_claims_cannot_break_headers(site: Site) -> None:
    token = site.issuer.token("storage.read:/prot", issuer="https://\u00e9vil\r\nX-Evil: 1")
    r = site.origin.call("GET", "/prot/secret.bin", token=token)
    assert r.status == 401 and r.json()["reason"] == "wrong_issuer"
    assert "x-evil" not in r.headers
    assert r.headers["www-authenticate"].isascii()


def test_rs256_tokens_and_authz_query_parameter(site: Site) -> None:
    _write(site.prot, "rs/obj.bin", b"rsa")
    token = site.issuer.token("storage.read:/prot/rs", key=site.issuer.rs.private_key)
    assert site.origin.call("GET", "/prot/rs/obj.bin", token=token).body == b"rsa"
    code, body = curl_status(curl(f"{site.url}/prot/rs/obj.bin?authz=Bearer%20{token}"))
    assert (code, body) == (200, b"rsa")


def test_public_reads_ignore_tokens_but_writes_need_them(site: Site) -> None:
    _write(site.pub, "open.bin", b"open")
    assert site.origin.call("GET", "/pub/open.bin", token="garbage").body == b"open"
    assert site.origin.call("PUT", "/pub/open.bin", data=b"x").status == 401
    read_only = site.issuer.token("storage.read:/pub")
    assert site.origin.call("PUT", "/pub/open.bin", token=read_only, data=b"x").status == 403
    assert (site.pub / "open.bin").read_bytes() == b"open"


def test_tokens_never_reach_the_logs(site: Site) -> None:
    token = site.issuer.token("storage.read:/prot")
    site.origin.call("GET", "/prot/secret.bin", token=token)
    curl(f"{site.url}/prot/secret.bin?authz={token}")
    site.origin.call("GET", "/prot/secret.bin", token=token + "x")  # a refused one too
    time.sleep(0.2)
    logs = (site.prot.parent / "access.log").read_text() + site.origin.log.read_text()
    assert "/prot/secret.bin" in logs
    assert token[:40] not in logs and token.split(".")[2][:20] not in logs


# -- atomic uploads ------------------------------------------------------------------------


def _wait_for(predicate: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_short_body_over_raw_socket_leaves_nothing(site: Site) -> None:
    token = site.issuer.token("storage.modify:/prot/short")
    (site.prot / "short").mkdir(exist_ok=True)
    for close_how in ("shutdown", "close"):
        name = f"cut-{close_how}.bin"
        with socket.create_connection(("127.0.0.1", site.origin.port), timeout=10) as s:
            head = (
                f"PUT /prot/short/{name} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n"
            )
            s.sendall(head.encode() + b"x" * 400_000)
            # the upload is in progress: the backend holds a temp file
            assert _wait_for(lambda: leftovers(site.prot / "short"))
            if close_how == "shutdown":
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(65536)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
        assert _wait_for(lambda: not leftovers(site.prot / "short")), leftovers(site.prot)
    assert site.origin.call("GET", "/prot/short/cut-close.bin", token=token).status in (403, 404)


def test_create_scope_does_not_replace_an_object_created_during_the_upload(site: Site) -> None:
    """The existence check happens when the upload starts; another client creating
    the object before the upload ends must not have its object silently replaced by
    a token that may only create."""
    token = site.issuer.token("storage.create:/prot/race", "storage.read:/prot/race")
    (site.prot / "race").mkdir(exist_ok=True)
    size = 1_000_000
    with socket.create_connection(("127.0.0.1", site.origin.port), timeout=30) as s:
        head = (
            f"PUT /prot/race/obj.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {size}\r\n\r\n"
        )
        s.sendall(head.encode() + b"a" * (size // 2))
        # the temp file exists: the origin checked that the name is free and is writing
        assert _wait_for(lambda: leftovers(site.prot / "race")), "upload never started"
        other = site.origin.call("PUT", "/prot/race/obj.bin", token=token, data=b"theirs")
        assert other.status == 201, other.body
        s.sendall(b"a" * (size - size // 2))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 403"), answer[:300]
    assert b"storage.modify" in rest and b"nothing was stored" in rest
    assert (site.prot / "race" / "obj.bin").read_bytes() == b"theirs"
    assert leftovers(site.prot / "race") == ["obj.bin"]


def test_curl_killed_mid_upload_leaves_nothing(site: Site) -> None:
    token = site.issuer.token("storage.modify:/prot/killed")
    (site.prot / "killed").mkdir(exist_ok=True)
    source = site.prot.parent / "big-upload.bin"
    source.write_bytes(_payload(8 << 20, seed=5))
    proc = subprocess.Popen(
        [
            "curl", "-sS", "-T", str(source), "--limit-rate", "1M",
            "-H", f"Authorization: Bearer {token}",
            f"{site.url}/prot/killed/big.bin",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert _wait_for(lambda: leftovers(site.prot / "killed")), "upload never started"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _wait_for(lambda: not leftovers(site.prot / "killed")), leftovers(site.prot / "killed")


def test_digest_mismatch_stores_nothing_and_keeps_the_old_object(site: Site) -> None:
    token = site.issuer.token("storage.modify:/prot/dg", "storage.read:/prot/dg")
    data = _payload(200_000, seed=6)
    good = to_digest_header("md5", hashlib.md5(data).hexdigest())
    bad = to_digest_header("md5", hashlib.md5(data + b"!").hexdigest())
    r = site.origin.call("PUT", "/prot/dg/obj.bin", token=token, data=data, headers={"Digest": bad})
    assert r.status == 400
    assert "does not match its Digest" in r.json()["error"]
    assert "nothing was stored" in r.json()["error"]
    assert not (site.prot / "dg").exists() or leftovers(site.prot / "dg") == []
    r = site.origin.call(
        "PUT", "/prot/dg/obj.bin", token=token, data=data, headers={"Digest": good}
    )
    assert r.status == 201
    # an overwrite with a wrong digest leaves the previous version in place
    sha = to_digest_header("sha256", hashlib.sha256(b"other").hexdigest())
    r = site.origin.call(
        "PUT", "/prot/dg/obj.bin", token=token, data=b"another", headers={"Digest": sha}
    )
    assert r.status == 400
    assert (site.prot / "dg/obj.bin").read_bytes() == data
    assert leftovers(site.prot / "dg") == ["obj.bin"]
    crc = to_digest_header("crc32c", f"{crc32c.crc32c(b'abc'):08x}")
    r = site.origin.call("PUT", "/prot/dg/c.bin", token=token, data=b"abc", headers={"Digest": crc})
    assert r.status == 201
    r = site.origin.call(
        "PUT", "/prot/dg/d.bin", token=token, data=b"abc", headers={"Digest": "foo=1"}
    )
    assert r.status == 400 and "no supported algorithm" in r.json()["error"]


def test_chunked_upload_and_early_refusal_with_expect(site: Site) -> None:
    token = site.issuer.token("storage.create:/prot/chunked")
    source = site.prot.parent / "chunked.bin"
    data = _payload(1_500_000, seed=7)
    source.write_bytes(data)
    code, _ = curl_status(
        curl(
            "-T", str(source), "-H", "Transfer-Encoding: chunked",
            "-H", f"Authorization: Bearer {token}", f"{site.url}/prot/chunked/obj.bin",
        )
    )  # fmt: skip
    assert code == 201
    assert (site.prot / "chunked/obj.bin").read_bytes() == data
    # curl sends Expect: 100-continue for large bodies: the refusal comes before the body
    code, body = curl_status(curl("-T", str(source), f"{site.url}/prot/chunked/other.bin"))
    assert code == 401 and b"missing_token" in body


# -- namespace operations ------------------------------------------------------------------


def test_mkcol_move_and_delete(site: Site) -> None:
    token = site.issuer.token("storage.modify:/prot/ns", "storage.read:/prot/ns")
    call = site.origin.call
    assert call("MKCOL", "/prot/ns", token=token).status == 201
    assert call("MKCOL", "/prot/ns/", token=token).status == 405
    assert call("MKCOL", "/prot/ns/missing/child", token=token).status == 409
    assert call("MKCOL", "/prot/ns/d", token=token).status == 201
    assert (site.prot / "ns/d").is_dir()

    assert call("PUT", "/prot/ns/d/a.bin", token=token, data=b"A").status == 201
    move = {"Destination": f"{site.url}/prot/ns/d/b.bin"}
    assert call("MOVE", "/prot/ns/d/a.bin", token=token, headers=move).status == 201
    assert (site.prot / "ns/d/b.bin").read_bytes() == b"A"
    assert not (site.prot / "ns/d/a.bin").exists()
    assert call("PUT", "/prot/ns/d/c.bin", token=token, data=b"C").status == 201
    keep = {"Destination": "/prot/ns/d/b.bin", "Overwrite": "F"}
    assert call("MOVE", "/prot/ns/d/c.bin", token=token, headers=keep).status == 412
    replace = {"Destination": "/prot/ns/d/b.bin"}
    assert call("MOVE", "/prot/ns/d/c.bin", token=token, headers=replace).status == 204
    assert (site.prot / "ns/d/b.bin").read_bytes() == b"C"
    across = {"Destination": f"{site.url}/pub/stolen.bin"}
    assert call("MOVE", "/prot/ns/d/b.bin", token=token, headers=across).status == 502
    bad = {"Destination": "/prot/ns/../x"}
    assert call("MOVE", "/prot/ns/d/b.bin", token=token, headers=bad).status == 400
    assert call("MOVE", "/prot/ns/d/nope", token=token, headers=move).status == 404

    assert call("DELETE", "/prot/ns/d", token=token).status == 409  # not empty
    assert call("DELETE", "/prot/ns/d/b.bin", token=token).status == 204
    assert call("DELETE", "/prot/ns/d/b.bin", token=token).status == 404
    assert call("DELETE", "/prot/ns/d", token=token).status == 204
    assert not (site.prot / "ns/d").exists()


def test_create_scope_may_rename_onto_a_new_name_only(site: Site) -> None:
    token = site.issuer.token("storage.create:/prot/ren", "storage.read:/prot/ren")
    call = site.origin.call
    assert call("PUT", "/prot/ren/a", token=token, data=b"a").status == 201
    assert call("PUT", "/prot/ren/b", token=token, data=b"b").status == 201
    assert (
        call("MOVE", "/prot/ren/a", token=token, headers={"Destination": "/prot/ren/c"}).status
        == 201
    )
    r = call("MOVE", "/prot/ren/c", token=token, headers={"Destination": "/prot/ren/b"})
    assert r.status == 403 and "storage.modify" in r.json()["error"]
    assert (site.prot / "ren/b").read_bytes() == b"b"


def test_moves_that_may_not_replace_refuse_a_taken_name_at_the_rename(site: Site) -> None:
    """Without the right to replace (create-only token, or Overwrite: F), the rename
    itself must refuse a taken destination, not only the existence check before it:
    that check can miss the name (it may be created just after it; here, a dangling
    symlink that stat(2) does not see). PUT already commits this way (link(2))."""
    (site.prot / "taken").mkdir()
    create = site.issuer.token("storage.create:/prot/taken", "storage.read:/prot/taken")
    modify = site.issuer.token("storage.modify:/prot/taken", "storage.read:/prot/taken")
    call = site.origin.call
    _write(site.prot, "taken/src", b"source data")
    link = site.prot / "taken/dst"
    link.symlink_to("elsewhere")  # the name is taken, by an entry stat(2) cannot see
    assert call("GET", "/prot/taken/dst", token=create).status == 404

    def intact() -> None:
        assert (site.prot / "taken/src").read_bytes() == b"source data"
        assert link.is_symlink() and os.readlink(link) == "elsewhere"

    # PUT with storage.create only: refused at the commit
    r = call("PUT", "/prot/taken/dst", token=create, data=b"new")
    assert r.status == 403 and r.json()["reason"] == "exists"
    intact()
    # MOVE with storage.create only: 403 as for PUT, the source left as it was
    r = call("MOVE", "/prot/taken/src", token=create, headers={"Destination": "/prot/taken/dst"})
    assert r.status == 403, r.body
    assert r.json()["reason"] == "exists" and "storage.modify" in r.json()["error"]
    intact()
    # storage.modify with Overwrite: F: the precondition fails (412), nothing moves
    keep = {"Destination": "/prot/taken/dst", "Overwrite": "F"}
    assert call("MOVE", "/prot/taken/src", token=modify, headers=keep).status == 412
    intact()
    # COPY is not a method of this origin: it cannot be a way around either
    r = call("COPY", "/prot/taken/src", token=modify, headers={"Destination": "/prot/taken/dst"})
    assert r.status == 405 and "COPY" not in r.headers["allow"]
    intact()
    # storage.modify, Overwrite absent (T): replacing is allowed
    r = call("MOVE", "/prot/taken/src", token=modify, headers={"Destination": "/prot/taken/dst"})
    assert r.status == 201
    assert not link.is_symlink() and link.read_bytes() == b"source data"
    assert not (site.prot / "taken/src").exists()
    # and a create-only rename onto a free name still works (the https adapter's commit)
    r = call("MOVE", "/prot/taken/dst", token=create, headers={"Destination": "/prot/taken/n"})
    assert r.status == 201
    assert leftovers(site.prot / "taken") == ["n"]
    assert (site.prot / "taken/n").read_bytes() == b"source data"
    # directories cannot be linked: renamed after a last look at the name
    _write(site.prot, "taken/d1/f", b"f")
    (site.prot / "taken/d2").mkdir()
    r = call("MOVE", "/prot/taken/d1", token=create, headers={"Destination": "/prot/taken/d2"})
    assert r.status == 403
    r = call("MOVE", "/prot/taken/d1", token=create, headers={"Destination": "/prot/taken/d3"})
    assert r.status == 201
    assert leftovers(site.prot / "taken") == ["d3/f", "n"]


def test_overwrite_header_is_t_or_f(site: Site) -> None:
    """RFC 4918 section 10.6: Overwrite is T or F, absent means T. Any other value is
    refused with 400: "Overwrite: false" must not be read as T and replace the target."""
    token = site.issuer.token("storage.modify:/prot/ow", "storage.read:/prot/ow")
    call = site.origin.call
    _write(site.prot, "ow/a", b"a")
    _write(site.prot, "ow/b", b"b")
    for value in ("false", "0", "no", "TF", ""):
        headers = {"Destination": "/prot/ow/b", "Overwrite": value}
        r = call("MOVE", "/prot/ow/a", token=token, headers=headers)
        assert r.status == 400 and "Overwrite" in r.json()["error"], (value, r.status)
        assert (site.prot / "ow/a").read_bytes() == b"a"
        assert (site.prot / "ow/b").read_bytes() == b"b"
    lower_f = {"Destination": "/prot/ow/b", "Overwrite": "f"}
    assert call("MOVE", "/prot/ow/a", token=token, headers=lower_f).status == 412
    lower_t = {"Destination": "/prot/ow/b", "Overwrite": " t "}
    assert call("MOVE", "/prot/ow/a", token=token, headers=lower_t).status == 204
    assert (site.prot / "ow/b").read_bytes() == b"a"
    assert leftovers(site.prot / "ow") == ["b"]


def test_http_storage_adapter_as_a_client(site: Site) -> None:
    """The project's own https/WebDAV adapter (temp name + MOVE) against the origin."""
    token = site.issuer.token("storage.create:/prot/adapter", "storage.read:/prot/adapter")
    data = _payload(2_500_000, seed=8)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 300_000):
            yield data[i : i + 300_000]

    async def scenario() -> None:
        async with open_storage(f"{site.url}/prot", token=token) as st:
            info = await st.write("adapter/run1/file.bin", chunks())
            assert info.size == len(data)
            assert await st.read("adapter/run1/file.bin", 1000, 5000) == data[1000:6000]
            listing = await st.list("adapter/run1")
            assert [(i.path, i.size) for i in listing] == [("adapter/run1/file.bin", len(data))]
            assert await st.checksum("adapter/run1/file.bin", "adler32") == (
                f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"
            )
            with pytest.raises(PermissionDenied):
                await st.delete("adapter/run1/file.bin")  # create scope: no deletion
            with pytest.raises(PermissionDenied):
                await st.write("adapter/run1/file.bin", b"overwrite")  # nor overwrite

    asyncio.run(scenario())
    assert (site.prot / "adapter/run1/file.bin").read_bytes() == data
    assert leftovers(site.prot / "adapter") == ["run1/file.bin"]


# -- command line --------------------------------------------------------------------------


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["stashflow", "origin", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        check=False,
    )


def test_cli_refuses_bad_configurations_in_one_line(tmp_path: Path) -> None:
    cases = [
        ((), "--export"),
        (("--export", "ns=file:///tmp"), "/NS=STORAGE_URL"),
        (("--export", f"/ns=file://{tmp_path}"), "readable by nobody"),
        (("--export", f"/ns=file://{tmp_path}/missing", "--public"), "does not exist"),
        (("--export", f"/ns=file://{tmp_path}", "--public", "--listen", "nohost"), "HOST:PORT"),
        (
            ("--export", f"/ns=file://{tmp_path}", "--issuer", "https://i", "--jwks", "/nope.json"),
            "does not exist",
        ),
    ]
    for args, words in cases:
        result = _serve(*args)
        assert result.returncode != 0
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    help_text = _serve("--help").stdout
    assert "storage.create" in help_text and "PROPFIND" in help_text
