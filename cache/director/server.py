"""The director's HTTP(S) service: the Pelican federation protocol (discovery,
redirects with `Link` and `X-Pelican-Namespace`, origin redirects, listings), cache
registration and heartbeats, the operator API and Prometheus metrics.

See docs/director.md for the contract and ../shared/reference/pelican-director.md for
the protocol it implements."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stashflow.cache.director.registry import (
    EXPIRY_PERIODS,
    Cache,
    CacheRegistry,
    Namespace,
    NamespaceTable,
    Registration,
    RegistryError,
    join_url,
)
from stashflow.cache.director.selection import (
    IPNetwork,
    SiteMap,
    client_address,
    parse_address,
    rank,
)

log = logging.getLogger("stashflow.director")

API = "/api/v1.0/director"
OBJECT_API = API + "/object"
ORIGIN_API = API + "/origin"
WRITE_METHODS = {"PUT", "DELETE", "MKCOL", "MOVE", "COPY", "PROPPATCH"}
READ_METHODS = {"GET", "HEAD"}
ALLOW = "GET, HEAD, PROPFIND, PUT, DELETE, MKCOL, MOVE, COPY, OPTIONS"
MAX_BODY = 64 * 1024
# Where our origins declare their exports and trusted issuers (cache/origin/server.py).
ORIGIN_DECLARATION = "/.well-known/stashflow-origin"


class DirectorError(Exception):
    """A startup problem (bad certificate, address in use): one sentence."""


@dataclass
class DirectorConfig:
    host: str
    port: int
    namespaces: list[Namespace]
    static_caches: list[tuple[str, str | None]] = field(default_factory=list)
    site_map: SiteMap = field(default_factory=SiteMap)
    tls_cert: str | None = None
    tls_key: str | None = None
    heartbeat_interval: float = 10.0
    trusted_proxies: list[IPNetwork] = field(default_factory=list)
    public_url: str | None = None
    max_candidates: int = 8
    max_load: float = 0.9
    registration_token: str | None = None
    probe_timeout: float = 5.0

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def ssl_context(cert: str, key: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise DirectorError(f"TLS certificate or key {e.filename or cert} does not exist") from None
    except (ssl.SSLError, OSError) as e:
        raise DirectorError(
            f"TLS certificate {cert} and key {key} cannot be loaded: {getattr(e, 'reason', e)}"
        ) from None
    return ctx


def json_error(
    status: int, message: str, headers: dict[str, str] | None = None, **fields: Any
) -> web.Response:
    body = {"error": message, "status": status, **fields}
    return web.json_response(body, status=status, headers=headers)


class _BadPath(ValueError):
    pass


def clean_path(path: str) -> str:
    """An object or collection path: absolute, no '.', '..' or empty segments, no
    control characters. A trailing '/' (a collection) is kept."""
    if not path.startswith("/") or len(path.encode()) > 4096:
        raise _BadPath("path must be absolute and at most 4096 bytes")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise _BadPath("path contains NUL or control characters")
    trailing = path.endswith("/") and path != "/"
    body = path[1:-1] if trailing else path[1:]
    if body:
        for seg in body.split("/"):
            if seg in ("", ".", ".."):
                raise _BadPath(f"path segment {seg!r} is not allowed ('..', '.', '//')")
    return path


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.redirects = Counter(
            "stashflow_director_redirects",
            "Redirect answers by namespace and kind (cache, origin, fallback, listing)",
            ["namespace", "kind"],
            registry=self.registry,
        )
        self.cache_redirects = Counter(
            "stashflow_director_cache_redirects",
            "Redirects whose first choice was this cache",
            ["cache"],
            registry=self.registry,
        )
        self.not_found = Counter(
            "stashflow_director_unknown_namespace",
            "Requests for paths no namespace serves",
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "stashflow_director_heartbeats",
            "registerCache calls (registrations and heartbeats) by cache",
            ["cache"],
            registry=self.registry,
        )
        self.expirations = Counter(
            "stashflow_director_cache_expirations",
            "Caches that left the candidate lists (missed heartbeats or failed probes)",
            ["cache"],
            registry=self.registry,
        )
        self.caches = Gauge(
            "stashflow_director_caches",
            "Known caches by state (up, full, down, expired)",
            ["state"],
            registry=self.registry,
        )
        self.no_cache = Counter(
            "stashflow_director_no_cache",
            "Requests for which no cache was alive",
            ["namespace"],
            registry=self.registry,
        )


class Director:
    def __init__(self, cfg: DirectorConfig) -> None:
        self.cfg = cfg
        self.namespaces = NamespaceTable(cfg.namespaces)
        self.caches = CacheRegistry(cfg.heartbeat_interval, cfg.max_load)
        for url, site in cfg.static_caches:
            self.caches.add_static(url, site)
        self.site_map = cfg.site_map
        self.metrics = Metrics()
        self._states: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_probe = -1e18
        # namespace prefix -> the base path its origin declared for the namespace's
        # issuer; a namespace absent here is advertised with "/" (absolute scopes)
        self._base_paths: dict[str, str] = {}

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.probe_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._housekeeping())

    async def stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _housekeeping(self) -> None:
        tick = max(0.05, min(1.0, self.cfg.heartbeat_interval / 4))
        while True:
            try:
                now = time.monotonic()
                if now - self._last_probe >= self.cfg.heartbeat_interval:
                    self._last_probe = now
                    await self._probe_static()
                    await self._learn_base_paths()
                self._track_states()
                for name in self.caches.forget_expired():
                    log.info("cache %s forgotten after missing heartbeats", name)
                    self._states.pop(name, None)
            except Exception:  # housekeeping must survive anything
                log.exception("director housekeeping failed")
            await asyncio.sleep(tick)

    async def _probe_static(self) -> None:
        statics = self.caches.static_caches()
        if statics:
            await asyncio.gather(*(self._probe(c) for c in statics))

    async def _probe(self, cache: Cache) -> None:
        assert self._session is not None
        url = cache.url + "/.stashflow/health"
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                await resp.read()
                ok = resp.status != 503 and resp.status < 500
                reason = "" if ok else f"health answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            ok, reason = False, f"health probe failed: {type(e).__name__}: {e}"[:300]
        cache.healthy, cache.health_reason, cache.last_probe = ok, reason, time.time()

    async def _learn_base_paths(self) -> None:
        spaces = [ns for ns in self.namespaces if ns.issuer]
        found = await asyncio.gather(*(self._declared_base_path(ns) for ns in spaces))
        for ns, base in zip(spaces, found, strict=True):
            if base is None:
                continue  # origin unreachable: keep what it declared last time
            if base != self._base_paths.get(ns.prefix, "/"):
                log.info("namespace %s: origin declares token base path %s", ns.prefix, base)
            self._base_paths[ns.prefix] = base

    async def _declared_base_path(self, ns: Namespace) -> str | None:
        """The base path the first reachable origin of `ns` declares for `ns.issuer`:
        "/" when it declares none (or does not trust that issuer), None when no origin
        could be asked (not a stashflow origin, or down)."""
        assert self._session is not None
        for server in ns.origin_servers():
            try:
                async with self._session.get(
                    server + ORIGIN_DECLARATION, allow_redirects=False
                ) as resp:
                    if resp.status != 200:
                        continue
                    doc = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                continue
            issuers = doc.get("issuers") if isinstance(doc, dict) else None
            for entry in issuers if isinstance(issuers, list) else []:
                if isinstance(entry, dict) and entry.get("issuer") == ns.issuer:
                    base = entry.get("base_path")
                    if isinstance(base, str) and base.startswith("/"):
                        return "/" + base.strip("/")
            return "/"
        return None

    def token_base_path(self, ns: Namespace) -> str:
        return self._base_paths.get(ns.prefix, "/")

    def _track_states(self) -> None:
        now = time.monotonic()
        for cache in self.caches:
            state = self.caches.state(cache, now)
            before = self._states.get(cache.name)
            if before is not None and before != state:
                log.info("cache %s (%s): %s -> %s", cache.name, cache.url, before, state)
                if state in ("expired", "down"):
                    self.metrics.expirations.labels(cache.name).inc()
            self._states[cache.name] = state

    # -- helpers ----------------------------------------------------------------------

    def self_url(self, request: web.Request) -> str:
        if self.cfg.public_url:
            return self.cfg.public_url.rstrip("/")
        scheme = "https" if self.cfg.tls else "http"
        return f"{scheme}://{request.host}"

    def client(self, request: web.Request) -> Any:
        return client_address(
            request.remote, request.headers.get("X-Forwarded-For"), self.cfg.trusted_proxies
        )

    @staticmethod
    def namespace_header(ns: Namespace) -> str:
        value = f"namespace={ns.prefix}, require-token={'true' if ns.require_token else 'false'}"
        listing = ns.listing_url()
        if listing:
            value += f", collections-url={listing}"
        return value

    def pelican_headers(self, ns: Namespace, urls: Sequence[str]) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        if urls:
            headers["Link"] = ", ".join(
                f'<{u}>; rel="duplicate"; pri={i}; depth={ns.depth}' for i, u in enumerate(urls, 1)
            )
        headers["X-Pelican-Namespace"] = self.namespace_header(ns)
        if ns.issuer:
            headers["X-Pelican-Authorization"] = f"issuer={ns.issuer}"
            headers["X-Pelican-Token-Generation"] = (
                f"issuer={ns.issuer}, max-scope-depth=0, strategy=OAuth2, "
                f"base-path={self.token_base_path(ns)}"
            )
        return headers

    @staticmethod
    def redirect(
        request: web.Request,
        headers: CIMultiDict[str],
        urls: Sequence[str],
        extra: dict[str, Any] | None = None,
    ) -> web.Response:
        location = urls[0]
        if request.query_string:  # e.g. ?authz=<token>: kept on Location only, as Pelican
            location += "?" + request.query_string
        headers["Location"] = location
        if request.method == "HEAD":
            return web.Response(status=307, headers=headers)
        body = {"location": location, "candidates": list(urls), **(extra or {})}
        headers["Content-Type"] = "application/json"
        return web.Response(status=307, headers=headers, text=json.dumps(body))

    def ranked(
        self, ns: Namespace, path: str, request: web.Request
    ) -> tuple[Any, str | None, list[Any]]:
        addr = self.client(request)
        site = self.site_map.site_of(addr)
        ranking = rank(self.caches.candidates(ns.prefix), path, site, self.site_map)
        return addr, site, ranking[: self.cfg.max_candidates]

    # -- Pelican protocol -------------------------------------------------------------

    async def discovery(self, request: web.Request) -> web.Response:
        me = self.self_url(request)
        return web.json_response(
            {
                "director_endpoint": me,
                "namespace_registration_endpoint": me,
                "jwks_uri": me + "/.well-known/issuer.jwks",
            }
        )

    async def jwks(self, request: web.Request) -> web.Response:
        # The director signs nothing: tokens come from each namespace's issuer.
        return web.json_response({"keys": []})

    def _resolve(self, path: str) -> Namespace | web.Response:
        try:
            clean_path(path)
        except _BadPath as e:
            return json_error(400, f"bad path {path!r}: {e}", path=path)
        ns = self.namespaces.match(path)
        if ns is None:
            self.metrics.not_found.inc()
            return json_error(404, f"no namespace serves {path}", path=path)
        return ns

    async def to_cache(self, request: web.Request, path: str) -> web.Response:
        ns = self._resolve(path)
        if isinstance(ns, web.Response):
            return ns
        _, site, ranking = self.ranked(ns, path, request)
        if not ranking:
            self.metrics.no_cache.labels(ns.prefix).inc()
            origins = ns.origin_object_urls(path)
            headers = self.pelican_headers(ns, origins)
            if not origins:
                return json_error(
                    503,
                    f"no cache is alive for {ns.prefix} and its origins cannot be reached "
                    f"over HTTP: cannot serve {path}",
                    headers=dict(headers),
                    path=path,
                )
            headers["X-Stashflow-Fallback"] = "origin"
            headers["X-Stashflow-Fallback-Reason"] = f"no cache is alive for {ns.prefix}"
            self.metrics.redirects.labels(ns.prefix, "fallback").inc()
            return self.redirect(request, headers, origins, {"fallback": "origin"})
        urls = [join_url(r.cache.url, path) for r in ranking]
        headers = self.pelican_headers(ns, urls)
        if site is not None:
            headers["X-Stashflow-Client-Site"] = site
        self.metrics.redirects.labels(ns.prefix, "cache").inc()
        self.metrics.cache_redirects.labels(ranking[0].cache.name).inc()
        return self.redirect(request, headers, urls)

    async def to_origin(self, request: web.Request, path: str) -> web.Response:
        ns = self._resolve(path)
        if isinstance(ns, web.Response):
            return ns
        origins = ns.origin_object_urls(path)
        headers = self.pelican_headers(ns, origins)
        if not origins:
            return json_error(
                404,
                f"namespace {ns.prefix} has no origin clients can reach (only http:// and "
                f"https:// origins are redirected to): cannot serve {path}",
                headers=dict(headers),
                path=path,
            )
        self.metrics.redirects.labels(ns.prefix, "origin").inc()
        return self.redirect(request, headers, origins)

    async def to_listing(self, request: web.Request, path: str) -> web.Response:
        ns = self._resolve(path)
        if isinstance(ns, web.Response):
            return ns
        listing = ns.listing_url()
        headers = self.pelican_headers(ns, [])
        if not listing:
            return json_error(
                404,
                f"namespace {ns.prefix} has no listing endpoint (collections-url): "
                f"cannot list {path}",
                headers=dict(headers),
                path=path,
            )
        url = join_url(listing, path)
        headers = self.pelican_headers(ns, [url])
        self.metrics.redirects.labels(ns.prefix, "listing").inc()
        return self.redirect(request, headers, [url])

    # -- registration -----------------------------------------------------------------

    def _authorised(self, request: web.Request) -> web.Response | None:
        token = self.cfg.registration_token
        if not token:
            return None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return json_error(401, "registration needs 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            return json_error(403, "the registration token is not valid")
        return None

    async def _json_body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise RegistryError(f"the body is larger than {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise RegistryError(f"the body is larger than {MAX_BODY} bytes")
        try:
            return json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RegistryError(f"the body is not JSON: {e}") from None

    async def register(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return refused
        try:
            reg = Registration.parse(await self._json_body(request))
        except RegistryError as e:
            return json_error(400, f"registerCache refused: {e}")
        first = reg.name not in {c.name for c in self.caches}
        cache = self.caches.heartbeat(reg)
        # Remembered so that, without a registration token, only this host may take the
        # cache out (unregisterCache); the latest heartbeat wins, as a cache's address
        # may change across restarts.
        peer = self.client(request)
        cache.registered_from = str(peer) if peer is not None else None
        self.metrics.heartbeats.labels(cache.name).inc()
        if first:
            log.info("cache %s registered at %s (site %s)", cache.name, cache.url, cache.site)
        warnings = []
        if cache.site is not None and cache.site not in self.site_map.sites:
            warnings.append(
                f"site {cache.site!r} is not in the site map: its distance to clients is unknown"
            )
        served = {}
        for ns in self.namespaces:
            if cache.serves(ns.prefix):
                served[ns.prefix] = {**ns.describe(), "token_base_path": self.token_base_path(ns)}
        for prefix in reg.namespaces or ():
            if self.namespaces.get(prefix) is None:
                warnings.append(f"namespace {prefix} is not known to this director")
        self._track_states()
        return web.json_response(
            {
                "name": cache.name,
                "state": self.caches.state(cache),
                "namespaces": served,
                "heartbeat_interval": self.cfg.heartbeat_interval,
                "expires_after": EXPIRY_PERIODS * self.cfg.heartbeat_interval,
                "warnings": warnings,
            }
        )

    async def unregister(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return refused
        try:
            body = await self._json_body(request)
        except RegistryError as e:
            return json_error(400, f"unregisterCache refused: {e}")
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return json_error(400, "unregisterCache refused: 'name' must be a string")
        cache = next((c for c in self.caches if c.name == name), None)
        if (
            not self.cfg.registration_token
            and cache is not None
            and cache.registered_from is not None
        ):
            # Open registration must not let anyone on the network take caches out:
            # without a token, only the host the cache registered from may unregister it.
            peer = self.client(request)
            if peer is None or str(peer) != cache.registered_from:
                return json_error(
                    403,
                    f"unregisterCache refused: cache {name!r} registered from "
                    f"{cache.registered_from}, not {peer}; unregister it from that host, "
                    "or set --registration-token",
                    name=name,
                )
        if not self.caches.unregister(name):
            return json_error(404, f"no cache named {name!r} is registered", name=name)
        log.info("cache %s unregistered", name)
        self._track_states()
        return web.json_response({"name": name, "unregistered": True})

    # -- operator API -----------------------------------------------------------------

    async def list_namespaces(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        out = []
        for ns in self.namespaces:
            alive = [c.name for c, _ in self.caches.candidates(ns.prefix, now)]
            out.append(
                {
                    "prefix": ns.prefix,
                    **ns.describe(),
                    "token_base_path": self.token_base_path(ns),
                    "caches": sorted(alive),
                }
            )
        return web.json_response({"namespaces": out})

    async def list_caches(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "heartbeat_interval": self.cfg.heartbeat_interval,
                "expires_after": EXPIRY_PERIODS * self.cfg.heartbeat_interval,
                "caches": self.caches.describe(),
            }
        )

    async def locate(self, request: web.Request) -> web.Response:
        """Why the director answers what it answers: ?path=/ns/obj[&client=ADDR]."""
        path = request.query.get("path", "")
        ns = self._resolve(path)
        if isinstance(ns, web.Response):
            return ns
        client = request.query.get("client")
        if client:
            addr = parse_address(client)
            if addr is None:
                return json_error(400, f"client {client!r} is not an IP address")
        else:
            addr = self.client(request)
        site = self.site_map.site_of(addr)
        ranking = rank(self.caches.candidates(ns.prefix), path, site, self.site_map)
        return web.json_response(
            {
                "path": path,
                "namespace": ns.prefix,
                "client": str(addr) if addr else None,
                "client_site": site,
                "caches": [
                    {
                        "name": r.cache.name,
                        "url": join_url(r.cache.url, path),
                        "site": r.cache.site,
                        "state": r.state,
                        "distance_km": None if r.distance == float("inf") else round(r.distance, 1),
                    }
                    for r in ranking[: self.cfg.max_candidates]
                ],
            }
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        counts: dict[str, int] = {"up": 0, "full": 0, "down": 0, "expired": 0}
        now = time.monotonic()
        for cache in self.caches:
            counts[self.caches.state(cache, now)] += 1
        for state, n in counts.items():
            self.metrics.caches.labels(state).set(n)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "namespaces": len(self.namespaces), "caches": len(self.caches)}
        )

    # -- dispatch ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        if method == "OPTIONS":
            return web.Response(status=204, headers={"Allow": ALLOW})
        try:
            if path == "/.well-known/pelican-configuration" and method in READ_METHODS:
                return await self.discovery(request)
            if path == "/.well-known/issuer.jwks" and method in READ_METHODS:
                return await self.jwks(request)
            if path == "/metrics" and method in READ_METHODS:
                return await self.metrics_page(request)
            if path.startswith(ORIGIN_API + "/"):
                sub = path[len(ORIGIN_API) :]
                if method == "PROPFIND":
                    return await self.to_listing(request, sub)
                return await self.to_origin(request, sub)
            if path.startswith(OBJECT_API + "/"):
                return await self._object(request, path[len(OBJECT_API) :])
            if path.startswith(API + "/") or path == API:
                return await self._api(request, path[len(API) :], method)
            if path.startswith("/.well-known/"):
                return json_error(404, f"{path} is not served by this director", path=path)
            return await self._object(request, path)
        except web.HTTPException:
            raise
        except Exception as e:
            log.exception("request %s %s failed", method, path)
            return json_error(500, f"internal error answering {method} {path}: {e}")

    async def _object(self, request: web.Request, path: str) -> web.Response:
        method = request.method
        if method in READ_METHODS:
            return await self.to_cache(request, path)
        if method == "PROPFIND":
            return await self.to_listing(request, path)
        if method in WRITE_METHODS:
            return await self.to_origin(request, path)
        return json_error(
            405, f"method {method} is not supported on {path}", headers={"Allow": ALLOW}
        )

    async def _api(self, request: web.Request, sub: str, method: str) -> web.Response:
        routes: dict[tuple[str, str], Any] = {
            ("POST", "/registerCache"): self.register,
            ("POST", "/unregisterCache"): self.unregister,
            ("GET", "/namespaces"): self.list_namespaces,
            ("GET", "/caches"): self.list_caches,
            ("GET", "/locate"): self.locate,
            ("GET", "/health"): self.health,
        }
        handler = routes.get(("GET" if method == "HEAD" else method, sub))
        if handler is None:
            if any(s == sub for _, s in routes):
                return json_error(405, f"method {method} is not allowed on {API}{sub}")
            return json_error(404, f"{API}{sub} is not an API endpoint of this director")
        result: web.Response = await handler(request)
        return result


def build_app(cfg: DirectorConfig) -> web.Application:
    director = Director(cfg)
    app = web.Application(client_max_size=MAX_BODY)
    app["director"] = director
    app.on_startup.append(director.start)
    app.on_cleanup.append(director.stop)
    app.router.add_route("*", "/{tail:.*}", director.handle)
    return app


async def run(cfg: DirectorConfig, ready: Any = None) -> None:
    ctx = ssl_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ctx, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise DirectorError(f"cannot listen on {cfg.host}:{cfg.port}: {reason}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    scheme = "https" if ctx else "http"
    url = f"{scheme}://{cfg.host}:{cfg.port}"
    if not cfg.registration_token and not is_loopback(cfg.host):
        log.warning(
            "WARNING: registration is OPEN: director on %s has no --registration-token, so "
            "any host that reaches it can register a cache (and receive client traffic); "
            "set --registration-token (docs/director.md)",
            url,
        )
    log.info(
        "director listening on %s (%d namespaces, %d static caches)",
        url,
        len(cfg.namespaces),
        len(cfg.static_caches),
    )
    if ready is not None:
        ready(url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(cfg: DirectorConfig, ready: Any = None) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(cfg, ready))


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only (open registration is
    then harmless: tests and the demo)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {value!r}: use HOST:PORT, e.g. 0.0.0.0:8444")
    return host.strip("[]") or "0.0.0.0", int(port)
