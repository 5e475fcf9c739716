"""Settings of one cache, from flags, a TOML `[cache]` table and STASHFLOW_CACHE_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stashflow.integration.config import ConfigError, parse_duration, parse_size

MAX_AUTO_WORKERS = 16  # each worker holds its own LMDB environment and buffers


@dataclass
class CacheConfig:
    directory: Path
    size: int
    origins: dict[str, list[str]]  # namespace -> its origins, tried in turn
    listen: str = "127.0.0.1:8000"
    # worker processes: one per CPU by default, as nginx's `worker_processes auto` (a
    # worker is one event loop, so a single one leaves every other core idle)
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, MAX_AUTO_WORKERS))
    block_size: int = 1 << 20
    inline_max: int = 64 << 10
    readahead: int = 4  # blocks fetched beyond what was asked
    window: int = 16  # blocks claimed ahead of the serving position in one origin request
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    inode_high_watermark: float = 0.95
    inode_low_watermark: float = 0.90
    policy: str = "lfuda"
    revalidate_ttl: float = 60.0
    negative_ttl: float = 30.0
    # how often each worker writes its batched hit counts and access times to the index.
    # Each write re-ranks every object read since the last one (a record decoded and
    # encoded again): with 10,000 small objects read over and over, every 5 s took 12%
    # of a worker's time, every second a quarter. The eviction order lags by this much,
    # which matters little at cache scale; a worker starting a watermark eviction pass
    # writes its own first (evictions made room for a fetch use the order as it is).
    access_flush: float = 15.0
    origin_timeout: float = 30.0  # connect / metadata requests to an origin
    origin_concurrency: int = 16  # concurrent fetches per origin and worker
    total_concurrency: int = 64  # concurrent fetches per worker, all origins
    queue_limit: int = 256  # requests waiting for a fetch slot per origin before 429
    stall_window: float = 30.0
    min_rate: int = 16 << 10  # bytes/s over stall_window below which a fetch is abandoned
    admin_token: str | None = None
    access_log: str | None = "-"  # "-" = stderr, None = off, else a file
    verify: str = "on-change"  # "on-change" or "always": when block checksums are checked
    # federation: the director to register with, and how this cache presents itself
    director: str | None = None
    site: str | None = None
    name: str | None = None  # identity at the director [public_url]
    public_url: str | None = None  # the URL clients are sent to [http://listen]
    registration_token: str | None = None
    # tokens: namespaces whose reads need a WLCG token, the issuers trusted for them
    protected: list[str] = field(default_factory=list)
    issuers: dict[str, str] = field(default_factory=dict)  # issuer -> JWKS file/URL ("" = discover)
    # issuer -> the path its scopes are relative to (default "/": scopes name federation
    # paths); caches learn it from the director for the namespaces they learn there
    issuer_base_paths: dict[str, str] = field(default_factory=dict)
    # token audiences accepted besides the cache's public URL and the WLCG "any" audience
    # (e.g. the federation's or the director's URL, for which a VO mints its tokens)
    audiences: list[str] = field(default_factory=list)
    origin_token_file: str | None = None  # the cache's own token for protected origins
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def advertised_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.host_port
        return f"http://{host}:{port}"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"invalid listen address {self.listen!r}: use HOST:PORT")
        return host.strip("[]"), int(port)

    def check(self) -> None:
        if not self.origins and not self.director:
            raise ConfigError(
                "no origin configured: give at least one --origin /ns=URL, or --director URL"
            )
        if self.protected and not self.issuers and not self.director:
            raise ConfigError("protected namespaces need a trusted --issuer")
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise ConfigError("watermarks must satisfy 0 < low < high <= 1")
        if self.block_size < 4096 or self.block_size & (self.block_size - 1):
            raise ConfigError("block size must be a power of two of at least 4 KiB")
        if self.inline_max > self.block_size:
            raise ConfigError("inline-max must not exceed the block size")
        if self.size < self.block_size * 4:
            raise ConfigError("cache size must be at least four blocks")
        if self.origin_concurrency < 1 or self.origin_concurrency > self.total_concurrency:
            raise ConfigError("origin_concurrency must be between 1 and total_concurrency")
        if self.origin_concurrency == self.total_concurrency and (
            len(self.origins) > 1 or self.director
        ):
            raise ConfigError(
                "origin_concurrency must be below total_concurrency, so that one stalled "
                "origin cannot take every fetch slot from the others"
            )
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.access_flush <= 0:
            raise ConfigError("access_flush must be a positive duration, e.g. 15s")
        if self.verify not in ("on-change", "always"):
            raise ConfigError("verify must be 'on-change' or 'always'")
        self.host_port  # noqa: B018 - validates

    @classmethod
    def build(cls, file_values: dict[str, Any], flags: dict[str, Any]) -> CacheConfig:
        """Merge TOML/env values with command-line flags (flags win when given)."""
        values: dict[str, Any] = dict(file_values)
        # STASHFLOW_CACHE_URL is where the admin commands (cache stats, pin, evict...)
        # find a running cache; it shares the prefix but is not a setting of the server
        values.pop("url", None)
        for key in ("origins", "origin", "issuers", "issuer", "protected", "audiences",
                    "issuer_base_paths", "issuer_base_path"):
            if isinstance(values.get(key), str):  # from the environment: comma-separated
                values[key] = [v.strip() for v in values[key].split(",") if v.strip()]
        for key, value in flags.items():
            if value is not None and value != () and value != []:
                values[key] = value
        origins: dict[str, list[str]] = {}
        raw_origins = values.pop("origins", None) or values.pop("origin", None) or {}
        if isinstance(raw_origins, dict):
            # TOML: "/ns" = "URL", or a list of URLs (replicas of one export)
            for k, v in raw_origins.items():
                origins[str(k)] = [str(u) for u in v] if isinstance(v, list) else [str(v)]
        else:
            for item in raw_origins:
                ns, sep, url = str(item).partition("=")
                if not sep or not ns.startswith("/") or not url:
                    raise ConfigError(f"invalid origin {item!r}: use /ns=URL")
                # --origin /ns=A --origin /ns=B: A first, B when A is unavailable
                origins.setdefault(ns, []).append(url)
        issuers: dict[str, str] = {}
        raw_issuers = values.pop("issuers", None) or values.pop("issuer", None) or {}
        if isinstance(raw_issuers, dict):
            issuers.update({str(k): str(v) for k, v in raw_issuers.items()})
        else:
            for item in raw_issuers:
                # "https://issuer.example" or "https://issuer.example=/etc/jwks.json"
                iss, _, jwks = str(item).partition("=")
                issuers[iss] = jwks
        values["issuers"] = issuers
        raw_bases = values.pop("issuer_base_paths", None) or values.pop("issuer_base_path", None)
        if raw_bases and not isinstance(raw_bases, dict):
            # flags: one per --issuer, in the same order (as on the origin)
            bases = [str(b) for b in raw_bases]
            if len(bases) != len(issuers):
                raise ConfigError("give one issuer base path per issuer (same order; / for "
                                  "absolute scopes), or none")
            raw_bases = dict(zip(issuers, bases, strict=True))
        values["issuer_base_paths"] = {}
        if raw_bases:
            from stashflow.integration.tokens import normalise_base_path  # imports are slow

            for iss, base in raw_bases.items():
                try:
                    values["issuer_base_paths"][str(iss)] = normalise_base_path(str(base))
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        for key in ("protected", "audiences"):
            if isinstance(values.get(key), tuple):
                values[key] = list(values[key])
        if "dir" in values:
            values["directory"] = values.pop("dir")
        if "directory" not in values:
            raise ConfigError("no cache directory: give --dir DIR")
        known = set(cls.__dataclass_fields__)
        extra = {k: v for k, v in values.items() if k not in known}
        if extra:
            raise ConfigError(f"unknown cache setting(s): {', '.join(sorted(extra))}")
        if str(values.get("access_log", "")).lower() in ("off", "none", "false"):
            values["access_log"] = None
        values["directory"] = Path(os.path.expanduser(str(values["directory"]))).resolve()
        values["size"] = parse_size(values.get("size", "10GiB"))
        for key in ("block_size", "inline_max", "min_rate"):
            if key in values:
                values[key] = parse_size(values[key])
        for key in (
            "revalidate_ttl", "negative_ttl", "access_flush", "origin_timeout", "stall_window"
        ):
            if key in values:
                values[key] = parse_duration(values[key])
        for key in (
            "high_watermark",
            "low_watermark",
            "inode_high_watermark",
            "inode_low_watermark",
        ):
            if key in values:
                values[key] = _fraction(values[key])
        for key in (
            "workers",
            "readahead",
            "window",
            "origin_concurrency",
            "total_concurrency",
            "queue_limit",
        ):
            if key in values:
                values[key] = int(values[key])
        cfg = cls(origins=origins, **values)
        cfg.check()
        return cfg


def _fraction(value: Any) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        return float(value.strip()[:-1]) / 100
    f = float(value)
    return f / 100 if f > 1 else f
