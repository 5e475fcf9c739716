"""What a writer killed mid-upload leaves on S3, and `S3Storage.remove_stale_temps`,
which removes it: an incomplete multipart upload (parts invisible, but stored until
aborted). `write` commits with one PUT or a completed multipart upload and never goes
through a temporary object, so multipart uploads are all there is to sweep. Real
SeaweedFS; the killed writer is simulated by starting an upload directly with boto3 and
never finishing it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from stashflow.integration.servers.seaweedfs import SeaweedFS
from stashflow.integration.storage import NotFound, PermissionDenied
from stashflow.integration.storage import s3 as s3_module
from stashflow.integration.storage.s3 import S3Storage

BUCKET = "stashflow-sweep"
HOUR = 3600.0


@pytest.fixture(scope="module")
def bucket(seaweedfs_server: SeaweedFS) -> str:
    seaweedfs_server.create_bucket(BUCKET)
    return BUCKET


@pytest.fixture
async def storage(seaweedfs_server: SeaweedFS, bucket: str) -> AsyncIterator[S3Storage]:
    """An S3 storage on a fresh prefix of the bucket."""
    s3 = S3Storage(
        f"s3://{bucket}/sweep-{uuid.uuid4().hex[:12]}",
        endpoint_url=seaweedfs_server.endpoint_url,
        access_key=seaweedfs_server.access_key,
        secret_key=seaweedfs_server.secret_key,
    )
    try:
        yield s3
    finally:
        await s3.close()


def killed_writer(client: Any, bucket: str, key: str, parts: int = 1) -> str:
    """What a writer killed with -9 in the middle of `S3Storage.write` leaves: a
    multipart upload with some parts and no completion. Returns its upload id."""
    upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    for number in range(1, parts + 1):
        client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=b"p" * 1000
        )
    return upload_id


def pending(client: Any, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """(key, upload id) of the multipart uploads the server holds under `prefix`."""
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
    return sorted((u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", []))


async def test_a_killed_writers_upload_is_aborted_once_stale(
    seaweedfs_server: SeaweedFS, storage: S3Storage
) -> None:
    """A fresh upload stays (it may be a live one of another process); once older than
    the limit it is aborted and its object path returned. Uploads outside the
    storage's prefix, even under a key that merely starts with it, are not touched."""
    client = seaweedfs_server.client()
    prefix = storage.prefix
    upload = killed_writer(client, storage.bucket, f"{prefix}/deep/er/obj.bin", parts=2)
    other = killed_writer(client, storage.bucket, f"{prefix}-sibling/obj.bin")
    try:
        assert await storage.remove_stale_temps(HOUR) == []
        assert pending(client, storage.bucket, f"{prefix}/") == [
            (f"{prefix}/deep/er/obj.bin", upload)
        ]

        assert await storage.remove_stale_temps(0) == ["deep/er/obj.bin"]
        assert pending(client, storage.bucket, f"{prefix}/") == []
        assert pending(client, storage.bucket, f"{prefix}-sibling/") == [
            (f"{prefix}-sibling/obj.bin", other)
        ]
        assert await storage.remove_stale_temps(0) == []  # nothing left to sweep
        with pytest.raises(NotFound):
            await storage.stat("deep/er/obj.bin")  # nothing was committed either
    finally:
        client.abort_multipart_upload(
            Bucket=storage.bucket, Key=f"{prefix}-sibling/obj.bin", UploadId=other
        )


async def test_a_long_upload_still_sending_parts_is_alive(
    seaweedfs_server: SeaweedFS, storage: S3Storage
) -> None:
    """The age is that of the last thing written, as for a posix temp file: an upload
    started before the limit but given a part since is a live one and stays."""
    client = seaweedfs_server.client()
    key = f"{storage.prefix}/long.bin"
    upload = killed_writer(client, storage.bucket, key, parts=0)
    await asyncio.sleep(4)  # S3 times have whole seconds: well past a 3 s limit
    client.upload_part(
        Bucket=storage.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"recent"
    )
    assert await storage.remove_stale_temps(3) == []
    assert pending(client, storage.bucket, key) == [(key, upload)]
    assert await storage.remove_stale_temps(0) == ["long.bin"]
    assert pending(client, storage.bucket, key) == []


async def test_every_page_of_the_listing_is_swept(
    seaweedfs_server: SeaweedFS, storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More uploads than fit in a page of ListMultipartUploads, two of them for the
    same object: each is aborted, and returned, once."""
    monkeypatch.setattr(s3_module, "LIST_PAGE_SIZE", 2)
    client = seaweedfs_server.client()
    names = ["a.bin", "a.bin", "b/c.bin", "d.bin", "e/f/g.bin"]
    for name in names:
        killed_writer(client, storage.bucket, f"{storage.prefix}/{name}")
    assert await storage.remove_stale_temps(0) == sorted(names)
    assert pending(client, storage.bucket, f"{storage.prefix}/") == []


class RestrictedSeaweedFS(SeaweedFS):
    """SeaweedFS with, besides the admin, identities allowed only some actions."""

    IDENTITIES = {"writer": ["Write"], "reader": ["Read", "List"]}

    def _write_s3_config(self) -> None:
        super()._write_s3_config()
        config = json.loads(self.config_path.read_text())
        for name, actions in self.IDENTITIES.items():
            keys = {"accessKey": f"{name}-access", "secretKey": f"{name}-secret-0123456789"}
            config["identities"].append({"name": name, "credentials": [keys], "actions": actions})
        self.config_path.write_text(json.dumps(config))

    def storage_as(self, name: str, url: str) -> S3Storage:
        return S3Storage(
            url,
            endpoint_url=self.endpoint_url,
            access_key=f"{name}-access",
            secret_key=f"{name}-secret-0123456789",
        )


@pytest.fixture(scope="module")
def restricted(
    seaweedfs_server: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RestrictedSeaweedFS]:
    # seaweedfs_server: skips (or fails) the same way when SeaweedFS is not available
    with RestrictedSeaweedFS(tmp_path_factory.mktemp("seaweedfs-restricted")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.mark.parametrize(
    ("user", "doing", "permission"),
    [
        ("writer", "listing the multipart uploads", "s3:ListBucketMultipartUploads"),
        ("reader", "aborting multipart upload {upload}", "s3:AbortMultipartUpload"),
    ],
)
async def test_credentials_that_may_not_sweep_get_a_clear_error(
    restricted: RestrictedSeaweedFS, user: str, doing: str, permission: str
) -> None:
    """Listing or aborting multipart uploads refused: PermissionDenied (a StorageError,
    which the origin logs as a warning) naming what it was doing and what the
    credentials lack; nothing aborted."""
    client = restricted.client()
    prefix = user[0]
    upload = killed_writer(client, BUCKET, f"{prefix}/obj.bin")
    storage = restricted.storage_as(user, f"s3://{BUCKET}/{prefix}")
    try:
        with pytest.raises(PermissionDenied) as caught:
            await storage.remove_stale_temps(0)
        message = str(caught.value)
        assert doing.format(upload=upload) in message and "AccessDenied" in message
        assert permission in message
        assert pending(client, BUCKET, f"{prefix}/") == [(f"{prefix}/obj.bin", upload)]
    finally:
        await storage.close()
