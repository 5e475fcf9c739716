"""Large bodies received by splice(2): the receiving loop on a socket pair, the checksum
over the written range, which responses are spliced, and `stashcp` through a real cache
and through caches that cut a body short or stall in the middle of it."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from stashflow.cache.client import splice
from stashflow.cache.client.errors import EXIT_OK, EXIT_PERMANENT
from stashflow.cache.client.transfer import Client, Options
from stashflow.integration.checksums import Hasher
from tests.cache.harness import CacheProcess
from tests.client.conftest import MiB, http_server, stashcp

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="os.splice is Linux-only")


@contextmanager
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    b.setblocking(False)  # as asyncio leaves the sockets it hands over
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _receive(sock: socket.socket, fd: int, offset: int, count: int, **kw: object) -> int:
    reported: list[int] = []
    options: dict = {"window": 30.0, "min_rate": 1.0, "stop": threading.Event()}
    options.update(kw)
    n = splice.receive(sock.fileno(), fd, offset, count, report=reported.append, **options)
    assert sum(reported) == n
    return n


def test_body_lands_at_its_offset_and_nothing_else_moves(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 11)
    path = tmp_path / "f"
    path.write_bytes(b"x" * (5 * MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        with pair() as (sender, receiver):
            feeder = threading.Thread(target=sender.sendall, args=(data + b"next response",))
            feeder.start()
            assert _receive(receiver, fd, 12345, len(data)) == len(data)
            feeder.join()
            # exactly the body was taken: what follows it is still in the socket
            receiver.setblocking(True)
            assert receiver.recv(100) == b"next response"
    finally:
        os.close(fd)
    content = path.read_bytes()
    assert content[:12345] == b"x" * 12345
    assert content[12345 : 12345 + len(data)] == data
    assert content[12345 + len(data) :] == b"x" * (5 * MiB - 12345 - len(data))


def test_a_body_cut_short_says_how_much_landed(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pair() as (sender, receiver):
            sender.sendall(b"a" * 5000)
            sender.close()
            with pytest.raises(splice.Interrupted) as info:
                _receive(receiver, fd, 0, 10000)
    finally:
        os.close(fd)
    assert info.value.received == 5000 and not info.value.stalled
    assert (tmp_path / "f").read_bytes() == b"a" * 5000


def test_a_stalled_body_is_abandoned(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pair() as (sender, receiver):
            sender.sendall(b"b" * 1000)  # then nothing, the connection still open
            with pytest.raises(splice.Interrupted) as info:
                _receive(receiver, fd, 0, MiB, window=0.3, min_rate=float(MiB))
    finally:
        os.close(fd)
    assert info.value.stalled and info.value.received == 1000
    assert "1000 bytes in" in info.value.reason


def test_stop_ends_the_thread(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    stop = threading.Event()
    stop.set()
    try:
        with pair() as (_sender, receiver), pytest.raises(splice.Interrupted) as info:
            _receive(receiver, fd, 0, MiB, stop=stop)
    finally:
        os.close(fd)
    assert info.value.reason == "cancelled"


@pytest.mark.parametrize("algorithm", ["crc32c", "adler32", "md5", "sha256"])
def test_range_checksum_matches_the_bytes(tmp_path: Path, algorithm: str) -> None:
    data = os.urandom(20 * MiB + 3)
    path = tmp_path / "f"
    path.write_bytes(data)
    start, length = 4097, 17 * MiB + 5  # neither page- nor step-aligned
    expected = Hasher(algorithm)
    expected.update(data[start : start + length])
    got = Hasher(algorithm)
    fd = os.open(path, os.O_RDWR)
    try:
        splice.hash_range(fd, start, length, [got])
    finally:
        os.close(fd)
    assert got.hexdigest() == expected.hexdigest()


class _Transport:
    def __init__(self, sock: socket.socket, tls: bool) -> None:
        self.extra = {"socket": sock, "ssl_object": object() if tls else None}
        self.paused = False

    def get_extra_info(self, name: str) -> object:
        return self.extra.get(name)

    def pause_reading(self) -> None:
        self.paused = True


class _Content:
    def read_nowait(self) -> bytes:
        return b"head of the body"


class _Response:
    """What `_splice_from` looks at in an aiohttp response."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        tls: bool = False,
        length: int = 8 * MiB,
        chunked: bool = False,
    ) -> None:
        self.headers = {"Content-Length": str(length)}
        if chunked:
            self.headers["Transfer-Encoding"] = "chunked"
        self.connection = type("Conn", (), {"transport": _Transport(sock, tls)})()
        self.content = _Content()


@pytest.mark.parametrize(
    ("case", "options", "spliced"),
    [
        ({}, {}, True),
        ({"tls": True}, {}, False),  # HTTPS: the bytes on the socket are encrypted
        ({"chunked": True}, {}, False),
        ({"length": 7 * MiB}, {}, False),  # Content-Length is not the range asked for
        ({}, {"rate_limit": float(MiB)}, False),  # the limiter paces the buffered path
        ({}, {"splice": False}, False),
    ],
)
def test_which_bodies_are_spliced(case: dict, options: dict, spliced: bool) -> None:
    client = Client(Options(**options))
    with pair() as (_sender, receiver):
        resp = _Response(receiver, **case)
        got = client._splice_from(resp, 8 * MiB)  # type: ignore[arg-type]
        transport = resp.connection.transport
        if spliced:
            assert got == (receiver.fileno(), b"head of the body") and transport.paused
        else:
            assert got is None and not transport.paused
    # a small body never is
    with pair() as (_sender, receiver):
        assert Client(Options())._splice_from(_Response(receiver, length=MiB), MiB) is None  # type: ignore[arg-type]


# --- stashcp through real and misbehaving caches ------------------------------------


def test_large_ranges_arrive_by_splice_or_buffered_alike(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path
) -> None:
    data = (origin_dir / "big.bin").read_bytes()
    for label, env in (("splice", {}), ("buffered", {"STASHFLOW_CLIENT_SPLICE": "false"})):
        out = tmp_path / label
        out.mkdir()
        r = stashcp("-d", "--json", "--cache", cache.url, "--chunk-size", "8MiB",
                    "/ns/big.bin", str(out), env=env)  # fmt: skip
        assert r.code == EXIT_OK, r.stderr
        assert (out / "big.bin").read_bytes() == data
        t = r.json()["transfers"][0]
        assert t["checksum"] == f"crc32c:{_crc32c(data)}" and t["checksum_failures"] == 0
        spliced = sum(int(n) for n in re.findall(r"(\d+) bytes from \S+ by splice", r.stderr))
        # the first range's start comes with the headers, the rest by splice
        assert (spliced > 20 * MiB) if label == "splice" else (spliced == 0)


class _BadCache(BaseHTTPRequestHandler):
    """Answers like a cache, then misbehaves in the middle of the body: `mode` "short"
    closes the connection after 1 MiB, "stall" keeps it open and sends nothing more."""

    data = b""
    mode = "short"
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()

    def do_GET(self) -> None:
        first, last = 0, len(self.data) - 1
        found = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if found:
            first = int(found.group(1))
            last = min(int(found.group(2) or last), last)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.wfile.write(self.data[first : min(first + MiB, last + 1)])
        self.wfile.flush()
        if self.mode == "stall":
            threading.Event().wait(20)
        self.close_connection = True


@contextmanager
def bad_cache(data: bytes, mode: str) -> Iterator[str]:
    handler = type("Handler", (_BadCache,), {"data": data, "mode": mode})
    with http_server(handler) as url:
        yield url


@pytest.mark.parametrize("mode", ["short", "stall"])
def test_a_cache_failing_mid_body_is_left_for_the_next(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path, mode: str
) -> None:
    """What the bad cache sent before failing is kept (and counted in the checksum);
    the rest comes from the good cache; the file is identical and verified."""
    data = (origin_dir / "big.bin").read_bytes()
    with bad_cache(data, mode) as bad:
        r = stashcp("-d", "--json", "--cache", f"{bad},{cache.url}", "--chunk-size", "8MiB",
                    "--chunks", "2", "--stall-window", "0.5s", "--min-rate", "1MiB",
                    "/ns/big.bin", str(tmp_path), timeout=120)  # fmt: skip
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "big.bin").read_bytes() == data
    t = r.json()["transfers"][0]
    assert t["checksum"] == f"crc32c:{_crc32c(data)}" and t["checksum_failures"] == 0
    assert bad in t["servers"] and cache.url in t["servers"]
    assert re.search(rf"\d+ bytes from {re.escape(bad)} by splice", r.stderr)
    if mode == "stall":
        assert "stalled" in r.stderr


@pytest.mark.parametrize("small_fs", ["size=4m"], indirect=True)
def test_a_full_disk_is_a_local_error_and_leaves_no_destination(
    cache: CacheProcess, small_fs: Path
) -> None:
    """24 MiB into a 4 MiB filesystem: the splice of the first 8 MiB range into the file
    fails with ENOSPC, which is the local disk's fault (exit 13, not retried on other
    caches), said in one line."""
    r = stashcp("--json", "--cache", cache.url, "--chunk-size", "8MiB", "/ns/big.bin",
                str(small_fs))  # fmt: skip
    assert r.code == EXIT_PERMANENT, r.stderr
    t = r.json()["transfers"][0]
    assert not t["ok"] and "No space left on device" in t["error"]
    assert t["attempts"] == [] or all(a["server"] == cache.url for a in t["attempts"])
    assert not (small_fs / "big.bin").exists()
    line = [ln for ln in r.stderr.splitlines() if "big.bin" in ln]
    assert len(line) == 1 and "No space left on device" in line[0]


def _crc32c(data: bytes) -> str:
    h = Hasher("crc32c")
    h.update(data)
    return h.hexdigest()
