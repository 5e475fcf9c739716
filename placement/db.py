"""Connecting to the catalog: engine set-up for SQLite (embedded) and PostgreSQL, sessions,
and the schema-revision check that keeps a server off an unmigrated database."""

from __future__ import annotations

import enum
import functools
import json
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Engine,
    Table,
    and_,
    bindparam,
    create_engine,
    event,
    false,
    func,
    insert,
    or_,
    text,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import Boolean, Text, TypeDecorator, TypeEngine, UserDefinedType

DEFAULT_URL = "sqlite:///placement.db"


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` and a bare file path; use psycopg 3 for PostgreSQL."""
    if "://" not in url:
        return f"sqlite:///{Path(url).absolute()}"
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    # No ping before every checkout (a round trip per request): a connection found dead
    # fails its first statement, the pool is invalidated and the caller retries the
    # transaction (see `Catalog.call` in rest.py).
    kwargs.setdefault("pool_pre_ping", False)
    # Statements run twice are prepared (psycopg's prepare_threshold): PostgreSQL then
    # parses each once per connection instead of at every request (about 0.6 ms of a
    # 1,000-file attachment). Each run is still planned with its own values
    # (plan_cache_mode=force_custom_plan): in a generic plan a long `name IN (...)` list
    # is searched linearly for every row (only a constant list is hashed), and bulk
    # lookups got 50x slower as tables grew. A pooler in front of PostgreSQL must pass
    # prepared statements through (pgbouncer >= 1.21 with max_prepared_statements, or
    # session pooling).
    #
    # random_page_cost 1.1 instead of PostgreSQL's default of 4, which models spinning
    # disks: with 4 the planner chose to scan all of `dids` for a bulk lookup of 1,000
    # names rather than probe the primary key 1,000 times, and attaching 1,000 files to a
    # dataset took 20 ms instead of 6.6 ms once the catalog held 100,000 DIDs. A catalog
    # lives on SSD or in RAM; this is the usual setting there, and only our sessions
    # get it.
    kwargs.setdefault("connect_args", {
        "prepare_threshold": 2,
        "options": "-c random_page_cost=1.1 -c plan_cache_mode=force_custom_plan"})
    _register_text_array_dumper()
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling issues BEGIN lazily and DEFERRED; a deferred
        # transaction that later writes can fail with "database is locked" without waiting.
        # We take over: autocommit at the driver level, BEGIN IMMEDIATE ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


class _TextArray(list[str]):
    """Names bound as a PostgreSQL text[] parameter by `_TextArrayDumper`."""


def _text_array_literal(names: list[str]) -> bytes:
    # Quoted elements: only a double quote and a backslash need escaping inside them.
    everything = "".join(names)
    if '"' in everything or "\\" in everything:
        names = [n.replace("\\", "\\\\").replace('"', '\\"') for n in names]
    return ('{"' + '","'.join(names) + '"}' if names else "{}").encode()


@functools.cache  # once per process: the registration is global to psycopg
def _register_text_array_dumper() -> None:
    """Teach psycopg to send a `_TextArray` as a text[] literal written in one join:
    its generic list adapter looks at every element on its own, which cost more than
    the lookup the list feeds."""
    import psycopg
    from psycopg.adapt import Dumper

    class _TextArrayDumper(Dumper):
        oid = psycopg.adapters.types["text"].array_oid

        def dump(self, obj: Any) -> bytes:
            return _text_array_literal(obj)

    psycopg.adapters.register_dumper(_TextArray, _TextArrayDumper)


class _TextArrayParameter(UserDefinedType[list[str]]):
    cache_ok = True
    render_bind_cast = True

    def get_col_spec(self, **_kw: Any) -> str:
        return "TEXT[]"


class _NameList(TypeDecorator[list[str]]):
    """A list of names bound as one parameter: a text[] array on PostgreSQL (known when
    the statement is planned, so hashed and index-friendly), a JSON array on SQLite (read
    back with json_each)."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(_TextArrayParameter())
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return _TextArray(value) if dialect.name == "postgresql" else json.dumps(value)


class _NamesIn(ColumnElement[bool]):
    """`column IN (names)` with the names in one bound parameter. The statement text is
    then the same whatever the number of names, so SQLAlchemy compiles it once and caches
    it (with one parameter per name, each call was compiled anew, and psycopg re-parsed
    thousands of placeholders)."""

    type = Boolean()
    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement),
                           ("names", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: Any, names: list[str] | str) -> None:
        self.column = column
        # a str is the key of a parameter given at execution (see `names_in`)
        self.names = (bindparam(names, type_=_NameList()) if isinstance(names, str)
                      else bindparam(None, names, type_=_NameList()))


@compiles(_NamesIn)
def _names_in(element: _NamesIn, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    return f"{column} IN (SELECT value FROM json_each({compiler.process(element.names, **kw)}))"


@compiles(_NamesIn, "postgresql")
def _names_in_postgresql(element: _NamesIn, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    return f"{column} = ANY({compiler.process(element.names, **kw)})"


def names_in(column: Any, key: str) -> Any:
    """`column IN names`, the list of names bound at execution as the parameter `key`: for
    statements built once and run many times."""
    return _NamesIn(column, key)


def each_name(key: str) -> Any:
    """PostgreSQL: one row per name (column `name`) of the list bound at execution as the
    parameter `key`, to be joined from."""
    return func.unnest(bindparam(key, type_=_NameList())).table_valued("name").render_derived()


def names_by_scope(keys: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The names of (scope, name) keys grouped by scope, in order of first appearance."""
    by_scope: dict[str, list[str]] = {}
    for scope, name in keys:
        by_scope.setdefault(scope, []).append(name)
    return by_scope


def keys_in(scope_column: Any, name_column: Any, keys: list[tuple[str, str]]) -> Any:
    """`(scope, name) IN keys`, written per scope as `scope = s AND name IN (...)`: both
    databases then use the primary-key index, which a row-value IN list defeats."""
    clauses = [and_(scope_column == scope, _NamesIn(name_column, names))
               for scope, names in names_by_scope(keys).items()]
    if not clauses:
        return false()
    return clauses[0] if len(clauses) == 1 else or_(*clauses)


def bulk_insert(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert many rows fast, inside the session's transaction: COPY on PostgreSQL (an
    executemany there is a statement per row, and a multi-row VALUES costs more to compile
    than to run), the driver's executemany on SQLite."""
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        connection.execute(insert(table), rows)
        return
    columns = list(rows[0])
    kinds = [table.c[name].type for name in columns]
    quoted = ", ".join(f'"{name}"' for name in columns)
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor, cursor.copy(
            f'COPY "{table.name}" ({quoted}) FROM STDIN') as copy:
        for row in rows:
            copy.write_row([_copy_value(kind, row[name]) for name, kind in zip(columns, kinds,
                                                                                strict=True)])


def _copy_value(kind: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(kind, JSON):
        return json.dumps(value)
    return value


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except DBAPIError:
        return None
    return None if row is None else str(row[0])
