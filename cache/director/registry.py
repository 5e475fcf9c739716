"""What the director knows: namespaces (longest-prefix match) and caches (static or
registered, with heartbeats, load and health)."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Paths the director answers itself; no namespace may shadow them.
RESERVED_PREFIXES = ("/.well-known", "/metrics", "/api/v1.0/director")

# A cache whose last heartbeat is older than EXPIRY_PERIODS heartbeat intervals is out of
# the candidate lists; after FORGET_PERIODS it is dropped from the registry altogether.
EXPIRY_PERIODS = 2.0
FORGET_PERIODS = 30.0


class RegistryError(ValueError):
    """A namespace or cache description is malformed (one sentence, user-facing)."""


def normalise_prefix(prefix: str) -> str:
    norm = "/" + prefix.strip().strip("/")
    if norm == "/":
        raise RegistryError("namespace '/' is not allowed: name it, e.g. /ns")
    segments = norm[1:].split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise RegistryError(f"namespace {prefix!r} has an empty, '.' or '..' segment")
    for reserved in RESERVED_PREFIXES:
        if norm == reserved or norm.startswith(reserved + "/") or reserved.startswith(norm + "/"):
            raise RegistryError(f"namespace {norm} clashes with the director's own {reserved}")
    return norm


def is_http_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("http", "https")


def check_url(url: str, what: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or (parts.scheme in ("http", "https") and not parts.netloc):
        raise RegistryError(f"{what} {url!r} is not a URL (e.g. https://host:8443/ns)")
    return url.rstrip("/")


def join_url(base: str, path: str) -> str:
    """base URL (maybe with a path prefix) + absolute path, percent-encoded."""
    return base.rstrip("/") + urllib.parse.quote(path if path.startswith("/") else "/" + path)


@dataclass(frozen=True)
class Namespace:
    """A namespace prefix and where its data lives.

    `origins` are storage URLs of the namespace's root, with the meaning of the cache's
    `--origin /ns=URL`: the object `/ns/a/b` is `URL/a/b`. Caches use them as they are;
    clients are only ever sent to the http(s) ones."""

    prefix: str
    origins: tuple[str, ...]
    require_token: bool = False
    issuer: str | None = None
    collections_url: str | None = None

    @property
    def depth(self) -> int:
        return len(self.prefix.strip("/").split("/"))

    def relative(self, path: str) -> str:
        return path[len(self.prefix) :].lstrip("/")

    def http_origins(self) -> list[str]:
        return [o for o in self.origins if is_http_url(o)]

    def origin_object_urls(self, path: str) -> list[str]:
        rel = self.relative(path)
        return [join_url(o, "/" + rel) if rel else o for o in self.http_origins()]

    def listing_url(self) -> str | None:
        """Where listings (PROPFIND) are answered: the server that serves `/ns/...` at
        its own paths. Explicit `collections_url`, else derived from the first http(s)
        origin whose path ends with the namespace prefix (`https://o:8443/ns` ->
        `https://o:8443`)."""
        if self.collections_url:
            return self.collections_url
        servers = self.origin_servers()
        return servers[0] if servers else None

    def origin_servers(self) -> list[str]:
        """The base URLs of the http(s) origins that serve `/ns/...` at their own paths
        (`https://o:8443/ns` -> `https://o:8443`): stashflow origins, which answer
        requests about themselves (e.g. their declared issuers) there."""
        out = []
        for origin in self.http_origins():
            parts = urllib.parse.urlsplit(origin)
            path = parts.path.rstrip("/")
            if path.endswith(self.prefix):
                base = path[: -len(self.prefix)]
                out.append(urllib.parse.urlunsplit((parts.scheme, parts.netloc, base, "", "")))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "origins": list(self.origins),
            "require_token": self.require_token,
            "issuer": self.issuer,
            "collections_url": self.listing_url(),
        }


class NamespaceTable:
    """Namespaces matched by longest prefix on path-segment boundaries
    (`/ns` matches `/ns` and `/ns/a`, never `/nsx`)."""

    def __init__(self, spaces: Iterable[Namespace] = ()) -> None:
        self._spaces: dict[str, Namespace] = {}
        for ns in spaces:
            self.add(ns)

    def add(self, ns: Namespace) -> None:
        if ns.prefix in self._spaces:
            raise RegistryError(f"namespace {ns.prefix} is given twice")
        if not ns.origins:
            raise RegistryError(f"namespace {ns.prefix} has no origin")
        self._spaces[ns.prefix] = ns

    def __iter__(self) -> Iterator[Namespace]:
        return iter(sorted(self._spaces.values(), key=lambda n: n.prefix))

    def __len__(self) -> int:
        return len(self._spaces)

    def get(self, prefix: str) -> Namespace | None:
        return self._spaces.get(prefix)

    def match(self, path: str) -> Namespace | None:
        candidate = path.rstrip("/") or "/"
        while candidate and candidate != "/":
            ns = self._spaces.get(candidate)
            if ns is not None:
                return ns
            candidate = candidate.rsplit("/", 1)[0]
        return None


@dataclass
class Cache:
    """One cache, as the director sees it."""

    name: str
    url: str  # scheme://host:port[/prefix] that clients reach
    site: str | None = None
    static: bool = False
    load: float = 0.0
    free_bytes: int | None = None
    namespaces: tuple[str, ...] | None = None  # None: serves every namespace
    registered_at: float = field(default_factory=time.time)
    last_heartbeat: float | None = None  # time.time() of the last registerCache
    last_seen_mono: float | None = None  # monotonic twin of last_heartbeat
    heartbeats: int = 0
    healthy: bool | None = None  # static caches: result of the last probe (None: not yet)
    health_reason: str = ""
    last_probe: float | None = None
    registered_from: str | None = None  # client address of the latest registerCache

    def serves(self, prefix: str) -> bool:
        return self.namespaces is None or prefix in self.namespaces

    def state(self, now_mono: float, interval: float, max_load: float) -> str:
        """up | full | down | expired.

        Static caches are probed (down while the probe fails); registered ones expire
        when they miss heartbeats for EXPIRY_PERIODS intervals."""
        if self.static:
            if self.healthy is False:
                return "down"
        elif self.last_seen_mono is None or (
            now_mono - self.last_seen_mono > EXPIRY_PERIODS * interval
        ):
            return "expired"
        return "full" if self.load >= max_load else "up"

    def describe(self, now_mono: float, interval: float, max_load: float) -> dict[str, Any]:
        age = None if self.last_seen_mono is None else round(now_mono - self.last_seen_mono, 3)
        return {
            "name": self.name,
            "url": self.url,
            "site": self.site,
            "static": self.static,
            "state": self.state(now_mono, interval, max_load),
            "load": self.load,
            "free_bytes": self.free_bytes,
            "namespaces": list(self.namespaces) if self.namespaces is not None else None,
            "last_heartbeat": self.last_heartbeat,
            "seconds_since_heartbeat": age,
            "heartbeats": self.heartbeats,
            "health": {True: "ok", False: "failing", None: "unknown"}[self.healthy],
            "health_reason": self.health_reason,
        }


@dataclass(frozen=True)
class Registration:
    """A validated registerCache (heartbeat) request body."""

    name: str
    url: str
    site: str | None
    load: float
    free_bytes: int | None
    namespaces: tuple[str, ...] | None

    @classmethod
    def parse(cls, body: Any) -> Registration:
        if not isinstance(body, dict):
            raise RegistryError("the body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise RegistryError("'name' must be a non-empty string (at most 256 characters)")
        url = body.get("url")
        if (
            not isinstance(url, str)
            or not is_http_url(url)
            or not urllib.parse.urlsplit(url).netloc
        ):
            raise RegistryError("'url' must be the cache's http(s)://host:port")
        site = body.get("site")
        if site is not None and (not isinstance(site, str) or not site.strip()):
            raise RegistryError("'site' must be a non-empty string when given")
        load = body.get("load", 0.0)
        if isinstance(load, bool) or not isinstance(load, int | float) or not 0 <= load <= 1:
            raise RegistryError("'load' must be a number between 0 and 1")
        free = body.get("free_bytes")
        if free is not None and (isinstance(free, bool) or not isinstance(free, int) or free < 0):
            raise RegistryError("'free_bytes' must be a non-negative integer when given")
        spaces = body.get("namespaces")
        if spaces is not None:
            if not isinstance(spaces, list) or not all(isinstance(s, str) for s in spaces):
                raise RegistryError("'namespaces' must be a list of prefixes when given")
            spaces = tuple("/" + s.strip("/") for s in spaces)
        return cls(name.strip(), url.rstrip("/"), site, float(load), free, spaces)


class CacheRegistry:
    """Static caches (from the command line) and registered ones (heartbeats)."""

    def __init__(self, interval: float, max_load: float = 0.9) -> None:
        self.interval = interval
        self.max_load = max_load
        self._caches: dict[str, Cache] = {}

    def add_static(self, url: str, site: str | None) -> Cache:
        url = check_url(url, "cache URL")
        if not is_http_url(url):
            raise RegistryError(f"cache URL {url!r} must be http:// or https://")
        if any(c.url == url for c in self._caches.values()):
            raise RegistryError(f"cache {url} is given twice")
        cache = Cache(name=url, url=url, site=site, static=True)
        self._caches[cache.name] = cache
        return cache

    def heartbeat(self, reg: Registration, now_mono: float | None = None) -> Cache:
        """Register a cache or refresh it. A registration whose URL is that of a static
        cache updates that cache (its load, free space, heartbeat)."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        cache = self._caches.get(reg.name)
        if cache is None:
            cache = next((c for c in self._caches.values() if c.static and c.url == reg.url), None)
        if cache is None:
            # a cache that restarted under a new name but the same URL replaces the old one
            for other in [c for c in self._caches.values() if c.url == reg.url]:
                del self._caches[other.name]
            cache = Cache(name=reg.name, url=reg.url)
            self._caches[cache.name] = cache
        if not cache.static:
            cache.url = reg.url
        cache.site = reg.site if reg.site is not None else cache.site
        cache.load = reg.load
        cache.free_bytes = reg.free_bytes
        cache.namespaces = reg.namespaces
        cache.last_heartbeat = time.time()
        cache.last_seen_mono = now_mono
        cache.heartbeats += 1
        return cache

    def unregister(self, name: str) -> bool:
        cache = self._caches.get(name)
        if cache is None:
            return False
        if cache.static:
            cache.last_seen_mono = None
            cache.last_heartbeat = None
            return True
        del self._caches[name]
        return True

    def forget_expired(self, now_mono: float | None = None) -> list[str]:
        now_mono = time.monotonic() if now_mono is None else now_mono
        gone = [
            c.name
            for c in self._caches.values()
            if not c.static
            and (
                c.last_seen_mono is None
                or now_mono - c.last_seen_mono > FORGET_PERIODS * self.interval
            )
        ]
        for name in gone:
            del self._caches[name]
        return gone

    def __iter__(self) -> Iterator[Cache]:
        return iter(sorted(self._caches.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._caches)

    def static_caches(self) -> list[Cache]:
        return [c for c in self._caches.values() if c.static]

    def state(self, cache: Cache, now_mono: float | None = None) -> str:
        now_mono = time.monotonic() if now_mono is None else now_mono
        return cache.state(now_mono, self.interval, self.max_load)

    def candidates(self, prefix: str, now_mono: float | None = None) -> list[tuple[Cache, str]]:
        """Caches that may serve `prefix` now, with their state (up or full)."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        out = []
        for cache in self._caches.values():
            if not cache.serves(prefix):
                continue
            st = cache.state(now_mono, self.interval, self.max_load)
            if st in ("up", "full"):
                out.append((cache, st))
        return out

    def describe(self, now_mono: float | None = None) -> list[dict[str, Any]]:
        now_mono = time.monotonic() if now_mono is None else now_mono
        return [c.describe(now_mono, self.interval, self.max_load) for c in self]
