"""Concurrent rule creation, attachment and removal through the server's own transaction
runner (worker threads, retries) on SQLite and PostgreSQL, followed by a check of every
catalog invariant that rules maintain."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stashflow.placement import dids, replicas, rses, rules, scopes
from stashflow.placement.clock import utcnow
from stashflow.placement.models import (
    AccountUsage,
    DIDType,
    Lock,
    LockState,
    Replica,
    Request,
    Rule,
)
from stashflow.placement.rest import Catalog

Factory = sessionmaker[Session]
FILES = 120


def assert_consistent(session: Session) -> None:
    locks = list(session.scalars(select(Lock)))
    for rule in session.scalars(select(Rule)):
        states = Counter(lock.state for lock in locks if lock.rule_id == rule.id)
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (
            states[LockState.OK], states[LockState.REPLICATING], states[LockState.STUCK]), rule.id
        files = {(f.scope, f.name) for f in dids.iter_files(session, rule.scope, rule.name)}
        per_file = Counter((lock.scope, lock.name) for lock in locks if lock.rule_id == rule.id)
        assert set(per_file) == files and set(per_file.values()) <= {rule.copies}, rule.id
    per_replica = Counter((lock.rse_id, lock.scope, lock.name) for lock in locks)
    for replica in session.scalars(select(Replica)):
        key = (replica.rse_id, replica.scope, replica.name)
        assert replica.lock_cnt == per_replica[key], key
        if replica.lock_cnt:
            assert replica.tombstone is None, key
    usage: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for lock in locks:
        usage[(lock.account, lock.rse_id)][0] += 1
        usage[(lock.account, lock.rse_id)][1] += lock.bytes
    for row in session.scalars(select(AccountUsage)):
        assert [row.files, row.bytes] == usage.pop((row.account, row.rse_id), [0, 0])
    assert not usage
    waiting = {(lock.scope, lock.name, lock.rse_id) for lock in locks
               if lock.state == LockState.REPLICATING}
    requested = [(r.scope, r.name, r.dest_rse_id) for r in session.scalars(select(Request))]
    assert len(requested) == len(set(requested))  # one per (file, destination)
    assert set(requested) == waiting


def run(catalog: Catalog, jobs: list[Callable[[Session, Any], Any]]) -> None:
    async def everything() -> None:
        await asyncio.gather(*(catalog.call(None, job, authenticated=False) for job in jobs))

    asyncio.run(everything())


def test_concurrent_rules_attachments_and_removals(factory: Factory) -> None:
    with factory.begin() as s:
        scopes.add_scope(s, "root", "test", "root")
        for name in ("SRC", "T1", "T2", "T3", "T4"):
            rses.add_rse(s, name, {})
        replicas.add_replicas(s, "root", "SRC", [
            {"scope": "test", "name": f"f{i:03d}", "bytes": i + 1} for i in range(FILES)])
        dids.add_collection(s, "root", "test", "ds", DIDType.DATASET)
        dids.add_collection(s, "root", "test", "cont", DIDType.CONTAINER)
        dids.attach(s, "root", "test", "cont", [{"scope": "test", "name": "ds"}])
        dids.attach(s, "root", "test", "ds", [{"scope": "test", "name": f"f{i:03d}"}
                                              for i in range(FILES // 2)])
    catalog = Catalog(factory, threads=6)
    try:
        expressions = ["T1", "T2", "T1|T2", "T2|T3", "T3", "T4", "T3|T4", "T1|T4"]

        def rule_job(did: str, expression: str, copies: int = 1) -> Callable[..., Any]:
            def job(session: Session, _caller: Any) -> list[str]:
                options = rules.parse_options("root", {"copies": copies,
                                                       "rse_expression": expression})
                return rules.add_rules(session, "root", [{"scope": "test", "name": did}],
                                       options)
            return job

        def attach_job(start: int, stop: int) -> Callable[..., Any]:
            def job(session: Session, _caller: Any) -> None:
                dids.attach(session, "root", "test", "ds",
                            [{"scope": "test", "name": f"f{i:03d}"} for i in range(start, stop)])
            return job

        jobs: list[Callable[..., Any]] = [rule_job("ds", e) for e in expressions]
        jobs += [rule_job("cont", "T1|T2|T3", copies=2), rule_job("cont", "T4")]
        step = FILES // 8
        jobs += [attach_job(FILES // 2 + k * step, FILES // 2 + (k + 1) * step)
                 for k in range(4)]
        random.Random(7).shuffle(jobs)
        run(catalog, jobs)
        with factory() as s:
            assert len(list(s.scalars(select(Rule)))) == 10
            assert_consistent(s)

        # Remove some rules and detach some files while others are being added.
        with factory() as s:
            victims = [r.id for r in s.scalars(select(Rule).where(Rule.scope == "test"))][:4]

        def delete_job(rule_id: str) -> Callable[..., Any]:
            def job(session: Session, _caller: Any) -> None:
                rules.delete_rule(session, "root", rule_id)
                rules.clean_expired(session, utcnow() + timedelta(hours=2))
            return job

        def detach_job(names: list[str]) -> Callable[..., Any]:
            def job(session: Session, _caller: Any) -> None:
                dids.detach(session, "root", "test", "ds",
                            [{"scope": "test", "name": n} for n in names])
            return job

        jobs = [delete_job(v) for v in victims]
        jobs += [detach_job([f"f{i:03d}" for i in range(k, FILES, 16)]) for k in range(3)]
        jobs += [rule_job("ds", "T1|T3"), rule_job("cont", "T2|T4")]
        random.Random(11).shuffle(jobs)
        run(catalog, jobs)
        with factory() as s:
            assert len(list(s.scalars(select(Rule)))) == 8
            assert_consistent(s)
    finally:
        catalog.close()
