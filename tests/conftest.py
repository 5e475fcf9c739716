"""Shared fixtures. Real components only: a test that needs one which is absent skips
with the reason, and with STASHFLOW_REQUIRE_REAL=1 (CI) that skip is a failure."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures_servers"]


def require_real(component: str, reason: str) -> None:
    """Skip (or, under STASHFLOW_REQUIRE_REAL=1, fail) because `component` is missing."""
    message = f"{component} unavailable: {reason}"
    if os.environ.get("STASHFLOW_REQUIRE_REAL") == "1":
        pytest.fail(message + " (STASHFLOW_REQUIRE_REAL=1 forbids skipping)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def small_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A small tmpfs that really fills up (`size=12m` unless parametrised with other
    mount options, e.g. `nr_inodes`)."""
    options = getattr(request, "param", "size=12m")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        require_real("tmpfs", "mounting a small filesystem needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        require_real("tmpfs", f"mount failed: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
