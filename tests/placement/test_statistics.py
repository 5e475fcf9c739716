"""Planner statistics refreshed by the server during bulk loads (PostgreSQL)."""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from stashflow.placement import replicas, rses, scopes, statistics

Factory = sessionmaker[Session]


def test_tables_changed_by_a_bulk_load_are_analysed_once(factory: Factory,
                                                         backend: str) -> None:
    engine = factory.kw["bind"]
    with factory.begin() as session:
        scopes.add_scope(session, "root", "test", "root")
        rses.add_rse(session, "SITE_A", {})
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": f"f{i:05d}", "bytes": i}
            for i in range(statistics.MIN_CHANGED + 500)])
        if backend == "postgresql":
            # counters reach pg_stat_user_tables when the transaction ends, at the latest
            # a second later; this makes it at once
            session.execute(text("SELECT pg_stat_force_next_flush()"))
    if backend == "sqlite":
        assert statistics.refresh(engine) == []
        return
    deadline = time.monotonic() + 10
    analysed: list[str] = []
    while "dids" not in analysed and time.monotonic() < deadline:
        analysed += statistics.refresh(engine)
        time.sleep(0.2)
    assert {"dids", "replicas"} <= set(analysed)
    with engine.connect() as conn:
        last = dict(conn.execute(text(
            "SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables "
            "WHERE relname IN ('dids', 'replicas')")).all())
    assert last == {"dids": True, "replicas": True}
    # nothing changed since: nothing analysed again (the tiny tables never qualify)
    assert not {"dids", "replicas"} & set(statistics.refresh(engine))
