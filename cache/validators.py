"""HTTP validators shared by the cache and the origin: ETags, Last-Modified, and the
conditional headers that use them (RFC 9110 section 13)."""

from __future__ import annotations

import email.utils
import functools
from collections.abc import Mapping


@functools.lru_cache(maxsize=4096)
def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def etag(size: int, mtime: float | None, origin_etag: str | None) -> str:
    """The ETag clients see: the storage's own, quoted, or one made of size and mtime."""
    if origin_etag:
        tag = origin_etag.strip()
        return tag if tag.startswith(('"', 'W/"')) else f'"{tag}"'
    return f'"{size:x}-{int((mtime or 0) * 1e9):x}"'


def _timestamp(value: str | None) -> float | None:
    """An HTTP-date as seconds; None for none or an invalid one, which the conditional
    headers then ignore (RFC 9110 section 13.1)."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def precondition_failed(headers: Mapping[str, str], tag: str, mtime: float | None) -> bool:
    """Whether a request gets 412 (section 13.2.2, evaluated before the others):
    If-Match lists no tag that matches strongly (a reader holding one version, e.g. a
    storage adapter reading in several requests), or, without If-Match, the object
    changed after If-Unmodified-Since."""
    if_match = headers.get("If-Match")
    if if_match is not None:
        tags = {t.strip() for t in if_match.split(",")}
        return not ("*" in tags or (tag in tags and not tag.startswith("W/")))
    since = _timestamp(headers.get("If-Unmodified-Since"))
    return since is not None and mtime is not None and int(mtime) > since


def not_modified(headers: Mapping[str, str], tag: str, mtime: float | None) -> bool:
    """Whether a conditional GET/HEAD gets 304. If-None-Match wins over
    If-Modified-Since (section 13.2.2), and compares weakly."""
    if_none = headers.get("If-None-Match")
    if if_none is not None:
        tags = {t.strip().removeprefix("W/") for t in if_none.split(",")}
        return "*" in tags or tag.removeprefix("W/") in tags
    since = _timestamp(headers.get("If-Modified-Since"))
    return since is not None and mtime is not None and int(mtime) <= since


def range_applies(headers: Mapping[str, str], tag: str, mtime: float | None) -> bool:
    """If-Range: the range is sent only if the object is still the one the client has
    (a strong ETag match, or the same Last-Modified second)."""
    value = headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', 'W/"')):
        return value == tag and not tag.startswith("W/")
    when = _timestamp(value)
    return when is not None and mtime is not None and int(mtime) == int(when)
