"""`stashflow placement ...`: database migrations, bootstrap, and the server.

Settings come from the `[placement]` table of a TOML file (`--config`, else
$STASHFLOW_CONFIG, else /etc/stashflow/placement.toml if present), each overridable by
STASHFLOW_PLACEMENT_<KEY>; command-line flags win over both. Keys: db, listen, workers,
cleaner_interval, repairer_interval, log_level, root_username and root_password (bootstrap).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click

from stashflow.placement.db import DEFAULT_URL

DEFAULTS: dict[str, Any] = {
    "db": DEFAULT_URL,
    "listen": "127.0.0.1:8080",
    "workers": 1,
    "cleaner_interval": 60.0,
    "repairer_interval": 60.0,
    "log_level": "INFO",
    "root_username": "root",
    "root_password": None,
}

_CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                       help="TOML file with a [placement] table.")
_DB = click.option("--db", "db_url", default=None,
                   help=f"SQLAlchemy URL (sqlite:///file.db or postgresql://...) or a path "
                        f"[default: {DEFAULT_URL}].")


def settings(config_path: str | None, **flags: Any) -> dict[str, Any]:
    """Defaults < file < STASHFLOW_PLACEMENT_* < flags; unknown or malformed keys are
    refused with one sentence naming the key."""
    from stashflow.integration.config import (
        ConfigError,
        default_config_path,
        load,
        parse_duration,
    )

    try:
        found = load(config_path or default_config_path("placement"), "placement")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    unknown = sorted(set(found) - set(DEFAULTS))
    if unknown:
        raise click.ClickException(f"Unknown placement setting(s): {', '.join(unknown)} "
                                   f"(known: {', '.join(DEFAULTS)})")
    merged = {**DEFAULTS, **found, **{k: v for k, v in flags.items() if v is not None}}
    try:
        merged["workers"] = int(merged["workers"])
        merged["cleaner_interval"] = parse_duration(merged["cleaner_interval"])
        merged["repairer_interval"] = parse_duration(merged["repairer_interval"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise click.ClickException(f"Invalid placement setting: {exc}") from None
    if not 1 <= merged["workers"] <= 64:
        raise click.ClickException("The placement setting 'workers' must be from 1 to 64")
    return merged


@click.group("placement")
def placement_group() -> None:
    """Catalog, placement rules and transfers (Rucio-compatible server)."""


@placement_group.group("db")
def db_group() -> None:
    """Manage the catalog schema."""


@db_group.command("upgrade")
@_CONFIG
@_DB
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_path: str | None, db_url: str | None, revision: str) -> None:
    """Create or migrate the catalog schema."""
    from stashflow.placement.migrations import head_revision, upgrade

    url = settings(config_path, db=db_url)["db"]
    try:
        upgrade(url, revision)
    except Exception as exc:  # any driver error: one sentence, non-zero exit
        raise click.ClickException(f"Migrating {url} failed: {exc}") from exc
    shown = head_revision() if revision == "head" else revision
    click.echo(f"placement catalog at revision {shown}")


@db_group.command("current")
@_CONFIG
@_DB
def db_current(config_path: str | None, db_url: str | None) -> None:
    """Print the schema revision of the database (or 'none')."""
    from stashflow.placement.db import current_revision, make_engine

    engine = make_engine(settings(config_path, db=db_url)["db"])
    try:
        click.echo(current_revision(engine) or "none")
    finally:
        engine.dispose()


@placement_group.command("bootstrap")
@_CONFIG
@_DB
@click.option("--root-password", default=None,
              help="Password of the root account's userpass identity (or the setting "
                   "root_password, e.g. STASHFLOW_PLACEMENT_ROOT_PASSWORD).")
@click.option("--root-username", default=None, help="[default: root]")
def bootstrap(config_path: str | None, db_url: str | None, root_password: str | None,
              root_username: str | None) -> None:
    """Create the root account (admin) with a userpass identity; safe to repeat."""
    from stashflow.placement.accounts import bootstrap_root
    from stashflow.placement.db import make_engine, make_sessionmaker
    from stashflow.placement.migrations import SchemaNotCurrent, check_current

    config = settings(config_path, db=db_url, root_password=root_password,
                      root_username=root_username)
    url, root_password, root_username = (config["db"], config["root_password"],
                                         str(config["root_username"]))
    if not root_password:
        raise click.ClickException("Bootstrapping needs --root-password (or the setting "
                                   "root_password)")
    try:
        check_current(url)
    except SchemaNotCurrent as exc:
        raise click.ClickException(str(exc)) from None
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            created = bootstrap_root(session, root_username, str(root_password))
    finally:
        engine.dispose()
    verb = "created" if created else "already existed; password reset for"
    click.echo(f"root account {verb} userpass identity '{root_username}'")


@placement_group.command("serve")
@_CONFIG
@_DB
@click.option("--listen", default=None, help="HOST:PORT [default: 127.0.0.1:8080]")
@click.option("--cleaner-interval", default=None,
              help="Time between judge-cleaner rounds (expired rules), e.g. 60s [default: 60].")
@click.option("--repairer-interval", default=None,
              help="Time between judge-repairer rounds (STUCK rules), e.g. 60s; 0 turns "
                   "it off [default: 60].")
@click.option("--log-level", default=None, help="[default: INFO]")
@click.option("--workers", default=None, type=int,
              help="Server processes sharing the port (SO_REUSEPORT) [default: 1].")
def serve(config_path: str | None, db_url: str | None, listen: str | None,
          cleaner_interval: str | None, repairer_interval: str | None, log_level: str | None,
          workers: int | None) -> None:
    """Serve the Rucio-compatible REST API."""
    from stashflow.placement.migrations import SchemaNotCurrent
    from stashflow.placement.server import run_workers
    from stashflow.placement.server import serve as run

    config = settings(config_path, db=db_url, listen=listen,
                      cleaner_interval=cleaner_interval,
                      repairer_interval=repairer_interval, log_level=log_level,
                      workers=workers)
    host, sep, port_text = str(config["listen"]).rpartition(":")
    if not sep or not port_text.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, not {config['listen']!r}",
                                 param_hint="--listen")
    level = str(config["log_level"]).upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = host.strip("[]") or "127.0.0.1"
    try:
        if config["workers"] > 1:
            sys.exit(run_workers(config["db"], host, int(port_text), config["workers"], level,
                                 cleaner_interval=config["cleaner_interval"],
                                 repairer_interval=config["repairer_interval"]))
        asyncio.run(run(config["db"], host, int(port_text),
                        cleaner_interval=config["cleaner_interval"],
                        repairer_interval=config["repairer_interval"]))
    except SchemaNotCurrent as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
