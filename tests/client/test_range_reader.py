"""RangeReader, the threaded receiver of large ranges, against a real HTTP server that
misbehaves on request: every failure names the server, and `pos` says how far the bytes
written reach, so the caller keeps them and asks another source for the rest."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stashflow.cache.client.errors import NotFound, Retryable, Stalled
from stashflow.cache.client.range_reader import RangeReader, Redirected
from stashflow.integration.checksums import Hasher

DATA = os.urandom(3 * (1 << 20) + 12345)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        mode = self.path.strip("/")
        first, last = (int(x) for x in self.headers["Range"][6:].split("-"))
        body = DATA[first:last + 1]
        if mode == "missing":
            self._plain(404, b'{"error": "no such object"}')
            return
        if mode == "redirect":
            self.send_response(307)
            self.send_header("Location", "http://elsewhere.example/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "whole":
            self._plain(200, DATA)
            return
        self.send_response(206)
        shift = 1 if mode == "badrange" else 0
        self.send_header("Content-Range", f"bytes {first + shift}-{last}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncated":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if mode == "stall":
            self.wfile.write(body[: 1 << 20])
            self.wfile.flush()
            time.sleep(3)
            return
        self.wfile.write(body)

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the reader hangs up early on purpose in some cases


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _reader(server: str, mode: str, fd: int, start: int, end: int,
            piece: Hasher | None = None, stall_window: float = 30) -> RangeReader:
    seen: list[int] = []
    reader = RangeReader("/ns/obj", server, f"{server}/{mode}", start, end, fd,
                         {"User-Agent": "test"}, piece, connect_timeout=5, header_timeout=5,
                         stall_window=stall_window, min_rate=0, on_bytes=seen.append)
    reader.seen = seen  # type: ignore[attr-defined]
    return reader


def test_a_range_lands_at_its_offset_with_its_checksum(server: str, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, len(DATA))
        start, end = 1000, len(DATA) - 1
        piece = Hasher("crc32c")
        reader = _reader(server, "ok", fd, start, end, piece)
        reader.run()
        assert reader.pos == end + 1
        assert sum(reader.seen) == end - start + 1  # type: ignore[attr-defined]
        assert os.pread(fd, end - start + 1, start) == DATA[start:]
        expected = Hasher("crc32c")
        expected.update(DATA[start:])
        assert piece.hexdigest() == expected.hexdigest()
    finally:
        os.close(fd)


@pytest.mark.parametrize(("mode", "error", "message"), [
    ("missing", NotFound, "no such object"),
    ("whole", Retryable, "ignores Range requests"),
    ("badrange", Retryable, "bad Content-Range"),
    ("truncated", Retryable, "broke off|sent"),
])
def test_failures_are_named_and_keep_what_arrived(server: str, tmp_path: Path, mode: str,
                                                  error: type[Exception],
                                                  message: str) -> None:
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        reader = _reader(server, mode, fd, 0, len(DATA) - 1)
        with pytest.raises(error, match=message) as caught:
            reader.run()
        assert server in str(caught.value)
        # whatever was written is exactly the object's bytes, up to pos
        assert os.pread(fd, reader.pos, 0) == DATA[:reader.pos]
        if mode == "truncated":
            assert 0 < reader.pos < len(DATA)
    finally:
        os.close(fd)


def test_a_stalled_server_is_abandoned_after_the_window(server: str, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        reader = _reader(server, "stall", fd, 0, len(DATA) - 1, stall_window=1)
        started = time.monotonic()
        with pytest.raises(Stalled, match="stalled"):
            reader.run()
        assert time.monotonic() - started < 3
        assert reader.pos == 1 << 20
    finally:
        os.close(fd)


def test_a_redirect_is_handed_back_and_stop_ends_a_transfer(server: str,
                                                             tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(Redirected):
            _reader(server, "redirect", fd, 0, 10).run()
        reader = _reader(server, "stall", fd, 0, len(DATA) - 1)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                reader.run()
            except BaseException as e:
                failure.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 5
        while reader.pos == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        reader.stop()
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert failure and isinstance(failure[0], Retryable)
    finally:
        os.close(fd)
