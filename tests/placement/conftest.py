"""Fixtures for the placement tests: a migrated catalog on SQLite and on PostgreSQL (each
test gets a fresh copy of a migrated template), and a real `stashflow placement serve`
process with a rucio client configuration pointing at it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from stashflow.integration.servers.service import ServiceProcess, ServiceStartError
from stashflow.placement.accounts import bootstrap_root
from stashflow.placement.db import make_engine, make_sessionmaker
from stashflow.placement.migrations import upgrade
from tests.conftest import require_real

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql://postgres@127.0.0.1:5432/{name}"
ROOT_USER, ROOT_PASSWORD = "ddmlab", "secret"
BIN = Path(sys.executable).parent


def _pg_admin():  # type: ignore[no-untyped-def]
    try:
        import psycopg
    except ImportError as exc:
        require_real("PostgreSQL", f"psycopg is not installed ({exc})")
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception as exc:
        require_real("PostgreSQL", f"cannot connect to 127.0.0.1:5432 ({exc})")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database used as CREATE DATABASE ... TEMPLATE."""
    conn = _pg_admin()
    name = f"sf_placement_tmpl_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(PG_URL.format(name=name))
        yield name
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "placement.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated catalog (not bootstrapped) on the parametrised backend."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        target = tmp_path / "placement.db"
        shutil.copy(template, target)
        yield f"sqlite:///{target}"
        return
    template_name: str = request.getfixturevalue("pg_template")
    conn = _pg_admin()
    name = f"sf_placement_{uuid.uuid4().hex[:12]}"
    conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    try:
        yield PG_URL.format(name=name)
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database without the placement schema."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    conn = _pg_admin()
    name = f"sf_placement_empty_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(name=name)
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a bootstrapped catalog (root is admin, identity ddmlab)."""
    engine = make_engine(db_url)
    made = make_sessionmaker(engine)
    with made.begin() as session:
        bootstrap_root(session, ROOT_USER, ROOT_PASSWORD)
    yield made
    engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    db_url: str
    home: Path
    process: subprocess.Popen[bytes]

    def env(self, account: str = "root", username: str = ROOT_USER,
            password: str = ROOT_PASSWORD) -> dict[str, str]:
        """Environment for a rucio client acting as `account` (own config and token cache)."""
        config = self.home / f"rucio-{account}-{username}.cfg"
        config.write_text(
            "[client]\n"
            f"rucio_host = {self.url}\nauth_host = {self.url}\n"
            "auth_type = userpass\n"
            f"username = {username}\npassword = {password}\naccount = {account}\n"
            "request_retries = 3\n"
            f"auth_token_file_path = {self.home}/token-{account}-{username}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUCIO_")}
        env.update({"RUCIO_CONFIG": str(config), "HOME": str(self.home),
                    "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"})
        return env

    def client(self, account: str = "root", username: str = ROOT_USER,
               password: str = ROOT_PASSWORD):  # type: ignore[no-untyped-def]
        from rucio.client import Client
        from rucio.common.config import clean_cached_config

        # The client caches its configuration process-wide; each client here has its own
        # file (and so its own token cache), so drop the cache before building one.
        os.environ["RUCIO_CONFIG"] = self.env(account, username, password)["RUCIO_CONFIG"]
        clean_cached_config()
        return Client(rucio_host=self.url, auth_host=self.url, account=account,
                      auth_type="userpass",
                      creds={"username": username, "password": password})

    def rucio(self, *args: str, account: str = "root", username: str = ROOT_USER,
              password: str = ROOT_PASSWORD,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "rucio"), *args], capture_output=True, text=True,
                                env=self.env(account, username, password), timeout=60,
                                cwd=self.home)
        if check and result.returncode != 0:
            raise AssertionError(f"rucio {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result


def start_server(db_url: str, home: Path, *extra: str) -> Server:
    service = ServiceProcess("placement", ["--db", db_url, "--log-level", "WARNING", *extra],
                             home, log_level=None)
    try:
        service.start()
    except ServiceStartError as e:
        raise AssertionError(f"placement server did not start: {e}") from None
    assert service.proc is not None
    return Server(service.url, db_url, home, service.proc)


def bootstrapped_home(db_url: str, tmp_path: Path) -> Path:
    if shutil.which("rucio", path=str(BIN)) is None:
        require_real("rucio-clients", "the `rucio` CLI is not installed in the virtualenv")
    # In-process bootstrap (the CLI command has its own test) saves a process start.
    engine = make_engine(db_url)
    with make_sessionmaker(engine).begin() as session:
        bootstrap_root(session, ROOT_USER, ROOT_PASSWORD)
    engine.dispose()
    home = tmp_path / "home"
    home.mkdir()
    return home


def stop_server(srv: Server) -> int:
    srv.process.terminate()
    try:
        return srv.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        srv.process.kill()
        srv.process.wait()
        raise


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    """A bootstrapped catalog served by a real `stashflow placement serve` process. Its
    judge-repairer is off: these tests look at STUCK rules as the requests left them (a
    pass in the middle of a slow test would move or re-queue their locks); the repairer
    has its own server test."""
    srv = start_server(db_url, bootstrapped_home(db_url, tmp_path), "--repairer-interval",
                       "0")
    yield srv
    stop_server(srv)
