"""Shared fixtures. Real components only: a test that needs one which is absent skips
with the reason, and with STASHFLOW_REQUIRE_REAL=1 (CI) that skip is a failure."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.fixtures_servers"]


def require_real(component: str, reason: str) -> None:
    """Skip (or, under STASHFLOW_REQUIRE_REAL=1, fail) because `component` is missing."""
    message = f"{component} unavailable: {reason}"
    if os.environ.get("STASHFLOW_REQUIRE_REAL") == "1":
        pytest.fail(message + " (STASHFLOW_REQUIRE_REAL=1 forbids skipping)", pytrace=False)
    pytest.skip(message)
