"""Fixtures for the job-side client: real cache processes in front of posix origins,
and `stashcp` run as a real command."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stashflow.integration.servers import free_port
from stashflow.integration.servers.service import ServiceProcess
from tests.cache.harness import ROOT, CacheProcess
from tests.conftest import require_real

MiB = 1 << 20


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def stashcp(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> Run:
    """Run the real command line (as installed: stashflow.cache.client.stashcp:main)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STASHFLOW_CLIENT_", "BEARER_TOKEN")) and k != "STASHFLOW_DIRECTOR"
    }
    # keep runs independent of a token lying around on the machine
    base["XDG_RUNTIME_DIR"] = str(cwd or ROOT)
    base.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "stashflow.cache.client.stashcp", *args],
        capture_output=True,
        text=True,
        env=base,
        cwd=cwd or ROOT,
        timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def stashcp_killing(cache: CacheProcess, ready: Callable[[], bool], *args: str,
                    wait: float = 20, finish: float = 60,
                    env: dict[str, str] | None = None) -> Run:
    """Run stashcp with `args`; once `ready()` holds while it is still transferring,
    kill -9 `cache` (a crash in the middle of the download), and let stashcp finish."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stashflow.cache.client.stashcp", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + wait
        while not ready():
            assert proc.poll() is None, f"stashcp ended before the kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "stashcp never got far enough for the kill"
            time.sleep(0.05)
        assert proc.poll() is None, "download finished before the cache could be killed"
        cache.kill9()
        stdout, stderr = proc.communicate(timeout=finish)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Run(proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def origin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("origin")
    (root / "small.txt").write_bytes(b"hello stashflow\n")
    (root / "medium.bin").write_bytes(os.urandom(3 * MiB + 17))
    (root / "big.bin").write_bytes(os.urandom(24 * MiB + 5))
    (root / "empty").write_bytes(b"")
    many = root / "many"
    many.mkdir()
    for i in range(40):
        (many / f"f{i:03d}.dat").write_bytes(os.urandom(1000 + 97 * i))
    (root / "table.csv").write_text(
        "id,name,value\n" + "".join(f"{i},row{i},{i * 1.5}\n" for i in range(500))
    )
    return root


@pytest.fixture(scope="module")
def caches(
    origin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CacheProcess, CacheProcess]]:
    d = tmp_path_factory.mktemp("caches")
    a = CacheProcess(d / "a", {"/ns": f"file://{origin_dir}"}).start()
    try:
        b = CacheProcess(d / "b", {"/ns": f"file://{origin_dir}"}).start()
    except Exception:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def cache(caches: tuple[CacheProcess, CacheProcess]) -> CacheProcess:
    return caches[0]


def access_log(cache: CacheProcess) -> list[dict[str, Any]]:
    path = cache.directory.parent / f"access-{cache.port}.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server of `handler` on a free port, for servers that misbehave
    on purpose; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def dead_url() -> str:
    """A URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


ISSUER = "https://issuer.stashflow.test"


def _cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "stashflow.integration.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@dataclass
class Origin:
    url: str
    data: Path
    key: Path

    def token(self, *scopes: str) -> str:
        args = ["token", "issue", "--key", str(self.key), "--issuer", ISSUER]
        for s in scopes:
            args += ["--scope", s]
        return _cli(*args)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    if importlib.util.find_spec("stashflow.cache.origin.cli") is None:
        require_real("origin server", "stashflow.cache.origin is not in this tree")
    base = tmp_path_factory.mktemp("webdav")
    data = base / "data"
    (data / "tree" / "sub" / "deeper").mkdir(parents=True)
    (data / "tree" / "a.txt").write_bytes(b"alpha\n")
    (data / "tree" / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (data / "tree" / "sub" / "deeper" / "c.dat").write_bytes(os.urandom(5000))
    (data / "tree" / "run1.log").write_bytes(b"1")
    (data / "tree" / "run2.log").write_bytes(b"22")
    (data / "up").mkdir()
    keys = base / "issuer"
    key = Path(json.loads(_cli("token", "keygen", "--out", str(keys)))["private_key"])
    if not key.is_absolute():
        key = ROOT / key
    with ServiceProcess("origin", [
        "--export", f"/ns=file://{data}", "--public-export", "/ns", "--issuer", ISSUER,
        "--jwks", str(keys / "jwks.json"), "--access-log", "off",
    ], base) as service:
        yield Origin(service.url, data, key)
