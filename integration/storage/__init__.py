"""Storage adapters: one async interface (base.Storage), one module per backend.

`open_storage(url)` picks the backend from the URL scheme:

    file:///srv/data            posix directory
    http(s)://host/path         HTTP with WebDAV listings (XrdHttp, our origin, nginx...)
    s3://bucket/prefix          S3 (boto3); endpoint from options or STASHFLOW_S3_ENDPOINT
    root://host:port//path      XRootD (the `xrootd` Python bindings)
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from stashflow.integration.storage.base import (
    CHECKSUM_ALGORITHMS,
    AlreadyExists,
    Changed,
    Corrupt,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    Storage,
    StorageError,
    Unavailable,
    Unsupported,
)

_BACKENDS = {
    "file": ("stashflow.integration.storage.posix", "PosixStorage"),
    "http": ("stashflow.integration.storage.http", "HTTPStorage"),
    "https": ("stashflow.integration.storage.http", "HTTPStorage"),
    "s3": ("stashflow.integration.storage.s3", "S3Storage"),
    "root": ("stashflow.integration.storage.root", "RootStorage"),
    "roots": ("stashflow.integration.storage.root", "RootStorage"),
}


def open_storage(url: str, **options: Any) -> Storage:
    """The backend for `url`. A bare path is taken as a local directory."""
    scheme = urlsplit(url).scheme or "file"
    if scheme == "file" and not url.startswith("file:"):
        url = "file://" + url
    try:
        module_name, class_name = _BACKENDS[scheme]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"{url}: unknown storage scheme {scheme!r} (known: {known})") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    storage: Storage = cls(url, **options)
    return storage


__all__ = [
    "CHECKSUM_ALGORITHMS",
    "AlreadyExists",
    "Changed",
    "Corrupt",
    "NotFound",
    "ObjectInfo",
    "PermissionDenied",
    "Storage",
    "StorageError",
    "Unavailable",
    "Unsupported",
    "open_storage",
]
