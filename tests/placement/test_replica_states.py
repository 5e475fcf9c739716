"""Marking replica states moves locks, rule counters, rule states and transfer requests,
as Rucio's update_replicas_states does (successful_transfer / failed_transfer), on SQLite
and PostgreSQL, in process and through the unmodified rucio client."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stashflow.placement import dids, replicas, rses, rules, scopes
from stashflow.placement.models import (
    DIDType,
    Lock,
    LockState,
    Request,
    RequestState,
    Rule,
    RuleState,
)

from .conftest import Server

Factory = sessionmaker[Session]


@pytest.fixture
def world(factory: Factory) -> Factory:
    """SRC holds f0..f3 in dataset ds; DST and DST2 are empty."""
    with factory.begin() as s:
        scopes.add_scope(s, "root", "test", "root")
        for name in ("SRC", "DST", "DST2"):
            rses.add_rse(s, name, {})
        replicas.add_replicas(s, "root", "SRC", [
            {"scope": "test", "name": f"f{i}", "bytes": 10} for i in range(4)])
        dids.add_collection(s, "root", "test", "ds", DIDType.DATASET)
        dids.attach(s, "root", "test", "ds", [{"scope": "test", "name": f"f{i}"}
                                              for i in range(4)])
    return factory


def add(s: Session, did: str, expression: str, **body: object) -> str:
    scope, name = did.split(":")
    options = rules.parse_options("root", {"copies": 1, "rse_expression": expression, **body})
    [rule_id] = rules.add_rules(s, "root", [{"scope": scope, "name": name}], options)
    return rule_id


def counters(s: Session, rule_id: str) -> tuple[RuleState, int, int, int]:
    rule = s.get(Rule, rule_id)
    assert rule is not None
    return (rule.state, rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt)


def mark(s: Session, rse: str, state: str, *names: str, **extra: object) -> None:
    replicas.update_states(s, "root", rse, [{"scope": "test", "name": n, "state": state,
                                             **extra} for n in names])


def test_available_replicas_make_locks_ok_and_finish_requests(world: Factory) -> None:
    with world.begin() as s:
        on_ds = add(s, "test:ds", "DST")
        on_file = add(s, "test:f0", "DST")  # a second lock sharing the f0 transfer
    with world() as s:
        assert counters(s, on_ds) == (RuleState.REPLICATING, 0, 4, 0)
        assert counters(s, on_file) == (RuleState.REPLICATING, 0, 1, 0)
    with world.begin() as s:
        mark(s, "DST", "A", "f0", "f1")
    with world() as s:
        assert counters(s, on_ds) == (RuleState.REPLICATING, 2, 2, 0)
        assert counters(s, on_file) == (RuleState.OK, 1, 0, 0)
        states = {lock.name: lock.state for lock in s.scalars(select(Lock).where(
            Lock.rule_id == on_ds))}
        assert states == {"f0": LockState.OK, "f1": LockState.OK,
                          "f2": LockState.REPLICATING, "f3": LockState.REPLICATING}
        requests = {r.name: r.state for r in s.scalars(select(Request))}
        assert requests == {"f0": RequestState.DONE, "f1": RequestState.DONE,
                            "f2": RequestState.QUEUED, "f3": RequestState.QUEUED}
    with world.begin() as s:
        mark(s, "DST", "AVAILABLE", "f2", "f3")
    with world() as s:
        assert counters(s, on_ds) == (RuleState.OK, 4, 0, 0)
        assert {r.state for r in s.scalars(select(Request))} == {RequestState.DONE}
        listed = replicas.list_replicas(s, [{"scope": "test", "name": "ds"}],
                                        rse_expression="DST")
        assert len(listed) == 4 and all(line["states"] == {"DST": "AVAILABLE"}
                                        for line in listed)


def test_unavailable_replicas_make_locks_and_rules_stuck(world: Factory) -> None:
    with world.begin() as s:
        ok_rule = add(s, "test:ds", "SRC")
        moving = add(s, "test:ds", "DST")
        suspended = add(s, "test:f1", "DST")
        rules.update_rule(s, "root", suspended, {"state": "SUSPENDED"})
    with world.begin() as s:
        mark(s, "SRC", "U", "f0", error_message="checksum mismatch at SRC")
        mark(s, "DST", "U", "f1")
    with world() as s:
        # An OK lock on a replica that becomes unavailable is stuck too, as in Rucio.
        assert counters(s, ok_rule) == (RuleState.STUCK, 3, 0, 1)
        assert counters(s, moving) == (RuleState.STUCK, 0, 3, 1)
        assert counters(s, suspended) == (RuleState.SUSPENDED, 0, 0, 1)
        rule = s.get(Rule, ok_rule)
        assert rule is not None and rule.error == "checksum mismatch at SRC"
        assert rule.stuck_at is not None
        rule = s.get(Rule, moving)
        assert rule is not None and rule.error is not None and "UNAVAILABLE" in rule.error
        stuck = rules.examine(s, moving)["transfers"]
        assert [(t["name"], t["rse"]) for t in stuck] == [("f1", "DST")]
    # The copy arrives after all: the stuck lock is OK again and so is the rule's state.
    with world.begin() as s:
        mark(s, "DST", "A", "f0", "f1", "f2", "f3")
        mark(s, "SRC", "A", "f0")
    with world() as s:
        assert counters(s, ok_rule) == (RuleState.OK, 4, 0, 0)
        assert counters(s, moving) == (RuleState.OK, 4, 0, 0)
        assert counters(s, suspended) == (RuleState.SUSPENDED, 1, 0, 0)
        rule = s.get(Rule, moving)
        assert rule is not None and rule.error is None and rule.stuck_at is None


def test_broken_rule_is_suspended_and_staging_rses_keep_ok_locks(world: Factory) -> None:
    with world.begin() as s:
        rses.set_attribute(s, "DST2", "staging_required", True)
        first = add(s, "test:f2", "DST2")
        second = add(s, "test:f3", "DST2")
        mark(s, "DST2", "A", "f3")
        broken = add(s, "test:ds", "DST")
    with world.begin() as s:
        mark(s, "DST", "U", "f0", broken_rule_id=broken, broken_message="no way to DST")
        mark(s, "DST2", "U", "f2", "f3")
    with world() as s:
        rule = s.get(Rule, broken)
        assert rule is not None and rule.state == RuleState.SUSPENDED
        assert rule.error == "no way to DST"
        assert counters(s, broken)[1:] == (0, 3, 1)
        assert counters(s, first) == (RuleState.STUCK, 0, 0, 1)
        # On a staging RSE only replicating locks are affected.
        assert counters(s, second) == (RuleState.OK, 1, 0, 0)


def test_states_through_the_rucio_client(server: Server) -> None:
    client = server.client()
    client.add_scope("root", "test")
    for name in ("SRC", "DST"):
        client.add_rse(name)
    client.add_replicas("SRC", [{"scope": "test", "name": f"f{i}", "bytes": 5}
                                for i in range(2)])
    client.add_dataset("test", "ds")
    client.attach_dids("test", "ds", [{"scope": "test", "name": f"f{i}"} for i in range(2)])
    [rule_id] = client.add_replication_rule([{"scope": "test", "name": "ds"}], 1, "DST")
    assert client.get_replication_rule(rule_id)["state"] == "REPLICATING"

    assert client.update_replicas_states("DST", [{"scope": "test", "name": "f0",
                                                  "state": "A"}])
    rule = client.get_replication_rule(rule_id)
    assert (rule["state"], rule["locks_ok_cnt"], rule["locks_replicating_cnt"]) == (
        "REPLICATING", 1, 1)
    client.update_replicas_states("DST", [{"scope": "test", "name": "f1", "state": "U"}])
    rule = client.get_replication_rule(rule_id)
    assert (rule["state"], rule["locks_stuck_cnt"]) == ("STUCK", 1)
    assert "UNAVAILABLE" in rule["error"]
    shown = server.rucio("rule", "show", rule_id).stdout
    assert "STUCK" in shown
    client.update_replicas_states("DST", [{"scope": "test", "name": "f1", "state": "A"}])
    rule = client.get_replication_rule(rule_id)
    assert (rule["state"], rule["locks_ok_cnt"], rule["error"]) == ("OK", 2, None)
    locks = list(client.list_replica_locks(rule_id))
    assert {lock["state"] for lock in locks} == {"OK"}
    found = list(client.list_replicas([{"scope": "test", "name": "ds"}], rse_expression="DST"))
    assert sorted(f["name"] for f in found) == ["f0", "f1"]
