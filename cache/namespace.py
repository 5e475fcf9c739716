"""Namespaces (`/ns` -> origin storage) and the validation of request paths."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from stashflow.integration.storage import Storage, open_storage

MAX_PATH = 4096
MAX_SEGMENT = 255
# one regular-expression scan: a generator over the characters took over half of the
# time of checking a path, which every request does
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadPath(ValueError):
    """The request path can never name an object (400)."""


def clean_path(raw_path: str, decoded_path: str) -> str:
    """Validate a request path and return it normalised.

    Both the raw (percent-encoded) and decoded forms are checked so that `%2e%2e` or
    `%00` cannot slip past. Paths with '..' or '.' segments, empty segments ('//'),
    NUL or control characters, or over-long names are refused rather than
    normalised: a cache must never guess which file a strange path means."""
    for path in (raw_path, decoded_path):
        if not path.startswith("/"):
            raise BadPath("path must be absolute")
    if len(decoded_path.encode()) > MAX_PATH:
        raise BadPath(f"path longer than {MAX_PATH} bytes")
    if _CONTROL.search(decoded_path):
        raise BadPath("path contains NUL or control characters")
    if decoded_path.endswith("/"):
        raise BadPath("path ends with '/': a directory is not an object")
    for seg in decoded_path[1:].split("/"):
        if seg in ("", ".", ".."):
            raise BadPath(f"path segment {seg!r} is not allowed ('..', '.', '//')")
        if len(seg.encode()) > MAX_SEGMENT:
            raise BadPath(f"path segment longer than {MAX_SEGMENT} bytes")
    return decoded_path


@dataclass
class Namespace:
    prefix: str  # "/ns", no trailing slash
    origin_url: str  # the origin's URL; several, comma-separated, for an origin set
    storage: Storage
    protected: bool = False  # reads need a token with storage.read covering the path

    def relative(self, path: str) -> str:
        return path[len(self.prefix) :].lstrip("/")


def _norm(prefix: str) -> str:
    norm = "/" + prefix.strip("/")
    if norm == "/":
        raise ValueError("namespace '/' is not allowed: name it, e.g. /ns")
    return norm


class NamespaceMap:
    """Longest-prefix match of object paths to namespaces. Namespaces come from the
    configuration and, in a federation, from the director (see `update`)."""

    def __init__(
        self,
        origins: dict[str, list[str]],
        protected: set[str] | None = None,
        origin_token: str | None = None,
    ) -> None:
        self._spaces: list[Namespace] = []
        self._origin_token = origin_token
        protected = {_norm(p) for p in protected or ()}
        for prefix, urls in origins.items():
            norm = _norm(prefix)
            self._spaces.append(
                Namespace(norm, ", ".join(urls), self._open(urls), norm in protected)
            )
        self._sort()

    def _open(self, urls: list[str]) -> Storage:
        def one(url: str) -> Storage:
            if self._origin_token and url.startswith(("http://", "https://")):
                return open_storage(url, token=self._origin_token)
            return open_storage(url)

        if len(urls) == 1:
            return one(urls[0])
        from stashflow.cache.origins import OriginSet

        return OriginSet([one(url) for url in urls])

    def _sort(self) -> None:
        # longest prefix first so that /ns/sub wins over /ns
        self._spaces.sort(key=lambda ns: len(ns.prefix), reverse=True)

    def update(self, learned: dict[str, tuple[list[str], bool]]) -> list[Storage]:
        """Apply the director's namespace map {prefix: (origin URLs, protected)}.
        Locally configured namespaces are kept as they are; learned ones are added or
        changed. Returns storages no longer used (for the caller to close)."""
        retired: list[Storage] = []
        current = {ns.prefix: ns for ns in self._spaces}
        for prefix, (urls, protected) in learned.items():
            norm = _norm(prefix)
            ns = current.get(norm)
            shown = ", ".join(urls)
            if ns is None:
                self._spaces.append(Namespace(norm, shown, self._open(urls), protected))
            elif ns.origin_url != shown:
                retired.append(ns.storage)
                ns.origin_url, ns.storage = shown, self._open(urls)
                ns.protected = ns.protected or protected
            else:
                ns.protected = ns.protected or protected
        self._sort()
        return retired

    def __iter__(self) -> Iterator[Namespace]:
        return iter(self._spaces)

    def match(self, path: str) -> Namespace | None:
        for ns in self._spaces:
            if path == ns.prefix or path.startswith(ns.prefix + "/"):
                return ns
        return None

    async def close(self) -> None:
        for ns in self._spaces:
            await ns.storage.close()
