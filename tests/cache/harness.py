"""Running real cache processes (and a misbehaving HTTP origin) for the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stashflow.integration.servers import free_port, wait_for_port
from stashflow.integration.servers.service import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 60,
) -> Response:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(
                resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
            )
    except urllib.error.HTTPError as e:
        return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


@dataclass
class CacheProcess:
    directory: Path
    origins: dict[str, str]
    size: str = "1GiB"
    workers: int = 1
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    service: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.service.proc if self.service else None

    @property
    def log(self) -> Path:
        assert self.service is not None
        return self.service.log

    def start(self) -> CacheProcess:
        self.port = self.port or free_port()
        args = ["--dir", str(self.directory), "--size", self.size,
                "--workers", str(self.workers),
                "--access-log", str(self.directory.parent / f"access-{self.port}.log")]
        for ns, url in self.origins.items():
            args += ["--origin", f"{ns}={url}"]
        self.service = ServiceProcess("cache", args + self.extra, self.directory.parent,
                                      env=self.env, port=self.port).start()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.service is not None:
            self.service.stop(sig)

    def kill9(self) -> None:
        """kill -9 the supervisor and every worker, as a crash would."""
        assert self.proc is not None
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        assert self.service is not None
        self.service.proc = None
        for pid in pids:  # wait for forked workers to be gone before restarting
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.05)

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> Response:
        return request(self.url + path, method=method, headers=headers)

    def admin(
        self, path: str, payload: dict[str, Any] | None = None, token: str | None = None
    ) -> Response:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return request(
            f"{self.url}/.stashflow/{path}",
            method="POST" if payload is not None else "GET",
            headers=headers,
            data=json.dumps(payload).encode() if payload is not None else None,
        )

    def metrics(self) -> dict[str, float]:
        """Sum of each metric over its labels, plus 'name{labels}' entries."""
        text = request(self.url + "/metrics").body.decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = re.sub(r"\{.*\}", "", name_labels)
            out[name] = out.get(name, 0.0) + float(value)
            out[name_labels] = float(value)
        return out

    def wait_cached(self, path: str, timeout: float = 20) -> None:
        """Until the whole object is on the cache's disk. A miss is served while its
        blocks are written behind it, so the response can end before they are all
        committed; another worker only sees committed blocks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for obj in self.admin(f"objects?prefix={path}").json()["objects"]:
                if obj["path"] == path and obj["complete"]:
                    return
            time.sleep(0.02)
        raise AssertionError(f"{path} not fully cached after {timeout}s")

    def origin_bytes(self) -> float:
        return self.metrics().get("stashflow_cache_origin_bytes_total", 0.0)

    def __enter__(self) -> CacheProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


@dataclass
class MisbehavingOrigin:
    """tests/cache/origin_app.py in a subprocess: serves a directory over HTTP, with
    misbehaviours chosen per request by a path prefix."""

    directory: Path
    # for /hold/: the offset where responses stop, and the file created when one does
    hold_at: int = 0
    marker: Path | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MisbehavingOrigin:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("origin_app.py")),
                str(self.port),
                str(self.directory),
                *([str(self.hold_at), str(self.marker)] if self.marker else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
