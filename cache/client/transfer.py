"""The transfer engine behind `stashcp` and the fsspec filesystem.

Downloads: the director (or `--cache`) gives candidate object URLs, best first; the
first few are probed in parallel (HEAD) and dead ones go last. The first ranged GET
learns the size (and, with `Want-Digest`, the checksum); a large object is then
fetched in parallel ranges, each of which fails over on its own to the next source —
a cache that dies mid-transfer costs only the bytes in flight. Every byte lands in a
hidden `.NAME.stashcp-part` file next to the destination (with a `.json` record of the
ranges present, so an interrupted download resumes), and only a download whose size
and checksum check out is renamed to the destination name.

Uploads go to the origin (`/api/v1.0/director/origin/...`) with a PUT carrying
`Digest`, so the origin verifies what it stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import importlib.util
import json
import logging
import os
import posixpath
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stashflow.cache.client import splice
from stashflow.cache.client.discovery import (
    OSDF_FEDERATION,
    Entry,
    Location,
    NamespaceInfo,
    Remote,
    glob_root,
    join_url,
    location_from_headers,
    parse_multistatus,
    server_of,
)
from stashflow.cache.client.errors import (
    AuthError,
    ChecksumMismatch,
    LocalError,
    NotFound,
    Permanent,
    Retryable,
    Stalled,
    StashError,
    UsageError,
)
from stashflow.cache.client.progress import Progress
from stashflow.cache.client.tokens import Token, find_token
from stashflow.integration import config as configlib
from stashflow.integration.checksums import (
    ALGORITHMS,
    Hasher,
    from_digest_header,
    http_name,
    to_digest_header,
)

if TYPE_CHECKING:
    import aiohttp
else:
    def _imported_on_first_use(name: str) -> Any:
        """The module, executed when one of its attributes is first used. aiohttp takes
        a third of stashcp's start (its TLS contexts are built at import), and a run whose
        files all come through libcurl (cache/client/bulk.py) never needs it."""
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    aiohttp = _imported_on_first_use("aiohttp")

log = logging.getLogger("stashcp")

KiB = 1024
MiB = 1024 * KiB
PART_SUFFIX = ".stashcp-part"
DIGEST_PREFERENCE = ("crc32c", "adler32", "md5", "sha256")
_READ = 1 * MiB
# Bodies from this size on are received by splice when they can be (cache/client/splice.py)
SPLICE_MIN = 4 * MiB


# -- options ----------------------------------------------------------------------------


@dataclass
class Options:
    """How to transfer. Defaults come from the `[client]` table of the config file
    (STASHFLOW_CONFIG or /etc/stashflow/client.toml) and STASHFLOW_CLIENT_* variables;
    `STASHFLOW_DIRECTOR` names the director, over the file's `director`; command-line
    flags win over all."""

    director: str | None = None
    caches: list[str] = field(default_factory=list)
    origin: str | None = None  # without a director: listings and uploads go here
    token: str | None = None
    parallel_files: int = 16
    parallel_chunks: int = 4
    chunk_size: int = 32 * MiB
    min_rate: float = 64 * KiB  # bytes/s over stall_window, else the source is abandoned
    stall_window: float = 30.0
    connect_timeout: float = 10.0
    header_timeout: float = 120.0
    probe_count: int = 3
    probe_timeout: float = 5.0
    rounds: int = 3  # passes over all candidate sources, with backoff between them
    backoff: float = 0.5
    checksum: str = "auto"  # auto | none | adler32 | md5 | crc32c | sha256
    resume: bool = True
    rate_limit: float = 0.0  # bytes/s for the whole run, 0 = unlimited
    splice: bool = True  # large bodies over plain HTTP go socket -> file by splice(2)
    origin_fallback: bool = True

    _SIZES = ("chunk_size", "min_rate", "rate_limit")
    _DURATIONS = ("stall_window", "connect_timeout", "header_timeout", "probe_timeout", "backoff")
    _INTS = ("parallel_files", "parallel_chunks", "probe_count", "rounds")

    @classmethod
    def load(cls, **overrides: Any) -> Options:
        """Config file and environment, then the non-None `overrides`."""
        raw: dict[str, Any] = {}
        try:
            raw = configlib.load(configlib.default_config_path("client"), "client")
        except configlib.ConfigError as e:
            raise UsageError("configuration", str(e)) from None
        # A job's STASHFLOW_DIRECTOR wins over the machine-wide config file: the job (or
        # its glidein) knows which federation it belongs to better than the worker node.
        if os.environ.get("STASHFLOW_DIRECTOR"):
            raw["director"] = os.environ["STASHFLOW_DIRECTOR"]
        opts = cls()
        for key, value in {**raw, **{k: v for k, v in overrides.items() if v is not None}}.items():
            key = key.replace("-", "_")
            if not hasattr(opts, key) or key.startswith("_"):
                continue
            try:
                setattr(opts, key, cls._coerce(key, value))
            except (ValueError, TypeError, configlib.ConfigError) as e:
                raise UsageError("configuration", f"invalid {key} {value!r}: {e}") from None
        if opts.checksum not in ("auto", "none", *ALGORITHMS):
            raise UsageError(
                "configuration",
                f"unknown checksum {opts.checksum!r} (auto, none, {', '.join(ALGORITHMS)})",
            )
        return opts

    @classmethod
    def _coerce(cls, key: str, value: Any) -> Any:
        if key in cls._SIZES:
            return float(configlib.parse_size(value if isinstance(value, int) else str(value)))
        if key in cls._DURATIONS:
            return configlib.parse_duration(value)
        if key in cls._INTS:
            n = int(value)
            if n < 1:
                raise ValueError("must be at least 1")
            return n
        if key == "caches":
            if isinstance(value, str):
                return [c.strip() for c in value.split(",") if c.strip()]
            return [str(c) for c in value]
        if key in ("resume", "origin_fallback", "splice"):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        return value


# -- results ----------------------------------------------------------------------------


@dataclass
class Result:
    source: str
    dest: str
    direction: str = "download"
    ok: bool = False
    size: int = 0
    transferred: int = 0  # bytes that crossed the network in this run
    resumed: int = 0  # bytes already present from an interrupted run
    start: float = field(default_factory=time.time)
    end: float = 0.0
    servers: list[str] = field(default_factory=list)
    checksum: str | None = None  # "algorithm:hex" when verified
    checksum_failures: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: StashError | None = None
    arg: int = 0  # index of the command-line SOURCE it came from: orders the report

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "dest": self.dest,
            "direction": self.direction,
            "ok": self.ok,
            "size": self.size,
            "transferred": self.transferred,
            "resumed": self.resumed,
            "seconds": round(max(0.0, self.end - self.start), 6),
            "servers": self.servers,
            "checksum": self.checksum,
            "checksum_failures": self.checksum_failures,
            "attempts": self.attempts,
        }
        if self.error is not None:
            out["error"] = str(self.error)
            out["error_kind"] = self.error.kind
            out["retryable"] = self.error.retryable
            out["exit_code"] = self.error.exit_code
        return out


# -- helpers ----------------------------------------------------------------------------


class _Health:
    """What this run learned about servers: alive, dead (tried last), or unknown."""

    def __init__(self) -> None:
        self.state: dict[str, bool] = {}
        self._probes: dict[str, asyncio.Future[bool]] = {}

    def get(self, server: str) -> bool | None:
        return self.state.get(server)

    def mark(self, server: str, alive: bool) -> None:
        self.state[server] = alive


class _RateLimiter:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()

    async def consume(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._next = max(self._next, now) + n / self.rate
        delay = self._next - now
        if delay > 0.001:
            await asyncio.sleep(delay)


class Intervals:
    """Byte ranges [start, end) present in a partial file, merged and sorted."""

    def __init__(self, items: list[list[int]] | None = None) -> None:
        self.items: list[list[int]] = []
        for a, b in items or []:
            self.add(int(a), int(b))

    def add(self, a: int, b: int) -> None:
        if b <= a:
            return
        out: list[list[int]] = []
        placed = False
        for x, y in self.items:
            if y < a:
                out.append([x, y])
            elif b < x:
                if not placed:
                    out.append([a, b])
                    placed = True
                out.append([x, y])
            else:
                a, b = min(a, x), max(b, y)
        if not placed:
            out.append([a, b])
        out.sort()
        self.items = out

    def total(self) -> int:
        return sum(b - a for a, b in self.items)

    def missing(self, size: int) -> list[tuple[int, int]]:
        """Inclusive (first, last) byte ranges absent from [0, size)."""
        out: list[tuple[int, int]] = []
        pos = 0
        for a, b in self.items:
            if a > pos:
                out.append((pos, min(a, size) - 1))
            pos = max(pos, b)
        if pos < size:
            out.append((pos, size - 1))
        return [(a, b) for a, b in out if a <= b]

    def first_missing(self, a: int, b: int) -> int | None:
        """First offset in the inclusive range [a, b] that is absent."""
        pos = a
        for x, y in self.items:
            if x <= pos < y:
                pos = y
        return pos if pos <= b else None

    def covers(self, size: int) -> bool:
        return not self.missing(size)


def hash_file(path: Path | str, algorithm: str) -> str:
    hasher = Hasher(algorithm)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            hasher.update(view[:n])
    return hasher.hexdigest()


# -- checksums of pieces, combined ----------------------------------------------------------
# Parallel ranges arrive out of order: each response is checksummed as it is written
# (one piece per response), and the pieces are combined at the end, so that verifying a
# large download needs no second pass over the file. Only CRCs and Adler-32 combine;
# md5 and sha256 are hashed in order when the download is sequential, else from the file.

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32C polynomial (reflected bit order)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table = []
    p = 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # x^(2^k) modulo the polynomial


def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the polynomial: the operator that shifts a CRC over n bytes."""
    p = 1 << 31  # x^0
    k = 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of A+B from crc(A), crc(B) and len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """Adler-32 of A+B from adler(A), adler(B) and len(B)."""
    base = 65521
    rem = len2 % base
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % base
    sum1 += (adler2 & 0xFFFF) + base - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + base - rem
    sum1 %= base
    sum2 %= base
    return sum1 | (sum2 << 16)


_COMBINE: dict[str, Callable[[int, int, int], int]] = {
    "crc32c": crc32c_combine,
    "adler32": adler32_combine,
}


def want_digest(pref: str) -> str:
    if pref in ALGORITHMS:
        return http_name(pref)
    qs = (1.0, 0.8, 0.5, 0.3)
    return ", ".join(
        f"{http_name(a)}" + ("" if q == 1.0 else f";q={q}")
        for a, q in zip(DIGEST_PREFERENCE, qs, strict=True)
    )


def pick_digest(header: str | None, pref: str) -> tuple[str, str] | None:
    if not header:
        return None
    values = from_digest_header(header)
    order = (pref,) if pref in ALGORITHMS else DIGEST_PREFERENCE
    for algo in order:
        if algo in values:
            return algo, values[algo]
    return None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """'bytes a-b/total' -> (a, b, total); 'bytes */total' -> (None, None, total)."""
    if not value or not value.startswith("bytes "):
        return None, None, None
    spec, _, total_s = value[6:].partition("/")
    total = int(total_s) if total_s.strip().isdigit() else None
    if spec.strip() == "*":
        return None, None, total
    a, _, b = spec.partition("-")
    try:
        return int(a), int(b), total
    except ValueError:
        return None, None, total


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _error_cause(resp: aiohttp.ClientResponse) -> str:
    """A short cause from an error response (our servers send JSON `{"error": ...}`)."""
    try:
        body = await asyncio.wait_for(resp.content.read(8192), 5)
    except (TimeoutError, aiohttp.ClientError):
        body = b""
    text = ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            text = str(doc.get("error") or doc.get("message") or "")
    except ValueError:
        text = body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""
    reason = f"HTTP {resp.status}"
    if resp.reason:
        reason += f" {resp.reason}"
    return f"{reason}: {text[:300]}" if text else reason


def _status_error(obj: str, server: str, status: int, cause: str, headers: Any) -> StashError:
    where = f"{cause} (from {server})"
    if status == 404:
        return NotFound(obj, f"not found: {where}", server=server, status=status)
    if status in (401, 403):
        return AuthError(obj, f"not authorized: {where}", server=server, status=status)
    if status in (408, 429) or status >= 500:
        return Retryable(
            obj,
            where,
            server=server,
            status=status,
            retry_after=_retry_after(headers.get("Retry-After")),
        )
    return Permanent(obj, where, server=server, status=status)


def _conn_error(obj: str, server: str, e: BaseException) -> Retryable:
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return Retryable(obj, f"{server} timed out", server=server)
    if isinstance(e, aiohttp.ClientConnectorError):
        why = e.os_error.strerror or str(e.os_error) or "connection failed"
        return Retryable(obj, f"cannot connect to {server}: {why}", server=server)
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return Retryable(obj, f"{server} broke off the transfer", server=server)
    text = str(e) or type(e).__name__
    return Retryable(obj, f"{server} failed: {text}", server=server)


def _director_unreachable(obj: str, director: str, e: BaseException) -> Retryable:
    return Retryable(obj, f"director {director} unreachable: {e or type(e).__name__}")


# -- sources and failover ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    url: str
    kind: str  # cache | origin | direct

    @property
    def server(self) -> str:
        return server_of(self.url)


class _Picker:
    """The current source for one object, and the next one when it fails."""

    def __init__(
        self,
        client: Client,
        obj: str,
        sources: list[Source],
        origin_loader: Callable[[], Awaitable[list[Source]]] | None,
        result: Result,
    ) -> None:
        self.client = client
        self.obj = obj
        self.order = list(sources)
        self.idx = 0
        self.round = 0
        self.origin_loader = origin_loader
        self.result = result
        self.errors: list[StashError] = []
        self._lock = asyncio.Lock()

    async def prepare(self, demoted: set[str]) -> None:
        health = self.client.health
        head = [
            s for s in self.order[: self.client.opts.probe_count] if health.get(s.server) is None
        ]
        if len(self.order) > 1 and head:
            await asyncio.gather(*(self.client._probe(s) for s in head))
        good = [s for s in self.order if health.get(s.server) is not False]
        dead = [s for s in self.order if health.get(s.server) is False]
        ordered = good + dead
        self.order = [s for s in ordered if s.server not in demoted] + [
            s for s in ordered if s.server in demoted
        ]

    async def current(self) -> Source:
        async with self._lock:
            while self.idx >= len(self.order):
                if self.origin_loader is not None:
                    loader, self.origin_loader = self.origin_loader, None
                    try:
                        extra = [s for s in await loader() if s not in self.order]
                    except StashError as e:
                        self.errors.append(e)
                        extra = []
                    if extra:
                        log.debug("%s: falling back to the origin %s", self.obj, extra[0].url)
                        self.order.extend(extra)
                        continue
                self.round += 1
                if self.round >= self.client.opts.rounds or not self.order:
                    raise self.final_error()
                delay = self.client.opts.backoff * (2 ** (self.round - 1))
                hints = [e.retry_after for e in self.errors[-len(self.order) :] if e.retry_after]
                if hints:
                    delay = max(delay, min(max(hints), 30.0))
                log.debug("%s: every source failed, retrying in %.1fs", self.obj, delay)
                await asyncio.sleep(delay)
                self.idx = 0
            return self.order[self.idx]

    def failed(self, src: Source, err: StashError) -> None:
        self.errors.append(err)
        self.result.attempts.append(
            {"server": src.server, "kind": src.kind, "error": err.cause, "status": err.status}
        )
        log.debug("%s: %s failed: %s", self.obj, src.url, err.cause)
        if isinstance(err, LocalError):
            raise err
        if not err.retryable:
            # A cache's 404/401/403 speaks for that cache only (it may not serve the
            # namespace, or not trust the token's issuer): the next cache or the origin
            # may still have the object. Only the origin (or a URL the user named) is
            # the authority on whether it exists and who may read it.
            if src.kind != "cache":
                raise err.with_object(self.obj)
            if src in self.order:  # another range may have dropped it already
                pos = self.order.index(src)
                self.order.remove(src)  # asking it again in a later round cannot help
                if pos < self.idx:
                    self.idx -= 1
            return
        if err.status is None and not isinstance(err, Stalled):
            self.client.health.mark(src.server, False)
        if self.idx < len(self.order) and self.order[self.idx] == src:
            self.idx += 1

    def final_error(self) -> StashError:
        if not self.errors:
            return Retryable(self.obj, "no source to read it from")
        # A refusal (404/401/403) from a source that answered says more than a source
        # that could not be reached: report it, so that an object missing everywhere we
        # could ask is "not found", not a retryable failure because one cache is down.
        refusals = [e for e in self.errors if not e.retryable]
        last = refusals[-1] if refusals else self.errors[-1]
        n = len({e.server for e in self.errors if e.server})
        prefix = f"all {n} sources failed; last: " if n > 1 else ""
        err = type(last)(
            self.obj,
            prefix + last.cause,
            server=last.server,
            status=last.status,
            retry_after=last.retry_after,
        )
        return err


# -- a download in progress -------------------------------------------------------------


class _Part:
    """The hidden partial file of one download and the record of what it holds."""

    def __init__(self, dest: Path, source: str) -> None:
        self.dest = dest
        self.source = source
        self.path = dest.with_name(f".{dest.name}{PART_SUFFIX}")
        self.meta = dest.with_name(f".{dest.name}{PART_SUFFIX}.json")
        self.size: int | None = None
        self.etag: str | None = None
        self.digest: tuple[str, str] | None = None
        self.done = Intervals()
        self.fd = -1
        self.hasher: Hasher | None = None  # on-the-fly hash of a sequential download
        self.hashed_to = 0
        # (start, end, checksum) of each response written, in `piece_algo`
        self.piece_algo: str | None = None
        self.pieces: list[tuple[int, int, int]] = []
        self.servers: dict[str, int] = {}

    def open(self, resume: bool) -> int:
        """Open (or create) the part file; returns the bytes kept from a previous run."""
        kept = 0
        if resume and self.meta.exists() and self.path.exists():
            try:
                doc = json.loads(self.meta.read_text())
                if doc.get("source") == self.source and isinstance(doc.get("size"), int):
                    self.size = doc["size"]
                    self.etag = doc.get("etag")
                    self.done = Intervals(doc.get("done") or [])
                    if self.path.stat().st_size != self.size:
                        self.done = Intervals()
                    kept = self.done.total()
            except (OSError, ValueError):
                self.done = Intervals()
        if not kept:
            self.size = None
            self.etag = None
            self.done = Intervals()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        if not kept:
            flags |= os.O_TRUNC
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise LocalError(str(self.dest), f"cannot write {self.path}: {e.strerror}") from None
        return kept

    def set_size(self, size: int) -> None:
        self.size = size
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise LocalError(str(self.dest), f"cannot size {self.path}: {e.strerror}") from None

    def reset(self) -> None:
        """The object changed since the bytes we hold were read: start over."""
        self.done = Intervals()
        self.size = None
        self.etag = None
        self.digest = None
        self.hasher = None
        self.hashed_to = 0
        self.pieces = []
        os.ftruncate(self.fd, 0)

    def store(self, offset: int, data: bytes, piece: Hasher | None) -> None:
        """Write `data` at `offset`, feed the hashers and record the range as held."""
        self.write_batch(offset, [data], piece)
        self.done.add(offset, offset + len(data))

    def write_batch(self, offset: int, bufs: list[bytes], piece: Hasher | None) -> None:
        """Write `bufs` at `offset` and feed the hashers (the caller records the range
        in `done`)."""
        want = sum(len(b) for b in bufs)
        try:
            n = (
                os.pwrite(self.fd, bufs[0], offset)
                if len(bufs) == 1
                else os.pwritev(self.fd, bufs, offset)
            )
        except OSError as e:
            raise LocalError(str(self.dest), f"cannot write {self.path}: {e.strerror}") from None
        if n != want:
            raise LocalError(str(self.dest), f"short write to {self.path} (disk full?)")
        hasher = self.hasher
        if hasher is not None and offset == self.hashed_to:
            for b in bufs:
                hasher.update(b)
            self.hashed_to += n
        if piece is not None:
            for b in bufs:
                piece.update(b)

    def add_piece(self, start: int, end: int, piece: Hasher) -> None:
        if end > start:
            self.pieces.append((start, end, int(piece.hexdigest(), 16)))

    def combined(self, algo: str) -> str | None:
        """The object's checksum from the pieces, when they tile [0, size) exactly."""
        combine = _COMBINE.get(algo)
        if combine is None or self.piece_algo != algo or self.size is None:
            return None
        value: int | None = None
        pos = 0
        for start, end, check in sorted(self.pieces):
            if start != pos:
                return None  # a gap (bytes kept from an earlier run) or an overlap
            value = check if value is None else combine(value, check, end - start)
            pos = end
        if value is None or pos != self.size:
            return None
        return f"{value & 0xFFFFFFFF:08x}"

    def save(self) -> None:
        if self.size is None or self.fd < 0:
            return
        doc = {
            "source": self.source,
            "size": self.size,
            "etag": self.etag,
            "done": self.done.items,
        }
        tmp = self.meta.with_name(self.meta.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.meta)
        except OSError as e:
            log.debug("could not record progress of %s: %s", self.dest, e)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        for p in (self.path, self.meta):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class _NoHttpOrigin(NotFound):
    """The director knows the namespace but has no http(s) origin for it: nothing to
    read from after the caches (not found), and a configuration error for uploads."""


class _Restart(Exception):
    """The object changed under a resumed download; fetch again from byte 0."""


# -- the client -------------------------------------------------------------------------


class Client:
    """One run's worth of connections, director answers and server health."""

    def __init__(self, options: Options | None = None, progress: Progress | None = None) -> None:
        self.opts = options or Options.load()
        self.progress = progress or Progress(enabled=False)
        self.token: Token | None = find_token(self.opts.token)
        self.health = _Health()
        self._session: aiohttp.ClientSession | None = None
        self._directors: dict[str, str] = {}
        self._collections: dict[str, str] = {}
        self._limiter = _RateLimiter(self.opts.rate_limit)
        self._splicers: ThreadPoolExecutor | None = None

    # session ------------------------------------------------------------------------

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            limit = self.opts.parallel_files * self.opts.parallel_chunks + 16
            # ssl=True: aiohttp's verifying default context, made once at its import
            connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ssl=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.opts.connect_timeout),
                auto_decompress=False,
                headers={"User-Agent": "stashcp (stashflow)", "Accept-Encoding": "identity"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._splicers is not None:
            self._splicers.shutdown(wait=False)
            self._splicers = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def auth_headers(self, ns: NamespaceInfo | None, *, write: bool = False) -> dict[str, str]:
        if self.token is None:
            return {}
        if write or ns is None or ns.require_token:
            return self.token.header()
        return {}

    # director -----------------------------------------------------------------------

    async def director_url(self, remote: Remote) -> str:
        if remote.scheme == "pelican":
            return await self._discover(remote.host)
        director = self._configured_director()
        if director is not None:
            return director
        if remote.scheme in ("osdf", "stash"):
            return await self._discover(OSDF_FEDERATION)
        raise UsageError(
            remote.url(),
            "no director configured: use --director URL, STASHFLOW_DIRECTOR, "
            "a [client] director setting, or --cache URL",
        )

    def _configured_director(self) -> str | None:
        if not self.opts.director:
            return None
        d = self.opts.director.strip()
        return (d if "://" in d else f"https://{d}").rstrip("/")

    async def _discover(self, host: str) -> str:
        if host in self._directors:
            return self._directors[host]
        base = host if "://" in host else f"https://{host}"
        url = base.rstrip("/") + "/.well-known/pelican-configuration"
        session = await self.session()
        try:
            async with asyncio.timeout(self.opts.header_timeout):
                async with session.get(url) as resp:
                    if resp.status != 200:
                        cause = await _error_cause(resp)
                        raise Retryable(host, f"federation discovery at {url} failed: {cause}")
                    doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise Retryable(host, f"federation discovery at {url} failed: {e}") from None
        endpoint = doc.get("director_endpoint") if isinstance(doc, dict) else None
        if not endpoint:
            raise Retryable(host, f"{url} names no director_endpoint")
        self._directors[host] = str(endpoint).rstrip("/")
        return self._directors[host]

    async def locate(self, remote: Remote, *, origin: bool = False) -> Location:
        """The director's answer for an object: candidate URLs, best first."""
        director = await self.director_url(remote)
        path = ("/api/v1.0/director/origin" if origin else "") + remote.path
        url = join_url(director, path)
        session = await self.session()
        obj = remote.url()
        try:
            async with asyncio.timeout(self.opts.header_timeout):
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        loc = location_from_headers(resp.headers)
                        if not loc.urls:
                            raise Retryable(obj, f"director {director} redirected nowhere")
                        log.debug("%s: director says %s", obj, loc.urls)
                        return loc
                    cause = await _error_cause(resp)
                    if (
                        origin
                        and resp.status == 404
                        and location_from_headers(resp.headers).namespace
                    ):
                        # a 404 that names the namespace: it exists, its origin is not http
                        raise _NoHttpOrigin(obj, f"director: {cause}", server=director, status=404)
                    raise _status_error(
                        obj, director, resp.status, f"director: {cause}", resp.headers
                    )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _director_unreachable(obj, director, e) from None

    async def _upload_targets(self, remote: Remote) -> list[str]:
        """Where an upload (or MKCOL) goes: the namespace's http(s) origins."""
        if remote.direct:
            return [remote.url()]
        if self.opts.origin and remote.scheme != "pelican":
            return [join_url(self.opts.origin, remote.path)]
        try:
            return (await self.locate(remote, origin=True)).urls
        except _NoHttpOrigin as e:
            raise UsageError(
                remote.url(),
                f"cannot upload: {e.cause}; give the namespace an http(s) origin at the "
                "director, or name one with --origin URL",
                server=e.server,
                status=e.status,
            ) from None

    def fixed_sources(self, remote: Remote) -> list[Source] | None:
        """The sources of an object when no director needs asking (a direct URL,
        `--origin` alone, `--cache`), best first; None when the director decides."""
        if remote.direct:
            return [Source(remote.url(), "direct")]
        if self.opts.origin and not self.opts.caches and not self.opts.director:
            if remote.scheme != "pelican":
                return [Source(join_url(self.opts.origin, remote.path), "origin")]
        if self.opts.caches:
            return [Source(join_url(c, remote.path), "cache") for c in self.opts.caches]
        return None

    def director_request(self, remote: Remote) -> str | None:
        """The director URL of an object whose GET the director answers with a redirect
        to its best cache, when that URL is known without asking anyone (a configured
        director, no discovery) and no token is held: a redirect followed blindly must
        not carry one."""
        director = self._configured_director()
        if self.token is not None or director is None or remote.scheme == "pelican":
            return None
        return join_url(director, remote.path)

    async def sources(
        self, remote: Remote
    ) -> tuple[list[Source], NamespaceInfo | None, Callable[[], Awaitable[list[Source]]] | None]:
        fixed = self.fixed_sources(remote)
        if fixed and fixed[0].kind != "cache":
            return fixed, None, None
        if fixed:
            forced = fixed
            origin_url = self.opts.origin

            async def forced_origin() -> list[Source]:
                assert origin_url is not None
                return [Source(join_url(origin_url, remote.path), "origin")]

            fallback = forced_origin if origin_url and self.opts.origin_fallback else None
            return forced, None, fallback
        loc = await self.locate(remote)
        srcs = [Source(u, "cache") for u in loc.urls]

        async def origins() -> list[Source]:
            o = await self.locate(remote, origin=True)
            return [Source(u, "origin") for u in o.urls]

        return srcs, loc.namespace, (origins if self.opts.origin_fallback else None)

    async def _probe(self, src: Source) -> bool:
        health = self.health
        fut = health._probes.get(src.server)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            health._probes[src.server] = fut
            alive = False
            try:
                session = await self.session()
                async with asyncio.timeout(self.opts.probe_timeout):
                    async with session.head(src.url, allow_redirects=False) as resp:
                        alive = resp.status < 500 or resp.status == 503
            except (aiohttp.ClientError, TimeoutError, OSError):
                alive = False
            log.debug("probe %s: %s", src.server, "alive" if alive else "dead")
            if health.get(src.server) is None:
                health.mark(src.server, alive)
            fut.set_result(alive)
        return await fut

    # downloads ----------------------------------------------------------------------

    async def download(self, remote: Remote, dest: Path) -> Result:
        """Fetch one object to `dest` (a file path); never raises a StashError, the
        Result carries it."""
        result = Result(source=remote.url(), dest=str(dest))
        demoted: set[str] = set()
        try:
            for attempt in range(3):
                try:
                    await self._download_once(remote, dest, result, demoted)
                    break
                except ChecksumMismatch as e:
                    result.checksum_failures += 1
                    log.debug("%s", e)
                    if attempt == 2:
                        raise
            result.ok = True
        except StashError as e:
            result.error = e if e.obj == remote.url() else e.with_object(remote.url())
        finally:
            result.end = time.time()
            self.progress.file_done()
        return result

    async def _download_once(
        self, remote: Remote, dest: Path, result: Result, demoted: set[str]
    ) -> None:
        obj = remote.url()
        if not dest.parent.is_dir():
            raise LocalError(obj, f"destination directory {dest.parent} does not exist")
        sources, ns, origin_loader = await self.sources(remote)
        picker = _Picker(self, obj, sources, origin_loader, result)
        await picker.prepare(demoted)
        part = _Part(dest, obj)
        kept = part.open(self.opts.resume)
        result.resumed = kept
        counted = 0  # bytes of this object added to progress.total_bytes
        keep_part = False
        try:
            if kept:
                log.debug("%s: resuming, %d of %s bytes present", obj, kept, part.size)
                self.progress.add(kept)
            # the first request learns the size (and the checksum)
            while part.size is None or not part.done.covers(part.size):
                src = await picker.current()
                start = part.done.first_missing(0, (part.size or 1 << 62) - 1) or 0
                try:
                    await self._fetch(part, src, start, None, ns, first=True, result=result)
                    break
                except _Restart:
                    log.debug("%s changed since the partial download; starting over", obj)
                    self.progress.add(-part.done.total())
                    part.reset()
                    result.resumed = 0
                except StashError as e:
                    keep_part = part.size is not None
                    picker.failed(src, e)
            assert part.size is not None
            self.progress.add_total(part.size)
            counted = part.size
            keep_part = True
            # the rest in parallel ranges
            missing = self._chunks(part.done.missing(part.size))
            if missing:
                queue = list(missing)
                workers = [
                    asyncio.create_task(self._worker(part, picker, queue, ns, result))
                    for _ in range(min(self.opts.parallel_chunks, len(queue)))
                ]
                try:
                    await asyncio.gather(*workers)
                finally:
                    for w in workers:
                        w.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
            if not part.done.covers(part.size):
                raise Retryable(obj, "transfer incomplete")
            await self._verify(part, picker, ns, result, demoted)
            part.close()
            try:
                os.replace(part.path, dest)
            except OSError as e:
                raise LocalError(obj, f"cannot rename to {dest}: {e.strerror}") from None
            with contextlib.suppress(FileNotFoundError):
                part.meta.unlink()
            result.size = part.size
            result.servers = list(part.servers)
        except BaseException as e:
            resumable = (
                keep_part
                and self.opts.resume
                and not isinstance(e, ChecksumMismatch | NotFound | AuthError | _Restart)
            )
            if resumable:
                part.save()
                part.close()
            else:
                part.discard()
            if counted:
                self.progress.add_total(-counted)
            self.progress.add(-part.done.total() if not resumable else 0)
            raise

    def _chunks(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        size = int(self.opts.chunk_size)
        for a, b in ranges:
            while a <= b:
                e = min(b, a + size - 1)
                out.append((a, e))
                a = e + 1
        return out

    async def _worker(
        self,
        part: _Part,
        picker: _Picker,
        queue: list[tuple[int, int]],
        ns: NamespaceInfo | None,
        result: Result,
    ) -> None:
        while queue:
            a, b = queue.pop(0)
            pos: int | None = a
            while pos is not None:
                src = await picker.current()
                try:
                    await self._fetch(part, src, pos, b, ns, first=False, result=result)
                except StashError as e:
                    picker.failed(src, e)
                pos = part.done.first_missing(a, b)
            part.save()

    async def _fetch(
        self,
        part: _Part,
        src: Source,
        start: int,
        end: int | None,
        ns: NamespaceInfo | None,
        *,
        first: bool,
        result: Result,
    ) -> None:
        """GET bytes [start, end] (end None: one chunk, size not known yet) from `src`
        into the part file. Raises a StashError for this source's failure."""
        obj = part.source
        opts = self.opts
        last = end if end is not None else start + int(opts.chunk_size) - 1
        headers = {"Range": f"bytes={start}-{last}", **self.auth_headers(ns)}
        if first and opts.checksum != "none" and part.digest is None:
            headers["Want-Digest"] = want_digest(opts.checksum)
        if first and start > 0 and part.etag:
            headers["If-Range"] = part.etag
        session = await self.session()
        server = src.server
        got = 0
        try:
            async with asyncio.timeout(opts.header_timeout) as cm:
                async with session.get(src.url, headers=headers, allow_redirects=True) as resp:
                    self.health.mark(server, True)
                    status = resp.status
                    if status == 416 and first:
                        _, _, total = _parse_content_range(resp.headers.get("Content-Range"))
                        if total is None:
                            raise Retryable(
                                obj, f"{server} answered 416 without a size", server=server
                            )
                        if part.size is not None and total != part.size:
                            raise _Restart()
                        if part.size is None:
                            part.set_size(total)
                        if total and not part.done.covers(total):
                            raise _Restart()
                        self._note_meta(part, resp, first)
                        return
                    if status not in (200, 206):
                        cause = await _error_cause(resp)
                        raise _status_error(obj, server, status, cause, resp.headers)
                    if status == 206:
                        a, b, total = _parse_content_range(resp.headers.get("Content-Range"))
                        if a is None or b is None or total is None or a != start:
                            raise Retryable(
                                obj, f"{server} sent a bad Content-Range", server=server
                            )
                        offset, expect = a, b - a + 1
                    else:
                        clen = resp.headers.get("Content-Length")
                        total = int(clen) if clen and clen.isdigit() else None
                        if start > 0 and not first:
                            raise Retryable(obj, f"{server} ignores Range requests", server=server)
                        offset, expect = 0, total if total is not None else -1
                    if part.size is None:
                        if total is not None:
                            part.set_size(total)
                    elif total is not None and total != part.size:
                        if first:
                            raise _Restart()
                        raise Retryable(
                            obj,
                            f"{server} has a different version ({total} bytes, not {part.size})",
                            server=server,
                        )
                    if first and status == 200 and start > 0:
                        # a full body: the server cannot resume, or the object changed
                        self.progress.add(-part.done.total())
                        part.done = Intervals()
                        part.pieces = []
                        result.resumed = 0
                    if first and offset == 0:
                        pref = opts.checksum
                        algo = pref if pref in ALGORITHMS else "crc32c"
                        part.hasher = Hasher(algo)
                        part.hashed_to = 0
                    self._note_meta(part, resp, first)
                    if part.piece_algo is None and opts.checksum != "none":
                        offered = part.digest[0] if part.digest else None
                        pref = opts.checksum if opts.checksum in ALGORITHMS else "crc32c"
                        algo = offered or pref
                        part.piece_algo = algo if algo in _COMBINE else None
                    pos = offset
                    # this response's bytes are one piece of the object's checksum
                    piece = Hasher(part.piece_algo) if part.piece_algo else None
                    spliced = self._splice_from(resp, expect)
                    body = (
                        self._spliced(resp, part, pos, offset + expect, piece, cm, server, *spliced)
                        if spliced is not None
                        else self._buffered(resp, part, pos, expect, piece, cm, server)
                    )
                    try:
                        async for n in body:
                            pos += n
                            got += n
                    finally:
                        if piece is not None:
                            part.add_piece(offset, pos, piece)
                    if expect < 0:  # no length announced: what came is the object
                        part.set_size(pos)
                    elif pos - offset < expect:
                        raise Retryable(
                            obj,
                            f"{server} sent {pos - offset} of {expect} bytes",
                            server=server,
                        )
        except TimeoutError:
            waited = opts.stall_window if got else opts.header_timeout
            raise Stalled(
                obj,
                f"{server} stalled: nothing received for {waited:g}s",
                server=server,
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise _conn_error(obj, server, e) from None
        finally:
            if got:
                part.servers[server] = part.servers.get(server, 0) + got
                result.transferred += got

    async def _buffered(
        self,
        resp: aiohttp.ClientResponse,
        part: _Part,
        pos: int,
        expect: int,
        piece: Hasher | None,
        cm: asyncio.Timeout,
        server: str,
    ) -> AsyncIterator[int]:
        """Write the body of `resp` into the part file from `pos` as it arrives (at most
        `expect` bytes; -1: until the end), watched for stalls. Yields the bytes written,
        already recorded in `part.done` and the hashers."""
        loop = asyncio.get_running_loop()
        window = self.opts.stall_window
        win_start, win_bytes = loop.time(), 0
        cm.reschedule(win_start + window)
        written = 0
        async for data in resp.content.iter_any():
            if expect >= 0 and written + len(data) > expect:
                data = data[: expect - written]
            if data:
                part.store(pos + written, data, piece)
                written += len(data)
                win_bytes += len(data)
                self.progress.add(len(data))
                yield len(data)
                await self._limiter.consume(len(data))
            now = loop.time()
            if now - win_start >= window:
                if win_bytes < self.opts.min_rate * (now - win_start):
                    raise Stalled(
                        part.source,
                        f"{server} stalled: {win_bytes} bytes in {now - win_start:.1f}s",
                        server=server,
                    )
                win_start, win_bytes = now, 0
            cm.reschedule(now + window)
            if expect >= 0 and written >= expect:
                break

    def _splice_from(self, resp: aiohttp.ClientResponse, expect: int) -> tuple[int, bytes] | None:
        """(socket, bytes already buffered) when the body of `resp` can go from the socket
        to the file by splice: Linux, plain HTTP, a large body of announced length, no
        rate limit. The socket is then taken from aiohttp: the loop stops reading it and
        the connection is closed after the body, never reused."""
        opts = self.opts
        if not (splice.AVAILABLE and opts.splice) or opts.rate_limit or expect < SPLICE_MIN:
            return None
        if resp.headers.get("Content-Length") != str(expect) or "chunked" in resp.headers.get(
            "Transfer-Encoding", ""
        ):
            return None
        conn = resp.connection
        transport = conn.transport if conn is not None else None
        if transport is None or transport.get_extra_info("ssl_object") is not None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        # Drain what aiohttp holds, then stop the loop reading (draining may have resumed
        # it); nothing runs in between, so no byte is read by both.
        buffered = resp.content.read_nowait()
        transport.pause_reading()
        return sock.fileno(), buffered

    async def _spliced(
        self,
        resp: aiohttp.ClientResponse,
        part: _Part,
        pos: int,
        end: int,
        piece: Hasher | None,
        cm: asyncio.Timeout,
        server: str,
        sock: int,
        buffered: bytes,
    ) -> AsyncIterator[int]:
        """Write the body of `resp` into the part file at `pos` (up to `end`): the bytes
        aiohttp had buffered, then the rest by splice in a thread. Yields the bytes
        written, already recorded in `part.done` and the hashers. A stall raises
        Stalled; a body cut short just ends (the caller counts the bytes)."""
        loop = asyncio.get_running_loop()
        try:
            buffered = buffered[: end - pos]
            if buffered:
                part.store(pos, buffered, piece)
                self.progress.add(len(buffered))
                pos += len(buffered)
                yield len(buffered)
            if self._splicers is None:
                self._splicers = ThreadPoolExecutor(
                    self.opts.parallel_files * self.opts.parallel_chunks,
                    thread_name_prefix="stashcp-splice",
                )
            stop = threading.Event()
            job = loop.run_in_executor(
                self._splicers,
                functools.partial(
                    splice.receive,
                    sock,
                    part.fd,
                    pos,
                    end - pos,
                    window=self.opts.stall_window,
                    min_rate=self.opts.min_rate,
                    stop=stop,
                    report=lambda n: loop.call_soon_threadsafe(self.progress.add, n),
                ),
            )
            cm.reschedule(None)  # the thread applies the stall rule itself
            failure: splice.Interrupted | None = None
            try:
                landed = await asyncio.shield(job)
            except splice.Interrupted as e:
                landed, failure = e.received, e
            except OSError as e:
                raise LocalError(
                    str(part.dest), f"cannot write {part.path}: {e.strerror}"
                ) from None
            except asyncio.CancelledError:
                # the thread must be gone before the part file can be closed
                stop.set()
                while not job.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([job])
                raise
        finally:
            resp.close()
        sequential = part.hasher if part.hasher is not None and part.hashed_to == pos else None
        hashers = [h for h in (piece, sequential) if h is not None]
        await asyncio.to_thread(splice.hash_range, part.fd, pos, landed, hashers)
        if sequential is not None:
            part.hashed_to += landed
        part.done.add(pos, pos + landed)
        log.debug("%s: %d bytes from %s by splice", part.source, landed, server)
        yield landed
        if failure is not None and failure.stalled:
            raise Stalled(part.source, f"{server} stalled: {failure.reason}", server=server)

    def _note_meta(self, part: _Part, resp: aiohttp.ClientResponse, first: bool) -> None:
        if part.digest is None:
            part.digest = pick_digest(resp.headers.get("Digest"), self.opts.checksum)
        if first:
            etag = resp.headers.get("ETag")
            if part.etag and etag and etag != part.etag and part.done.total():
                raise _Restart()
            part.etag = etag or part.etag

    async def _verify(
        self,
        part: _Part,
        picker: _Picker,
        ns: NamespaceInfo | None,
        result: Result,
        demoted: set[str],
    ) -> None:
        assert part.size is not None
        st = os.fstat(part.fd)
        if st.st_size != part.size:
            raise Retryable(part.source, f"size {st.st_size} is not the object size {part.size}")
        if self.opts.checksum == "none":
            return
        if part.digest is None:
            part.digest = await self._head_digest(picker, ns)
        if part.digest is None:
            log.debug("%s: no checksum offered; verified the size only", part.source)
            return
        algo, expected = part.digest
        if (
            part.hasher is not None
            and part.hasher.algorithm == algo
            and part.hashed_to == part.size
        ):
            actual = part.hasher.hexdigest()
        else:
            actual = part.combined(algo) or await asyncio.to_thread(hash_file, part.path, algo)
        if actual != expected:
            demoted.update(part.servers)
            raise ChecksumMismatch(
                part.source,
                f"{algo} checksum mismatch: got {actual}, expected {expected} "
                f"(from {', '.join(part.servers) or 'the partial file'})",
            )
        result.checksum = f"{algo}:{actual}"

    async def _head_digest(
        self, picker: _Picker, ns: NamespaceInfo | None
    ) -> tuple[str, str] | None:
        try:
            src = await picker.current()
        except StashError:
            return None
        session = await self.session()
        headers = {"Want-Digest": want_digest(self.opts.checksum), **self.auth_headers(ns)}
        try:
            async with asyncio.timeout(self.opts.header_timeout):
                async with session.head(src.url, headers=headers) as resp:
                    if resp.status >= 300:
                        return None
                    return pick_digest(resp.headers.get("Digest"), self.opts.checksum)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    # reads for fsspec -------------------------------------------------------------------

    async def stat(self, remote: Remote) -> dict[str, Any]:
        """HEAD the object through the first source that answers."""
        obj = remote.url()
        sources, ns, origin_loader = await self.sources(remote)
        result = Result(source=obj, dest="")
        picker = _Picker(self, obj, sources, origin_loader, result)
        await picker.prepare(set())
        session = await self.session()
        while True:
            src = await picker.current()
            try:
                async with asyncio.timeout(self.opts.header_timeout):
                    async with session.head(src.url, headers=self.auth_headers(ns)) as resp:
                        if resp.status >= 300:
                            raise _status_error(
                                obj, src.server, resp.status, f"HTTP {resp.status}", resp.headers
                            )
                        clen = resp.headers.get("Content-Length")
                        return {
                            "size": int(clen) if clen and clen.isdigit() else None,
                            "etag": resp.headers.get("ETag"),
                            "last_modified": resp.headers.get("Last-Modified"),
                        }
            except StashError as e:
                picker.failed(src, e)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                picker.failed(src, _conn_error(obj, src.server, e))

    async def read(self, remote: Remote, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object, failing over between sources."""
        if end <= start:
            return b""
        obj = remote.url()
        sources, ns, origin_loader = await self.sources(remote)
        result = Result(source=obj, dest="")
        picker = _Picker(self, obj, sources, origin_loader, result)
        await picker.prepare(set())
        session = await self.session()
        buf = bytearray()
        while len(buf) < end - start:
            src = await picker.current()
            first = start + len(buf)
            headers = {"Range": f"bytes={first}-{end - 1}", **self.auth_headers(ns)}
            try:
                async with asyncio.timeout(self.opts.header_timeout) as cm:
                    async with session.get(src.url, headers=headers) as resp:
                        if resp.status == 416:
                            return bytes(buf)
                        if resp.status not in (200, 206):
                            cause = await _error_cause(resp)
                            raise _status_error(obj, src.server, resp.status, cause, resp.headers)
                        skip = first if resp.status == 200 else 0
                        loop = asyncio.get_running_loop()
                        async for data in resp.content.iter_any():
                            cm.reschedule(loop.time() + self.opts.stall_window)
                            if skip:
                                cut = min(skip, len(data))
                                data, skip = data[cut:], skip - cut
                            buf += data
                            if len(buf) >= end - start:
                                break
                        if len(buf) < end - start and resp.status == 206:
                            _, _, total = _parse_content_range(resp.headers.get("Content-Range"))
                            if total is not None and start + len(buf) >= total:
                                return bytes(buf)
                            raise Retryable(
                                obj, f"{src.server} sent a short body", server=src.server
                            )
                        if resp.status == 200:
                            return bytes(buf[: end - start])
            except StashError as e:
                picker.failed(src, e)
            except TimeoutError:
                picker.failed(src, Stalled(obj, f"{src.server} stalled", server=src.server))
            except (aiohttp.ClientError, OSError) as e:
                picker.failed(src, _conn_error(obj, src.server, e))
        return bytes(buf[: end - start])

    # listings ---------------------------------------------------------------------------

    async def _listing_url(self, remote: Remote) -> tuple[str, NamespaceInfo | None]:
        if remote.direct:
            return remote.url(), None
        if self.opts.origin and remote.scheme != "pelican":
            return join_url(self.opts.origin, remote.path), None
        if self.opts.caches and not self.opts.director and remote.scheme != "pelican":
            return join_url(self.opts.caches[0], remote.path), None
        for prefix, base in self._collections.items():
            if remote.path == prefix or remote.path.startswith(prefix.rstrip("/") + "/"):
                return join_url(base, remote.path), None
        director = await self.director_url(remote)
        session = await self.session()
        obj = remote.url()
        try:
            async with asyncio.timeout(self.opts.header_timeout):
                async with session.request(
                    "PROPFIND",
                    join_url(director, remote.path),
                    headers={"Depth": "1"},
                    allow_redirects=False,
                ) as resp:
                    loc = location_from_headers(resp.headers)
                    ns = loc.namespace
                    if ns and ns.collections_url:
                        self._collections[ns.namespace] = ns.collections_url
                        return join_url(ns.collections_url, remote.path), ns
                    if resp.status in (301, 302, 303, 307, 308) and loc.urls:
                        return loc.urls[0], ns
                    if resp.status == 207:
                        return join_url(director, remote.path), ns
                    cause = await _error_cause(resp)
                    if resp.status < 400:
                        raise Permanent(obj, f"director {director} offers no listing ({cause})")
                    raise _status_error(
                        obj, director, resp.status, f"director: {cause}", resp.headers
                    )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _director_unreachable(obj, director, e) from None

    async def propfind(self, remote: Remote, depth: int = 1) -> tuple[Entry | None, list[Entry]]:
        """(the entry itself, its children) from a WebDAV PROPFIND."""
        obj = remote.url()
        url, ns = await self._listing_url(remote)
        session = await self.session()
        headers = {"Depth": str(depth), "Content-Type": "application/xml", **self.auth_headers(ns)}
        body = (
            b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop>'
            b"<D:resourcetype/><D:getcontentlength/><D:getlastmodified/></D:prop></D:propfind>"
        )
        for attempt in range(self.opts.rounds):
            try:
                async with asyncio.timeout(self.opts.header_timeout):
                    async with session.request("PROPFIND", url, headers=headers, data=body) as resp:
                        if resp.status != 207:
                            cause = await _error_cause(resp)
                            err = _status_error(
                                obj, server_of(url), resp.status, cause, resp.headers
                            )
                            if resp.status in (400, 405, 501):
                                err = Permanent(obj, f"{server_of(url)} cannot list ({cause})")
                            raise err
                        text = await resp.read()
                entries = parse_multistatus(text)
                break
            except Retryable as e:
                if attempt + 1 >= self.opts.rounds:
                    raise
                await asyncio.sleep(self.opts.backoff * 2**attempt + (e.retry_after or 0))
            except (aiohttp.ClientError, TimeoutError) as e:
                if attempt + 1 >= self.opts.rounds:
                    raise _conn_error(obj, server_of(url), e) from None
                await asyncio.sleep(self.opts.backoff * 2**attempt)
            except ValueError as e:
                raise Retryable(obj, f"{server_of(url)}: {e}") from None
        base = urllib.parse.urlsplit(url).path
        base_norm = urllib.parse.unquote(base).rstrip("/") or "/"
        # listings answer with server paths; map them back onto object paths
        prefix = (
            base_norm[: len(base_norm) - len(remote.path.rstrip("/"))]
            if base_norm.endswith(remote.path.rstrip("/"))
            else ""
        )
        me: Entry | None = None
        children: list[Entry] = []
        for ent in entries:
            path = ent.path
            if prefix and path.startswith(prefix):
                path = path[len(prefix) :] or "/"
            ent = Entry(path=path, size=ent.size, is_dir=ent.is_dir, mtime=ent.mtime)
            if path.rstrip("/") == remote.path.rstrip("/"):
                me = ent
            else:
                children.append(ent)
        return me, children

    async def walk(self, remote: Remote) -> list[Entry]:
        """Every file under a collection (recursively); [] when it is a file."""
        out: list[Entry] = []
        sem = asyncio.Semaphore(8)

        async def visit(path: str) -> None:
            async with sem:
                _, children = await self.propfind(remote.child(path))
            subdirs = []
            for ent in children:
                if ent.is_dir:
                    subdirs.append(ent.path)
                else:
                    out.append(ent)
            await asyncio.gather(*(visit(p) for p in subdirs))

        await visit(remote.path)
        return sorted(out, key=lambda e: e.path)

    async def glob(self, remote: Remote) -> list[Entry]:
        """Entries matching a pattern with *, ? and [...] in any path component."""
        parts = [p for p in remote.path.split("/") if p]
        root = glob_root(remote.path)
        depth = len([p for p in root.split("/") if p])
        current = [root]
        for i in range(depth, len(parts)):
            pattern = parts[i]
            nxt: list[str] = []
            last = i == len(parts) - 1
            found: list[Entry] = []
            for base in current:
                try:
                    _, children = await self.propfind(remote.child(base))
                except NotFound:
                    continue
                for ent in children:
                    name = posixpath.basename(ent.path.rstrip("/"))
                    if fnmatch.fnmatchcase(name, pattern):
                        if last:
                            found.append(ent)
                        elif ent.is_dir:
                            nxt.append(ent.path)
            if last:
                return sorted(found, key=lambda e: e.path)
            current = nxt
        return []

    # uploads ------------------------------------------------------------------------

    async def upload(self, src: Path, remote: Remote) -> Result:
        result = Result(source=str(src), dest=remote.url(), direction="upload")
        try:
            await self._upload(src, remote, result)
            result.ok = True
        except StashError as e:
            result.error = e
        finally:
            result.end = time.time()
            self.progress.file_done()
        return result

    async def _upload(self, src: Path, remote: Remote, result: Result) -> None:
        obj = remote.url()
        try:
            st = os.stat(src)
        except OSError as e:
            raise LocalError(str(src), f"cannot read: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise LocalError(str(src), "is not a regular file")
        size = st.st_size
        algo = self.opts.checksum if self.opts.checksum in ALGORITHMS else "crc32c"
        digest: str | None = None
        if self.opts.checksum != "none":
            try:
                digest = await asyncio.to_thread(hash_file, src, algo)
            except OSError as e:
                raise LocalError(str(src), f"cannot read: {e.strerror}") from None
        targets = await self._upload_targets(remote)
        self.progress.add_total(size)
        session = await self.session()
        errors: list[StashError] = []
        for round_ in range(self.opts.rounds):
            queue = list(targets)
            while queue:
                url = queue.pop(0)
                server = server_of(url)
                headers = {
                    "Content-Length": str(size),
                    "Content-Type": "application/octet-stream",
                    **self.auth_headers(None, write=True),
                }
                if digest is not None:
                    headers["Digest"] = to_digest_header(algo, digest)
                sent = 0

                async def body() -> AsyncIterator[bytes]:
                    nonlocal sent
                    with open(src, "rb") as f:  # noqa: ASYNC230 - local reads are quick
                        while True:
                            data = f.read(_READ)
                            if not data:
                                break
                            sent += len(data)
                            self.progress.add(len(data))
                            await self._limiter.consume(len(data))
                            yield data

                try:
                    async with session.put(
                        url, data=body(), headers=headers, allow_redirects=False
                    ) as resp:
                        if resp.status in (301, 302, 307, 308) and resp.headers.get("Location"):
                            self.progress.add(-sent)
                            queue.insert(0, urllib.parse.urljoin(url, resp.headers["Location"]))
                            continue
                        if resp.status >= 300:
                            cause = await _error_cause(resp)
                            raise _status_error(obj, server, resp.status, cause, resp.headers)
                    result.size = size
                    result.transferred += sent
                    result.servers = [server]
                    if digest is not None:
                        result.checksum = f"{algo}:{digest}"
                    return
                except (aiohttp.ClientError, TimeoutError) as e:
                    err: StashError = _conn_error(obj, server, e)
                except StashError as e:
                    if not e.retryable:
                        if isinstance(e, AuthError) and self.token is None:
                            raise AuthError(
                                obj,
                                e.cause + "; no token found (--token, BEARER_TOKEN, "
                                "BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u$UID, /tmp/bt_u$UID)",
                                server=e.server,
                                status=e.status,
                            ) from None
                        raise
                    err = e
                self.progress.add(-sent)
                errors.append(err)
                result.attempts.append({"server": server, "kind": "origin", "error": err.cause})
            if round_ + 1 < self.opts.rounds:
                await asyncio.sleep(self.opts.backoff * 2**round_)
        last = errors[-1] if errors else Retryable(obj, "no origin to upload to")
        raise Retryable(obj, last.cause, server=last.server, status=last.status)

    async def mkcol(self, remote: Remote) -> None:
        """Create a collection at the origin (an existing one is fine)."""
        url = (await self._upload_targets(remote))[0]
        session = await self.session()
        try:
            headers = self.auth_headers(None, write=True)
            async with session.request("MKCOL", url, headers=headers) as resp:
                if resp.status in (401, 403):
                    cause = await _error_cause(resp)
                    raise _status_error(
                        remote.url(), server_of(url), resp.status, cause, resp.headers
                    )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _conn_error(remote.url(), server_of(url), e) from None


def default_progress(quiet: bool = False) -> Progress:
    return Progress(enabled=False if quiet else None)
