"""`stashflow director serve`: the federation's director (redirector)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from stashflow.integration import config as configlib

DEFAULT_LISTEN = "127.0.0.1:8444"


@click.group("director")
def director_group() -> None:
    """Run the federation director: it sends each client to the best cache for the
    object it asks for, speaking the Pelican federation protocol."""


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] if "," in value else [value]
    return [str(v) for v in value]


def _split(value: str, option: str, example: str) -> tuple[str, str]:
    prefix, sep, rest = value.partition("=")
    if not sep or not prefix.strip() or not rest.strip():
        raise click.UsageError(f"{option} {value!r}: use {example}")
    return prefix.strip(), rest.strip()


def _namespaces(
    file_spaces: dict[str, Any],
    flag_spaces: tuple[str, ...],
    protected: list[str],
    issuer: str | None,
    collections: list[str],
) -> list[Any]:
    from stashflow.cache.director.registry import Namespace, check_url, normalise_prefix

    spec: dict[str, dict[str, Any]] = {}
    for prefix, value in file_spaces.items():
        entry = dict(value) if isinstance(value, dict) else {"origins": _as_list(value)}
        entry["origins"] = _as_list(entry.get("origins"))
        spec[normalise_prefix(prefix)] = entry
    for item in flag_spaces:
        prefix, urls = _split(item, "--namespace", "/NS=ORIGIN_URL[,ORIGIN_URL]")
        spec[normalise_prefix(prefix)] = {
            "origins": [u.strip() for u in urls.split(",") if u.strip()]
        }
    for item in protected:
        prefix, _, own_issuer = item.partition("=")
        norm = normalise_prefix(prefix)
        if norm not in spec:
            raise click.UsageError(f"--protected {norm} is not a --namespace")
        spec[norm]["require_token"] = True
        if own_issuer.strip():
            spec[norm]["issuer"] = own_issuer.strip()
    for item in collections:
        prefix, url = _split(item, "--collections-url", "/NS=https://origin.example:8443")
        norm = normalise_prefix(prefix)
        if norm not in spec:
            raise click.UsageError(f"--collections-url {norm} is not a --namespace")
        spec[norm]["collections_url"] = url
    out = []
    for prefix, entry in spec.items():
        origins = tuple(check_url(u, f"origin of {prefix}") for u in entry["origins"])
        ns_issuer = entry.get("issuer") or None
        require = bool(entry.get("require_token", ns_issuer is not None))
        if require and not ns_issuer:
            ns_issuer = issuer
        if require and not ns_issuer:
            raise click.UsageError(
                f"protected namespace {prefix} needs an issuer: add --issuer URL "
                f"or --protected {prefix}=ISSUER_URL"
            )
        listing = entry.get("collections_url")
        out.append(
            Namespace(
                prefix=prefix,
                origins=origins,
                require_token=require,
                issuer=ns_issuer,
                collections_url=check_url(listing, "collections URL") if listing else None,
            )
        )
    return out


@director_group.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML file with a [director] table; flags override it, STASHFLOW_DIRECTOR_* "
    "variables override the file.",
)
@click.option("--listen", help=f"HOST:PORT to serve on [{DEFAULT_LISTEN}].")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    metavar="/NS=URL[,URL]",
    help="A namespace and its origin(s): storage URLs of the namespace root, as in "
    "`cache serve --origin` (https://origin:8443/ns, file:///data, s3://b/p, "
    "root://h//p). Clients are only sent to http(s) origins. Repeatable.",
)
@click.option(
    "--protected",
    multiple=True,
    metavar="/NS[=ISSUER]",
    help="Reads of this namespace need a token (require-token=true) from --issuer or "
    "the ISSUER given here. Repeatable.",
)
@click.option("--issuer", help="Token issuer URL of the --protected namespaces.")
@click.option(
    "--collections-url",
    "collections",
    multiple=True,
    metavar="/NS=URL",
    help="Server answering listings (PROPFIND) of a namespace [derived from an "
    "https://host/NS origin: https://host]. Repeatable.",
)
@click.option(
    "--site-map",
    type=click.Path(dir_okay=False),
    help="TOML file of sites: networks (CIDR), coordinates or a distance table "
    "(see docs/director.md).",
)
@click.option(
    "--cache",
    "caches",
    multiple=True,
    metavar="URL[@SITE]",
    help="A cache that does not register itself (probed at /.stashflow/health). Repeatable.",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (chain).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
@click.option(
    "--heartbeat-interval",
    help="How often caches send registerCache [10s]; a cache silent for two intervals "
    "leaves the candidate lists.",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="CIDR",
    help="Honour X-Forwarded-For from these proxies. Repeatable.",
)
@click.option(
    "--public-url",
    help="The director's URL as clients see it, for the discovery document [scheme://Host header].",
)
@click.option("--max-candidates", type=int, help="Caches listed per answer [8].")
@click.option(
    "--max-load", type=float, help="Caches reporting this load or more are tried last [0.9]."
)
@click.option(
    "--registration-token",
    help="Bearer token caches must send to registerCache [none: anyone may register; "
    "or STASHFLOW_DIRECTOR_REGISTRATION_TOKEN].",
)
def serve(config_path: str | None, **flags: Any) -> None:
    """Redirect clients to the nearest live cache for each object.

    \b
    Example:
      stashflow director serve --listen 0.0.0.0:8444 \\
          --tls-cert /etc/stashflow/tls.crt --tls-key /etc/stashflow/tls.key \\
          --namespace /ospool=https://origin.example:8443/ospool \\
          --namespace /cms=root://xrootd.example:1094//store \\
          --protected /cms --issuer https://cms-auth.example \\
          --site-map /etc/stashflow/sites.toml \\
          --cache http://cache1.example:8000@CHTC

    \b
    Clients discover it at /.well-known/pelican-configuration (pelicanfs, stashcp);
    GET /<ns>/<path> answers 307 to the best cache with every candidate in `Link`.
    Caches register and heartbeat with POST /api/v1.0/director/registerCache.
    Operators: GET /api/v1.0/director/namespaces, /caches, /locate?path=..., and
    Prometheus /metrics. Pelican clients need TLS (--tls-cert/--tls-key).
    """
    from stashflow.cache.director.registry import RegistryError
    from stashflow.cache.director.selection import SiteMap, SiteMapError, parse_networks
    from stashflow.cache.director.server import (
        DirectorConfig,
        DirectorError,
        parse_listen,
    )
    from stashflow.cache.director.server import (
        serve as run,
    )

    path = config_path or configlib.default_config_path("director")
    try:
        file_cfg = configlib.load(path, "director")

        def pick(key: str, default: Any = None) -> Any:
            value = flags.get(key)
            if value is None or value == ():
                value = file_cfg.get(key, default)
            return value

        host, port = parse_listen(str(pick("listen", DEFAULT_LISTEN)))
        spaces = _namespaces(
            dict(file_cfg.get("namespaces", {})),
            flags["namespaces"],
            _as_list(pick("protected")),
            pick("issuer"),
            _as_list(pick("collections")) or _collections_from_file(file_cfg),
        )
        if not spaces:
            raise click.UsageError("no namespace: give at least one --namespace /NS=ORIGIN_URL")
        static: list[tuple[str, str | None]] = []
        for item in _as_list(pick("caches")):
            url, at, site = item.rpartition("@")
            if not at or "/" in site or ":" in site or not site:
                url, site = item, ""
            static.append((url, site or None))
        site_map_path = pick("site_map")
        site_map = SiteMap.load(site_map_path) if site_map_path else SiteMap()
        cert, key = pick("tls_cert"), pick("tls_key")
        if bool(cert) != bool(key):
            raise click.UsageError("--tls-cert and --tls-key go together")
        interval = configlib.parse_duration(pick("heartbeat_interval", "10s"))
        if interval <= 0:
            raise click.UsageError("--heartbeat-interval must be positive")
        max_candidates = int(pick("max_candidates", 8))
        if max_candidates < 1:
            raise click.UsageError("--max-candidates must be at least 1")
        max_load = float(pick("max_load", 0.9))
        public_url = pick("public_url")
        cfg = DirectorConfig(
            host=host,
            port=port,
            namespaces=spaces,
            static_caches=static,
            site_map=site_map,
            tls_cert=cert,
            tls_key=key,
            heartbeat_interval=interval,
            trusted_proxies=parse_networks(_as_list(pick("trusted_proxies")), "--trusted-proxy"),
            public_url=public_url.rstrip("/") if public_url else None,
            max_candidates=max_candidates,
            max_load=max_load,
            registration_token=pick("registration_token"),
            probe_timeout=min(5.0, max(0.5, interval)),
        )
        # validate static caches and TLS files before going to the background
        from stashflow.cache.director.registry import CacheRegistry
        from stashflow.cache.director.server import ssl_context

        probe = CacheRegistry(interval)
        for cache_url, cache_site in static:
            probe.add_static(cache_url, cache_site)
        if cert:
            ssl_context(cert, key)
    except (configlib.ConfigError, RegistryError, SiteMapError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    except DirectorError as e:
        raise click.ClickException(str(e)) from None

    logging.basicConfig(
        level=os.environ.get("STASHFLOW_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        run(cfg)
    except DirectorError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass


def _collections_from_file(file_cfg: dict[str, Any]) -> list[str]:
    table = file_cfg.get("collections_urls", {})
    return [f"{k}={v}" for k, v in table.items()] if isinstance(table, dict) else []
