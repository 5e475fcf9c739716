"""`stashflow cache ...`: run a cache and talk to its admin API."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import click

from stashflow.integration import config as configlib


@click.group("cache")
def cache_group() -> None:
    """Run and manage a caching proxy (XCache-like) near compute."""


@cache_group.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML file with a [cache] table; flags override it, "
    "STASHFLOW_CACHE_* variables override the file.",
)
@click.option("--listen", help="HOST:PORT to serve HTTP on [127.0.0.1:8000].")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="Cache directory (index and data files).",
)
@click.option("--size", help="Disk quota, e.g. 50GiB [10GiB].")
@click.option(
    "--origin",
    "origins",
    multiple=True,
    metavar="/NS=URL",
    help="Namespace and the storage URL behind it (file://, https://, "
    "s3://bucket/prefix, root://host:port//path). Repeatable.",
)
@click.option("--workers", type=int,
              help="Worker processes sharing the cache [one per CPU, at most 16].")
@click.option("--block-size", help="Cache block size [1MiB].")
@click.option("--inline-max", help="Objects up to this size are kept in the index [64KiB].")
@click.option(
    "--policy",
    type=click.Choice(["lru", "lfuda"]),
    help="Eviction policy [lfuda: keeps the re-read working set when scans pass].",
)
@click.option("--high-watermark", help="Start evicting above this share of --size [95%].")
@click.option("--low-watermark", help="Evict down to this share of --size [90%].")
@click.option("--revalidate-ttl", help="Re-check objects with the origin after this long [60s].")
@click.option("--admin-token", help="Bearer token for the admin API (default: loopback only).")
@click.option("--director", help="Director URL to register with; namespaces, origins and "
                                 "token requirements are then learned from it.")
@click.option("--site", help="Site name given to the director (to send nearby clients here).")
@click.option("--name", help="Identity at the director [the public URL].")
@click.option("--public-url", help="URL the director sends clients to [http://LISTEN].")
@click.option("--protected", multiple=True, metavar="/NS",
              help="Namespace whose reads need a WLCG token (storage.read). Repeatable.")
@click.option("--issuer", "issuers", multiple=True, metavar="URL[=JWKS]",
              help="Token issuer trusted for protected namespaces, with its JWKS file or "
                   "URL (discovered from the issuer when omitted). Repeatable.")
@click.option("--issuer-base-path", "issuer_base_paths", multiple=True, metavar="PATH",
              help="The path each --issuer's token scopes are relative to, in the same "
                   "order (storage.read:/x with base path /ns grants /ns/x) [/].")
@click.option("--audience", "audiences", multiple=True, metavar="URL",
              help="Token audience accepted besides the cache's public URL and the WLCG "
                   "'any' audience, e.g. the federation's URL. Repeatable.")
@click.option("--origin-token-file", help="Token the cache presents to protected origins.")
@click.option("--access-log", help="Access log file, '-' for stderr, 'off' for none [-].")
def serve(config_path: str | None, **flags: Any) -> None:
    """Serve objects of one or more origins, caching them on local disk.

    \b
    Example:
      stashflow cache serve --listen 127.0.0.1:8000 --dir /var/cache/stash \\
          --size 50GiB --origin /ns=https://origin.example.org/data

    Objects are served at http://HOST:PORT/<ns>/<path>; the admin API is under
    /.stashflow/ (stats, objects, pin, unpin, evict, purge, health) and Prometheus
    metrics at /metrics.
    """
    from stashflow.cache.config import CacheConfig
    from stashflow.cache.workers import serve as run

    path = config_path or configlib.default_config_path("cache")
    try:
        cfg = CacheConfig.build(configlib.load(path, "cache"), flags)
    except (configlib.ConfigError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    run(cfg)


def _admin(url: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    token = os.environ.get("STASHFLOW_CACHE_ADMIN_TOKEN")
    req = urllib.request.Request(
        url.rstrip("/") + "/.stashflow/" + path,
        data=json.dumps(payload).encode() if payload is not None else None,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
        method="POST" if payload is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e).get("error", e.reason)
        except ValueError:
            message = e.reason
        click.echo(f"stashflow cache: {url}: {message}", err=True)
        sys.exit(1)
    except urllib.error.URLError as e:
        click.echo(f"stashflow cache: cannot reach {url}: {e.reason}", err=True)
        sys.exit(1)


_url = click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    envvar="STASHFLOW_CACHE_URL",
    help="Base URL of the cache.",
)


@cache_group.command("stats")
@_url
def stats(url: str) -> None:
    """Show usage, object counts and disk state of a running cache."""
    click.echo(json.dumps(_admin(url, "stats"), indent=2))


@cache_group.command("pin")
@_url
@click.argument("path")
@click.option("--unpin", is_flag=True, help="Remove the pin instead.")
def pin(url: str, path: str, unpin: bool) -> None:
    """Pin /NS/PATH so that eviction never removes it."""
    click.echo(json.dumps(_admin(url, "unpin" if unpin else "pin", {"path": path})))


@cache_group.command("evict")
@_url
@click.argument("path")
@click.option("--prefix", is_flag=True, help="Evict everything under PATH (purge).")
@click.option("--force", is_flag=True, help="Also evict pinned objects.")
def evict(url: str, path: str, prefix: bool, force: bool) -> None:
    """Remove an object (or with --prefix every object under a path) from the cache."""
    payload = {"prefix" if prefix else "path": path, "force": force}
    click.echo(json.dumps(_admin(url, "evict", payload)))
