"""Alembic, driven from Python: the migration scripts live in catalog_schema/placement/."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import stashflow.catalog_schema as catalog_schema
from stashflow.placement.db import current_revision, make_engine, normalise_url

SCRIPT_LOCATION = Path(catalog_schema.__file__).parent / "placement"


class SchemaNotCurrent(Exception):
    """The database is not at the head revision; the server must not run on it."""


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # Alembic's ConfigParser treats '%' as interpolation; URL-encoded passwords carry them.
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "catalog_schema/placement/versions holds no migration"
    return head


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def check_current(url: str) -> None:
    engine = make_engine(url)
    try:
        found = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    if found != head:
        state = "has no placement schema" if found is None else f"is at revision {found}"
        raise SchemaNotCurrent(
            f"The placement database {_redact(url)} {state}, but this version needs "
            f"revision {head}: run `stashflow placement db upgrade --db URL` first."
        )


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    if "://" not in url:
        return url
    return make_url(url).render_as_string(hide_password=True)
