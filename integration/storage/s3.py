"""S3 backend (s3://bucket/prefix) on boto3.

boto3 is synchronous; calls run in the default thread pool on one client per storage
(boto3 clients are thread-safe). An S3 PUT or a completed multipart upload is atomic
by itself, so writes need no temporary object. What a writer that dies mid-upload
(kill -9) leaves is an incomplete multipart upload: invisible, but stored (and billed)
until aborted, which `remove_stale_temps` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from stashflow.integration.storage.base import (
    DEFAULT_CHUNK,
    STALE_TEMP_AGE,
    Changed,
    Corrupt,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    Storage,
    StorageError,
    Unavailable,
    check_range,
    strong_etag,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_T = TypeVar("_T")

# Parts of a multipart upload: S3's minimum is 5 MiB (except the last part).
PART_SIZE = 8 << 20
# Entries asked for per ListMultipartUploads / ListParts page (S3's maximum is 1000).
LIST_PAGE_SIZE = 1000
# What the credentials need for remove_stale_temps, named in its errors.
_SWEEP_PERMISSIONS = (
    "s3:ListBucketMultipartUploads, s3:ListMultipartUploadParts and s3:AbortMultipartUpload"
)
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED_CODES = {
    "AccessDenied",
    "Forbidden",
    "403",
    "401",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}


def error_for(url: str, exc: Exception) -> StorageError:
    """The storage error for a failed boto3 call on `url`."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        reason = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(url, reason)
        if code in _DENIED_CODES or status in (401, 403):
            return PermissionDenied(url, reason)
        if code == "PreconditionFailed" or status == 412:
            return Changed(url, reason + " (the object has another ETag now)")
        if code == "InvalidRange" or status == 416:
            return Corrupt(url, reason + " (range beyond the end of the object)")
        if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout"):
            return Unavailable(url, reason)
        return StorageError(url, reason)
    if isinstance(exc, NoCredentialsError):
        return PermissionDenied(url, "no S3 credentials configured")
    if isinstance(exc, IncompleteReadError | ResponseStreamingError):
        return Corrupt(url, f"response body ended early: {exc}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return Unavailable(url, str(exc))
    return Unavailable(url, f"{type(exc).__name__}: {exc}")


def _md5_from_etag(head: dict[str, Any]) -> str | None:
    """S3's ETag is the content MD5 only for single-part uploads without KMS/SSE-C
    encryption; a multipart ETag looks like '<hex>-<parts>'."""
    etag = str(head.get("ETag", "")).strip('"').lower()
    encrypted = head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm")
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) and not encrypted:
        return etag
    return None


def _close_after(read: asyncio.Future[bytes], body: Any) -> None:
    if not read.cancelled():
        read.exception()  # retrieved: nobody else will look at it any more
    body.close()


class S3Storage(Storage):
    """A bucket, or a prefix in one; "directories" are '/'-separated key prefixes."""

    scheme = "s3"
    conditional_reads = True

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        timeout: float = 30,
    ) -> None:
        super().__init__(url)
        parts = urlsplit(self.url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"{url}: not an s3://bucket[/prefix] URL")
        self.bucket = parts.netloc
        self.prefix = unquote(parts.path).strip("/")
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or os.environ.get("STASHFLOW_S3_ENDPOINT") or None,
            aws_access_key_id=access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region_name=region,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 3, "mode": "standard"},
                # Path-style works with every S3 implementation and with IP endpoints.
                s3={"addressing_style": "path"},
            ),
        )

    def _key(self, path: str) -> str:
        path = self.inside(path.strip("/"))
        if self.prefix and path:
            return f"{self.prefix}/{path}"
        return self.prefix or path

    async def _call(self, url: str, fn: Callable[..., _T], **kwargs: Any) -> _T:
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise error_for(url, exc) from exc

    async def stat(self, path: str) -> ObjectInfo:
        url = self.url_of(path)
        key = self._key(path)
        try:
            head = await self._call(url, self._client.head_object, Bucket=self.bucket, Key=key)
        except NotFound:
            # No object, but keys below it make it a directory as far as we are concerned.
            if await self._has_children(url, key):
                return ObjectInfo(path=path, size=0, is_dir=True)
            raise
        md5 = _md5_from_etag(dict(head))
        modified = head.get("LastModified")
        return ObjectInfo(
            path=path,
            size=int(head["ContentLength"]),
            mtime=modified.timestamp() if modified else None,
            etag=str(head.get("ETag", "")).strip('"') or None,
            checksums={"md5": md5} if md5 else {},
        )

    async def _has_children(self, url: str, key: str) -> bool:
        answer = await self._call(
            url,
            self._client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=f"{key}/" if key else "",
            MaxKeys=1,
        )
        return bool(answer.get("KeyCount") or answer.get("Contents"))

    async def stream(
        self,
        path: str,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        *,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        check_range(offset, length, chunk_size)
        url = self.url_of(path)
        key = self._key(path)
        if length == 0:
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        tag = strong_etag(if_match)
        if tag is not None:
            kwargs["IfMatch"] = f'"{tag}"'
        if length is not None:
            kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset > 0:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            answer = await self._call(url, self._client.get_object, **kwargs)
        except Corrupt:
            if length is None:
                return  # offset at or past the end: the rest of the object is nothing
            raise
        body = answer["Body"]
        sent = str(answer.get("ETag", "")).strip('"')
        if tag is not None and sent and sent != tag:
            # A server that ignores IfMatch must not hand over another version either.
            body.close()
            raise Changed(url, f"asked for ETag {tag}, S3 sent {sent}")
        expected = int(answer["ContentLength"])
        if length is not None and expected != length:
            body.close()
            raise Corrupt(url, f"asked for {length} bytes at {offset}, S3 promised {expected}")
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[bytes] | None = None
        received = 0
        try:
            while received < expected:
                pending = loop.run_in_executor(
                    None, body.read, min(chunk_size, expected - received)
                )
                try:
                    # shield: on cancellation `pending` keeps tracking the real read.
                    chunk = await asyncio.shield(pending)
                except (ClientError, BotoCoreError) as exc:
                    raise error_for(url, exc) from exc
                except OSError as exc:
                    raise Unavailable(url, f"reading the body failed: {exc}") from exc
                if not chunk:
                    raise Corrupt(
                        url, f"short read: got {received} of {expected} bytes from offset {offset}"
                    )
                received += len(chunk)
                yield chunk
        finally:
            # Closing the connection under a read still running in a thread would race it.
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _f: _close_after(_f, body))
            else:
                body.close()

    async def write(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        url = self.url_of(path)
        key = self._key(path)
        if not path:
            raise PermissionDenied(url, "cannot write over the storage root")
        if isinstance(data, bytes | bytearray | memoryview):
            await self._put(url, key, bytes(data))
            return await self.stat(path)
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []

        async def send_part(piece: bytes) -> None:
            nonlocal upload_id
            if upload_id is None:
                created = await self._call(
                    url, self._client.create_multipart_upload, Bucket=self.bucket, Key=key
                )
                upload_id = created["UploadId"]
            parts.append(await self._upload_part(url, key, upload_id, len(parts) + 1, piece))

        try:
            async for chunk in data:
                buffer += chunk
                while len(buffer) >= PART_SIZE:
                    piece = bytes(buffer[:PART_SIZE])
                    del buffer[:PART_SIZE]
                    await send_part(piece)
            if upload_id is None:
                await self._put(url, key, bytes(buffer))
            else:
                if buffer:
                    await send_part(bytes(buffer))
                await self._call(
                    url,
                    self._client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                upload_id = None
        finally:
            if upload_id is not None:
                # The parts are invisible but stored (and billed) until aborted; if the
                # abort fails too, remove_stale_temps takes them at the next start.
                await asyncio.shield(self._abort_quietly(key, upload_id))
        return await self.stat(path)

    async def _put(self, url: str, key: str, body: bytes) -> None:
        await self._call(url, self._client.put_object, Bucket=self.bucket, Key=key, Body=body)

    async def _upload_part(
        self, url: str, key: str, upload_id: str, number: int, body: bytes
    ) -> dict[str, Any]:
        answer = await self._call(
            url,
            self._client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
        )
        return {"ETag": answer["ETag"], "PartNumber": number}

    async def _abort(self, key: str, upload_id: str) -> None:
        await asyncio.to_thread(
            self._client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id
        )

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):
            await self._abort(key, upload_id)

    async def remove_stale_temps(self, older_than: float = STALE_TEMP_AGE) -> list[str]:
        """Abort the incomplete multipart uploads under this storage's prefix that
        writers which died mid-upload left (a crash or kill -9 runs no cleanup, and S3
        keeps their parts, invisible but stored, until aborted): those initiated more
        than `older_than` seconds ago and given no part since. Younger ones may belong
        to a live upload of another process sharing this storage, so they stay.
        Returns the object paths, relative to the root, of the aborted uploads (one
        per upload). `write` never goes through a temporary object, so there is
        nothing else to remove.

        The ages are the server's timestamps against this host's clock. A refused
        listing or abort raises PermissionDenied naming the permissions it needs."""
        cutoff = time.time() - older_than
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            stale = await asyncio.to_thread(self._stale_uploads, prefix, cutoff)
        except (ClientError, BotoCoreError) as exc:
            raise self._sweep_error(self.url, "listing the multipart uploads", exc) from exc
        removed: list[str] = []
        for key, upload_id in stale:
            url = f"s3://{self.bucket}/{key}"
            try:
                await self._abort(key, upload_id)
            except (ClientError, BotoCoreError) as exc:
                error = self._sweep_error(url, f"aborting multipart upload {upload_id}", exc)
                if isinstance(error, NotFound):
                    continue  # completed, or aborted by someone else, meanwhile
                raise error from exc
            removed.append(key[len(prefix) :])
        return sorted(removed)

    def _stale_uploads(self, prefix: str, cutoff: float) -> list[tuple[str, str]]:
        """(key, upload id) of the multipart uploads under `prefix` neither initiated
        nor given a part after `cutoff` (a Unix time). Blocking: runs in a thread."""
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
        )
        # The whole listing first: nothing is aborted while its pages are being read.
        old = [
            (upload["Key"], upload["UploadId"])
            for page in pages
            for upload in page.get("Uploads", [])
            if "Key" in upload
            and "UploadId" in upload
            and len(upload["Key"]) > len(prefix)
            and upload["Key"].startswith(prefix)
            # no start time, no age: left alone
            and "Initiated" in upload
            and upload["Initiated"].timestamp() <= cutoff
        ]
        stale: list[tuple[str, str]] = []
        for key, upload_id in old:
            # A long upload started long ago but still sending parts is alive.
            parts = self._client.get_paginator("list_parts").paginate(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PaginationConfig={"PageSize": LIST_PAGE_SIZE},
            )
            try:
                recent = any(
                    "LastModified" in part and part["LastModified"].timestamp() > cutoff
                    for page in parts
                    for part in page.get("Parts", [])
                )
            except ClientError as exc:
                if isinstance(error_for(self.url, exc), NotFound):
                    continue  # completed or aborted meanwhile
                raise
            if not recent:
                stale.append((key, upload_id))
        return stale

    @staticmethod
    def _sweep_error(url: str, doing: str, exc: Exception) -> StorageError:
        """The error of remove_stale_temps: the kind error_for says, with what it was
        doing and, when refused, what the credentials lack."""
        error = error_for(url, exc)
        reason = f"{doing} to sweep those of crashed writers failed: {error.reason}"
        if isinstance(error, PermissionDenied):
            reason += f" (the credentials need {_SWEEP_PERMISSIONS})"
        return type(error)(url, reason)

    async def delete(self, path: str) -> None:
        url = self.url_of(path)
        key = self._key(path)
        # DeleteObject succeeds for a missing key; the interface promises NotFound.
        await self._call(url, self._client.head_object, Bucket=self.bucket, Key=key)
        await self._call(url, self._client.delete_object, Bucket=self.bucket, Key=key)

    async def list(self, path: str = "") -> list[ObjectInfo]:
        path = path.strip("/")
        url = self.url_of(path)
        key = self._key(path)
        prefix = f"{key}/" if key else ""
        rel_prefix = f"{path}/" if path else ""
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(url, self._client.list_objects_v2, **kwargs)
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(prefix) :].strip("/")
                if name:
                    out.append(ObjectInfo(path=rel_prefix + name, size=0, is_dir=True))
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if not name:
                    continue  # a "folder marker" object for the directory itself
                modified = item.get("LastModified")
                out.append(
                    ObjectInfo(
                        path=rel_prefix + name,
                        size=int(item.get("Size", 0)),
                        mtime=modified.timestamp() if modified else None,
                        etag=str(item.get("ETag", "")).strip('"') or None,
                    )
                )
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        # S3 has no empty directories: a prefix with nothing below does not exist.
        if path and not out:
            raise NotFound(url, "no such directory (no keys under this prefix)")
        out.sort(key=lambda info: info.path)
        return out

    async def server_checksum(self, path: str, algorithm: str) -> str | None:
        if algorithm == "md5":
            # only a single-part upload's ETag is the md5 of the content
            return (await self.stat(path)).checksums.get("md5")
        return None
