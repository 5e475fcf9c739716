"""Naming objects and finding where to read them: object URLs, the Pelican director
protocol (discovery document, 307 + `Link` + `X-Pelican-Namespace`), WebDAV listings.

See ../shared/reference/pelican-director.md (in the repository: the director protocol).
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

REMOTE_SCHEMES = ("stash", "osdf", "pelican")
DIRECT_SCHEMES = ("http", "https")
GLOB_CHARS = re.compile(r"[*?\[]")
OSDF_FEDERATION = "osg-htc.org"


@dataclass(frozen=True)
class Remote:
    """An object (or collection) in a federation, as the user named it.

    `scheme` is stash/osdf/pelican, http/https (a direct URL: no director), or ''
    for a plain `/ns/path`. `host` is the federation (pelican://) or the server
    (http[s]://); `path` the object path, always absolute, without query.
    """

    scheme: str
    path: str
    host: str = ""

    @property
    def direct(self) -> bool:
        return self.scheme in DIRECT_SCHEMES

    def url(self) -> str:
        if self.scheme == "":
            return self.path
        return f"{self.scheme}://{self.host}{urllib.parse.quote(self.path)}"

    def child(self, path: str) -> Remote:
        return Remote(self.scheme, path, self.host)

    def has_glob(self) -> bool:
        return bool(GLOB_CHARS.search(self.path))

    def __str__(self) -> str:
        return self.url()


def is_remote(text: str) -> bool:
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    return scheme in REMOTE_SCHEMES or scheme in DIRECT_SCHEMES


def parse_remote(text: str) -> Remote:
    """stash:///ns/p, osdf:///ns/p, pelican://host/ns/p, http(s)://host/p, or /ns/p."""
    if "://" not in text:
        if not text.startswith("/"):
            raise ValueError(f"{text!r} is not an object path: it must start with /<namespace>/")
        return Remote("", _clean(text))
    u = urllib.parse.urlsplit(text)
    scheme = u.scheme.lower()
    path = urllib.parse.unquote(u.path)
    if scheme in ("stash", "osdf"):
        # stash:///ns/p is canonical; stash://ns/p names the same object
        if u.netloc:
            path = "/" + u.netloc + (path if path.startswith("/") else "/" + path)
        return Remote(scheme, _clean(path))
    if scheme == "pelican":
        if not u.netloc:
            raise ValueError(f"{text!r}: pelican:// URLs name the federation host")
        return Remote(scheme, _clean(path), u.netloc)
    if scheme in DIRECT_SCHEMES:
        return Remote(scheme, _clean(path), u.netloc)
    raise ValueError(f"{text!r}: unsupported scheme {scheme!r} (stash, osdf, pelican, http, https)")


def _clean(path: str) -> str:
    if not path:
        return "/"
    trailing = path.endswith("/") and path != "/"
    norm = posixpath.normpath("/" + path.lstrip("/"))
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm + ("/" if trailing else "")


def join_url(base: str, path: str) -> str:
    """base URL (maybe with a path prefix) + object path, percent-encoded."""
    return base.rstrip("/") + urllib.parse.quote(path if path.startswith("/") else "/" + path)


def server_of(url: str) -> str:
    """scheme://host:port of a URL: the identity of a cache or origin."""
    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


# -- director answers -----------------------------------------------------------------


@dataclass(frozen=True)
class NamespaceInfo:
    namespace: str
    require_token: bool = False
    collections_url: str | None = None


@dataclass
class Location:
    """What the director said about an object: candidate URLs, best first."""

    urls: list[str]
    namespace: NamespaceInfo | None = None
    extra: dict[str, str] = field(default_factory=dict)


def parse_link_header(value: str) -> list[str]:
    """`<url>; rel="duplicate"; pri=1; depth=1, <url2>; ...` -> URLs sorted by pri."""
    entries: list[tuple[int, int, str]] = []
    for i, item in enumerate(_split_links(value)):
        parts = [p.strip() for p in item.split(";")]
        if not parts or not parts[0]:
            continue
        url = parts[0].strip().lstrip("<").rstrip(">").strip()
        if not url:
            continue
        pri = 10**6 + i
        rel = "duplicate"
        for p in parts[1:]:
            key, _, val = p.partition("=")
            key = key.strip().lower()
            val = val.strip().strip('"')
            if key == "pri":
                try:
                    pri = int(val)
                except ValueError:
                    pass
            elif key == "rel":
                rel = val
        if rel != "duplicate":
            continue
        entries.append((pri, i, url))
    return [url for _, _, url in sorted(entries)]


def _split_links(value: str) -> list[str]:
    # split on commas outside <...>, so a URL containing a comma survives
    out: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in value:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_namespace_header(value: str) -> NamespaceInfo | None:
    """`namespace=/ns, require-token=false, collections-url=https://...`."""
    fields: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if sep:
            fields[key.strip().lower()] = val.strip().strip('"')
    ns = fields.get("namespace")
    if not ns:
        return None
    return NamespaceInfo(
        namespace=ns,
        require_token=fields.get("require-token", "false").lower() == "true",
        collections_url=fields.get("collections-url") or None,
    )


def location_from_headers(headers: Mapping[str, str]) -> Location:
    """Candidate URLs and namespace of a director's redirect answer."""
    get = headers.get
    urls = parse_link_header(get("Link", "") or "")
    location = get("Location")
    if location and location not in urls:
        urls.insert(0, location)
    ns_value = get("X-Pelican-Namespace")
    ns = parse_namespace_header(ns_value) if ns_value else None
    extra = {
        k: v for k in ("X-Pelican-Authorization", "X-Pelican-Token-Generation") if (v := get(k))
    }
    return Location(urls=urls, namespace=ns, extra=extra)


# -- listings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: str
    size: int | None
    is_dir: bool
    mtime: float | None = None


_DAV = "{DAV:}"


def parse_multistatus(body: bytes) -> list[Entry]:
    """Entries of a 207 Multi-Status PROPFIND answer (the collection itself included)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise ValueError(f"malformed PROPFIND answer: {e}") from None
    out: list[Entry] = []
    for resp in root.iter(f"{_DAV}response"):
        href_el = resp.find(f"{_DAV}href")
        if href_el is None or not href_el.text:
            continue
        path = urllib.parse.unquote(urllib.parse.urlsplit(href_el.text.strip()).path)
        is_dir = False
        size: int | None = None
        mtime: float | None = None
        for propstat in resp.iter(f"{_DAV}propstat"):
            status = propstat.findtext(f"{_DAV}status") or "200"
            if " 200" not in status and status != "200":
                continue
            prop = propstat.find(f"{_DAV}prop")
            if prop is None:
                continue
            rtype = prop.find(f"{_DAV}resourcetype")
            if rtype is not None and rtype.find(f"{_DAV}collection") is not None:
                is_dir = True
            length = prop.findtext(f"{_DAV}getcontentlength")
            if length and length.strip().isdigit():
                size = int(length.strip())
            modified = prop.findtext(f"{_DAV}getlastmodified")
            if modified:
                try:
                    mtime = parsedate_to_datetime(modified.strip()).timestamp()
                except (TypeError, ValueError):
                    mtime = None
        norm = path.rstrip("/") or "/"
        out.append(Entry(path=norm, size=None if is_dir else size, is_dir=is_dir, mtime=mtime))
    return out


def glob_root(path: str) -> str:
    """The longest leading part of `path` without glob characters (a directory)."""
    parts = path.split("/")
    fixed: list[str] = []
    for part in parts:
        if GLOB_CHARS.search(part):
            break
        fixed.append(part)
    return "/".join(fixed) or "/"
