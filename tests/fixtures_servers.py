"""Session-wide real servers: one XRootD origin (root:// + XrdHttp), one SeaweedFS S3
endpoint and one of our own origins (`stashflow origin serve` over a posix directory),
each started on first use and stopped at the end of the run."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from stashflow.integration import tokens
from stashflow.integration.servers.seaweedfs import SeaweedFS, seaweedfs_available
from stashflow.integration.servers.service import ServiceProcess
from stashflow.integration.servers.xrootd import XRootDServer, xrootd_available
from tests.conftest import require_real


@pytest.fixture(scope="session")
def xrootd_workdir() -> Iterator[Path]:
    """A directory the `xrootd` user can reach: pytest's temp root is mode 0700 and
    owned by whoever runs the tests, which xrootd (switched to its user) cannot enter."""
    workdir = Path(tempfile.mkdtemp(prefix="stashflow-xrootd-"))
    workdir.chmod(0o755)
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def xrootd_server(xrootd_workdir: Path) -> Iterator[XRootDServer]:
    reason = xrootd_available()
    if reason is not None:
        require_real("XRootD", reason)
    with XRootDServer(xrootd_workdir / "origin") as server:
        yield server


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    reason = seaweedfs_available()
    if reason is not None:
        require_real("SeaweedFS", reason)
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


ORIGIN_ISSUER = "https://issuer.stashflow.test"
ORIGIN_EXPORT = "/conformance"


@dataclass
class OriginServer:
    """`stashflow origin serve` exporting `data_dir` (posix) as `url` (<origin>/<export>),
    and a token that may read, create and modify everything in the export."""

    url: str
    data_dir: Path
    token: str
    service: ServiceProcess

    def stop(self) -> None:
        self.service.stop()


@contextmanager
def own_origin(base: Path) -> Iterator[OriginServer]:
    """Our origin over a fresh posix directory below `base`, stopped on leaving."""
    if importlib.util.find_spec("stashflow.cache.origin.cli") is None:
        require_real("origin server", "stashflow.cache.origin is not in this tree")
    data = base / "data"
    data.mkdir(parents=True)
    key = tokens.keygen(base / "issuer", kid="conformance")
    scopes = [f"storage.{right}:{ORIGIN_EXPORT}" for right in ("read", "create", "modify")]
    # The default audience (WLCG "any") is one every origin accepts.
    token = tokens.issue(key.private_key, ORIGIN_ISSUER, scopes, lifetime=24 * 3600)
    args = [
        "--export", f"{ORIGIN_EXPORT}=file://{data}",
        "--issuer", ORIGIN_ISSUER,
        "--jwks", str(key.jwks),
        "--access-log", "off",
    ]  # fmt: skip
    with ServiceProcess("origin", args, base) as service:
        yield OriginServer(service.url + ORIGIN_EXPORT, data, token, service)


@pytest.fixture(scope="session")
def origin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginServer]:
    with own_origin(tmp_path_factory.mktemp("own-origin")) as server:
        yield server
