"""Session-wide real servers: one XRootD origin (root:// + XrdHttp) and one SeaweedFS
S3 endpoint, started on first use and stopped at the end of the run."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stashflow.integration.servers.seaweedfs import SeaweedFS, seaweedfs_available
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
