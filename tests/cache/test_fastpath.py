"""The small-object fast path (cache/fastpath.py), over raw keep-alive connections:
it must answer exactly like the full handler, hand anything else over in order, and
never serve what the full handler would not."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.cache.harness import CacheProcess


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[str, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))  # 304 has no body
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    buf[:] = rest[length:]
    return lines[0], headers, rest[:length]


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: cache\r\nUser-Agent: t\r\n{extra}\r\n".encode()


@pytest.fixture
def cache(tmp_path: Path):  # type: ignore[no-untyped-def]
    src = tmp_path / "o"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha " * 100)
    (src / "b.txt").write_bytes(os.urandom(5000))
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{src}"},
                      extra=["--revalidate-ttl", "1s"],
                      env={"STASHFLOW_CACHE_ACCESS_FLUSH": "1s"}) as c:
        c.src = src  # type: ignore[attr-defined]
        yield c


def test_fast_hits_match_the_full_handler(cache: CacheProcess) -> None:
    src: Path = cache.src  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        buf = bytearray()
        s.sendall(_get("/ns/a.txt"))  # miss: the full handler (aiohttp) answers
        status1, h1, body1 = _read_response(s, buf)
        assert "server" in h1 and h1["x-stashflow-cache"] == "miss"
    cache.wait_cached("/ns/a.txt")  # the miss's bytes are committed behind the response
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        buf = bytearray()
        s.sendall(_get("/ns/a.txt"))
        status2, h2, body2 = _read_response(s, buf)
    assert status1 == status2 == "HTTP/1.1 200 OK"
    assert "server" not in h2 and h2["x-stashflow-cache"] == "hit"  # the fast path
    assert body1 == body2 == (src / "a.txt").read_bytes()
    for name in ("etag", "last-modified", "content-length", "content-type", "accept-ranges"):
        assert h1[name] == h2[name], name
    assert "date" in h2


def test_pipelined_requests_stay_in_order_across_the_hand_over(cache: CacheProcess) -> None:
    src: Path = cache.src  # type: ignore[attr-defined]
    a, b = (src / "a.txt").read_bytes(), (src / "b.txt").read_bytes()
    cache.get("/ns/a.txt")
    cache.get("/ns/b.txt")
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        buf = bytearray()
        s.sendall(_get("/ns/a.txt") + _get("/ns/b.txt", "Range: bytes=0-9\r\n")
                  + _get("/ns/a.txt") + _get("/ns/missing.txt") + _get("/ns/b.txt"))
        answers = [_read_response(s, buf) for _ in range(5)]
    assert [x[0].split()[1] for x in answers] == ["200", "206", "200", "404", "200"]
    assert answers[0][2] == a and answers[1][2] == b[:10]
    assert answers[2][2] == a and answers[4][2] == b
    assert answers[0][1]["x-stashflow-cache"] == "hit"


def test_fast_path_declines_what_needs_the_full_handler(cache: CacheProcess) -> None:
    src: Path = cache.src  # type: ignore[attr-defined]
    cache.get("/ns/a.txt")
    etag = cache.get("/ns/a.txt").headers["etag"]
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        buf = bytearray()
        s.sendall(_get("/ns/a.txt", f"If-None-Match: {etag}\r\n"))
        assert _read_response(s, buf)[0].split()[1] == "304"
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        buf = bytearray()
        s.sendall(_get("/ns/../a.txt"))
        assert _read_response(s, buf)[0].split()[1] == "400"
    # a change at the origin is seen once the revalidation TTL has passed
    (src / "a.txt").write_bytes(b"changed!")
    os.utime(src / "a.txt", (time.time() + 10, time.time() + 10))
    time.sleep(1.2)
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        buf = bytearray()
        s.sendall(_get("/ns/a.txt"))
        assert _read_response(s, buf)[2] == b"changed!"


def test_fast_hits_are_counted(cache: CacheProcess) -> None:
    cache.get("/ns/a.txt")
    before = cache.metrics()["stashflow_cache_hits_total"]
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        buf = bytearray()
        s.sendall(_get("/ns/a.txt") * 20)
        for _ in range(20):
            assert _read_response(s, buf)[1]["x-stashflow-cache"] == "hit"
    time.sleep(0.8)  # counts are added to the shared counters every half second
    assert cache.metrics()["stashflow_cache_hits_total"] >= before + 20
    # access counts reach the index within access_flush (at once from the worker that
    # answers the listing)
    deadline = time.monotonic() + 1 + 2
    while True:
        hits = {o["path"]: o["hits"] for o in cache.admin("objects").json()["objects"]}
        if hits["/ns/a.txt"] >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hits["/ns/a.txt"] >= 20
