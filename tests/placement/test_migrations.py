"""Alembic migrations on SQLite and PostgreSQL, and the refusal to serve an unmigrated
database."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from stashflow.placement.db import current_revision, make_engine
from stashflow.placement.migrations import (
    SchemaNotCurrent,
    alembic_config,
    check_current,
    head_revision,
)
from stashflow.placement.models import Base
from stashflow.placement.server import create_app

from .conftest import BIN, free_port

EXPECTED_TABLES = {
    "accounts", "account_attributes", "identities", "identity_account_map", "tokens",
    "scopes", "dids", "deleted_dids", "contents", "rses", "rse_attributes", "rse_protocols",
    "rse_limits", "rse_usage", "distances", "replicas", "rules", "locks", "requests",
    "account_limits", "account_global_limits", "account_usage", "subscriptions",
}


def test_cli_upgrade_creates_the_schema_matching_the_models(empty_db_url: str) -> None:
    result = subprocess.run([str(BIN / "stashflow"), "placement", "db", "upgrade", "--db",
                             empty_db_url], capture_output=True, text=True, check=True)
    assert head_revision() in result.stdout
    engine = make_engine(empty_db_url)
    try:
        assert EXPECTED_TABLES <= set(inspect(engine).get_table_names())
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            # The migration scripts and the models describe the same schema.
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
    check_current(empty_db_url)
    # Upgrading again is a no-op; downgrading removes everything.
    command.upgrade(alembic_config(empty_db_url), "head")
    command.downgrade(alembic_config(empty_db_url), "base")
    engine = make_engine(empty_db_url)
    try:
        assert not EXPECTED_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_server_refuses_an_unmigrated_database(empty_db_url: str, tmp_path: Path) -> None:
    with pytest.raises(SchemaNotCurrent, match="stashflow placement db upgrade"):
        create_app(empty_db_url)
    result = subprocess.run(
        [str(BIN / "stashflow"), "placement", "serve", "--db", empty_db_url, "--listen",
         f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "has no placement schema" in result.stderr
    assert "run `stashflow placement db upgrade --db URL` first" in result.stderr
    bootstrap = subprocess.run(
        [str(BIN / "stashflow"), "placement", "bootstrap", "--db", empty_db_url,
         "--root-password", "x"], capture_output=True, text=True, timeout=60)
    assert bootstrap.returncode != 0 and "has no placement schema" in bootstrap.stderr


def test_bootstrap_is_idempotent(db_url: str) -> None:
    def run() -> str:
        return subprocess.run(
            [str(BIN / "stashflow"), "placement", "bootstrap", "--db", db_url,
             "--root-password", "pw1", "--root-username", "admin"],
            capture_output=True, text=True, check=True).stdout

    assert "created" in run()
    assert "already existed" in run()


def test_settings_come_from_toml_env_and_flags(tmp_path: Path) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    config = tmp_path / "placement.toml"
    config.write_text(f'[placement]\ndb = "sqlite:///{first}"\ncleaner_interval = "2m"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("STASHFLOW_")}

    def stashflow(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "stashflow"), "placement", *args],
                              capture_output=True, text=True, env={**env, **extra})

    assert stashflow("db", "upgrade", "--config", str(config)).returncode == 0
    assert stashflow("db", "current", "--config", str(config)).stdout.strip() == head_revision()
    # The environment overrides the file, a flag overrides both.
    assert stashflow("db", "current", "--config", str(config),
                     STASHFLOW_PLACEMENT_DB=f"sqlite:///{second}").stdout.strip() == "none"
    assert stashflow("db", "current", "--config", str(config), "--db", f"sqlite:///{first}",
                     STASHFLOW_PLACEMENT_DB=f"sqlite:///{second}").stdout.strip() == head_revision()
    config.write_text('[placement]\ndatabase = "x"\n')
    refused = stashflow("db", "current", "--config", str(config))
    assert refused.returncode != 0 and "Unknown placement setting(s): database" in refused.stderr
    missing = stashflow("db", "current", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_settings_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    from stashflow.placement.cli import settings

    for name in list(os.environ):
        if name.startswith("STASHFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STASHFLOW_PLACEMENT_ROOT_PASSWORD", "from-env")
    assert settings(None)["root_password"] == "from-env"

    merged = settings(None, workers="3", cleaner_interval="90s", listen=None)
    assert merged["workers"] == 3 and merged["cleaner_interval"] == 90.0
    assert merged["listen"] == "127.0.0.1:8080"
    with pytest.raises(Exception, match="workers"):
        settings(None, workers=0)


def test_upgrade_from_0001_keeps_rows_and_compares_keys_bytewise(empty_db_url: str) -> None:
    config = alembic_config(empty_db_url)
    command.upgrade(config, "0001")
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO accounts (account, account_type, status, created_at, updated_at)"
                " VALUES ('root', 'SERVICE', 'ACTIVE', :t, :t)"), {"t": datetime(2026, 1, 1)})
            conn.execute(text(
                "INSERT INTO scopes (scope, account, status, created_at, updated_at)"
                " VALUES ('user.root', 'root', 'OPEN', :t, :t)"), {"t": datetime(2026, 1, 1)})
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT scope FROM scopes")).scalar_one() == "user.root"
            foreign = inspect(conn).get_foreign_keys("contents")
            assert foreign == []
            if engine.dialect.name == "postgresql":
                collations = dict(conn.execute(text(
                    "SELECT column_name, collation_name FROM information_schema.columns"
                    " WHERE table_name = 'dids'")).all())
                assert collations["scope"] == collations["name"] == "C"
                assert collations["md5"] is None
            # Byte order on both databases: 'B' < 'a' < 'b'.
            ordered = conn.execute(text(
                "SELECT v FROM (SELECT 'b' AS v UNION ALL SELECT 'B' UNION ALL SELECT 'a') x"
                " ORDER BY v COLLATE \"C\"" if engine.dialect.name == "postgresql" else
                "SELECT v FROM (SELECT 'b' AS v UNION ALL SELECT 'B' UNION ALL SELECT 'a') x"
                " ORDER BY v")).scalars().all()
            assert ordered == ["B", "a", "b"]
        command.downgrade(config, "0001")
        engine.dispose()  # SQLite connections cache the schema they have seen
        with engine.connect() as conn:
            assert len(inspect(conn).get_foreign_keys("contents")) == 2
    finally:
        engine.dispose()
