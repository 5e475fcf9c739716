"""The origin's start-up sweep on an S3 export: a multipart upload that an origin
killed mid-upload left is aborted, a fresh one (a live upload of another origin on the
same bucket) stays, and a sweep the credentials do not allow is a warning, not a failed
start. In-process (the app's start-up hooks), because the stale age is a setting of
OriginConfig with no command-line option; real SeaweedFS."""

from __future__ import annotations

import logging
import uuid

import pytest
from aiohttp import web

from stashflow.cache.origin.server import OriginConfig, make_app
from stashflow.integration.servers.seaweedfs import SeaweedFS

BUCKET = "stashflow-origin-sweep"


@pytest.fixture
def s3_env(seaweedfs_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """Endpoint and keys where an origin's s3:// exports look for them."""
    seaweedfs_server.create_bucket(BUCKET)
    monkeypatch.setenv("STASHFLOW_S3_ENDPOINT", seaweedfs_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs_server.secret_key)
    return seaweedfs_server


async def start_and_stop(prefix: str, stale_upload_age: float) -> None:
    cfg = OriginConfig(
        listen="127.0.0.1:0",
        exports={"/s3": f"s3://{BUCKET}/{prefix}"},
        public={"*"},
        stale_upload_age=stale_upload_age,
    )
    runner = web.AppRunner(make_app(cfg))
    await runner.setup()  # runs the start-up hooks, the sweep among them
    await runner.cleanup()


def uploads(server: SeaweedFS, prefix: str) -> list[str]:
    answer = server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(u["Key"] for u in answer.get("Uploads", []))


async def test_a_stale_multipart_upload_is_aborted_at_start(
    s3_env: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"data-{uuid.uuid4().hex[:8]}"
    s3_env.client().create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/dir/obj.bin")
    caplog.set_level(logging.INFO, logger="stashflow.origin")

    await start_and_stop(prefix, stale_upload_age=3600)  # the default: it is fresh
    assert uploads(s3_env, prefix) == [f"{prefix}/dir/obj.bin"]

    await start_and_stop(prefix, stale_upload_age=0)
    assert uploads(s3_env, prefix) == []
    assert "removed 1 stale multipart upload(s) older than 0s from /s3: dir/obj.bin" in (
        caplog.text
    )


async def test_a_refused_sweep_is_a_warning_not_a_failed_start(
    s3_env: SeaweedFS, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"data-{uuid.uuid4().hex[:8]}"
    s3_env.client().create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/obj.bin")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" * 8)
    caplog.set_level(logging.INFO, logger="stashflow.origin")

    await start_and_stop(prefix, stale_upload_age=0)  # does not raise

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    message = warnings[0].getMessage()
    assert message.startswith("cannot sweep stale uploads of /s3: ")
    assert "listing the multipart uploads" in message and "s3:AbortMultipartUpload" in message
    assert uploads(s3_env, prefix) == [f"{prefix}/obj.bin"]
