"""Launchers for the real third-party servers the suite is tested and benchmarked
against (XRootD/XCache, SeaweedFS S3, nginx). Each launcher starts the server on
127.0.0.1 with free ports in a directory of the caller's, waits until it answers, and
stops it (and everything it spawned) on exit."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    """Block until something accepts connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout:.0f}s"
                ) from None
            time.sleep(0.05)
