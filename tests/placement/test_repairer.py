"""The judge-repairer on SQLite and PostgreSQL: files a rule could not place are placed
once they fit, stuck locks move to another RSE of the expression (or are retried where
they are), a rule that cannot be repaired stays STUCK and goes to the back of the
queue, and one STUCK for more than two weeks is SUSPENDED instead of retried. Account
usage equals the locks throughout."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from stashflow.placement import clock, dids, quota, replicas, rses, rules
from stashflow.placement.clock import utcnow
from stashflow.placement.models import (
    DIDType,
    Lock,
    LockState,
    Replica,
    ReplicaState,
    Request,
    RequestState,
    Rule,
    RuleState,
)
from stashflow.placement.rules import EPOCH

from .test_rules import Factory, add, count, locks_of, rse_id, usage_matches_locks
from .test_rules import world as world  # the fixture, re-exported for these tests


def repair_pass(factory: Factory) -> list[rules.Repair]:
    """What the server's background round does: the batch, then one transaction per rule."""
    with factory() as s:
        batch = rules.stuck_rules(s)
    done = []
    for rule_id in batch:
        with factory.begin() as s:
            result = rules.repair_rule(s, rule_id)
        if result is not None:
            done.append(result)
    return done


def get_rule(s: Session, rule_id: str) -> Rule:
    rule = s.get(Rule, rule_id)
    assert rule is not None
    return rule


def later(monkeypatch: pytest.MonkeyPatch, **delta: float) -> None:
    """Move the rules' clock (the catalog's utcnow) `delta` ahead of the real time."""
    monkeypatch.setattr(rules, "utcnow", lambda: clock.utcnow() + timedelta(**delta))


def test_files_refused_for_quota_are_placed_once_the_quota_allows(world: Factory) -> None:
    with world.begin() as s:
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"b{i}", "bytes": 6000} for i in range(2)])
        dids.add_collection(s, "alice", "user.alice", "mine", DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "b0"}])
        rule_id = add(s, "alice", "user.alice:mine", rse_expression="T2_X")
    with world.begin() as s:
        # 6000 of alice's 10000 on T2_X are used: b1 does not fit.
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "b1"}])
    with world() as s:
        assert get_rule(s, rule_id).state == RuleState.STUCK
        assert set(locks_of(s, rule_id)) == {"b0"}
    # Nothing changed: the pass leaves it STUCK.
    [result] = repair_pass(world)
    assert result.state == RuleState.STUCK and result.placed == 0
    with world.begin() as s:
        quota.set_local_limit(s, "root", "alice", "T2_X", 20_000)
    [result] = repair_pass(world)
    assert (result.rule_id, result.state, result.placed) == (rule_id, RuleState.REPLICATING, 1)
    with world() as s:
        rule = get_rule(s, rule_id)
        assert rule.state == RuleState.REPLICATING
        assert rule.error is None and rule.stuck_at is None
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (
            0, 2, 0)
        assert locks_of(s, rule_id) == {"b0": {"T2_X"}, "b1": {"T2_X"}}
        x = rse_id(s, "T2_X")
        assert count(s, Request, Request.dest_rse_id == x, Request.name == "b1",
                     Request.state == RequestState.QUEUED) == 1
        usage = {row["rse"]: (row["files"], row["bytes"])
                 for row in quota.local_usage(s, "alice")}
        assert usage["T2_X"] == (2, 12_000)
        usage_matches_locks(s)
    assert repair_pass(world) == []


def test_a_stuck_lock_moves_to_another_rse_of_the_expression(world: Factory) -> None:
    """Two copies on three RSEs: the stuck copy cannot go where the other copy is, nor
    stay on its RSE, which is not writable any more; it moves to the third."""
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds2", rse_expression="tier=2", copies=2)
        placed = locks_of(s, rule_id)
    assert placed["f4"] == placed["f5"] and len(placed["f4"]) == 2
    bad, kept = sorted(placed["f4"])
    [third] = {"T2_X", "T2_Y", "T2_Z"} - {bad, kept}
    with world.begin() as s:
        replicas.update_states(s, "root", bad, [
            {"scope": "test", "name": "f4", "state": "U", "error_message": "checksum"}])
        rses.update_rse(s, bad, {"availability_write": False})
    with world() as s:
        rule = get_rule(s, rule_id)
        assert rule.state == RuleState.STUCK and rule.locks_stuck_cnt == 1
    [result] = repair_pass(world)
    assert (result.state, result.moved, result.placed) == (RuleState.REPLICATING, 1, 0)
    with world() as s:
        rule = get_rule(s, rule_id)
        assert rule.state == RuleState.REPLICATING
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (
            0, 4, 0)
        assert rule.error is None and rule.stuck_at is None
        assert locks_of(s, rule_id) == {"f4": {kept, third}, "f5": {bad, kept}}
        # The abandoned copy: no lock, delete now, and nobody waits for its transfer.
        old = s.get(Replica, (rse_id(s, bad), "test", "f4"))
        assert old is not None and old.lock_cnt == 0 and old.tombstone == EPOCH
        assert count(s, Request, Request.dest_rse_id == rse_id(s, bad),
                     Request.name == "f4") == 0
        new = s.get(Replica, (rse_id(s, third), "test", "f4"))
        assert new is not None and new.state == ReplicaState.COPYING and new.lock_cnt == 1
        assert count(s, Request, Request.dest_rse_id == rse_id(s, third),
                     Request.name == "f4", Request.state == RequestState.QUEUED) == 1
        usage_matches_locks(s)


def test_a_rule_that_cannot_be_repaired_stays_stuck_and_waits_its_turn(
        world: Factory) -> None:
    with world.begin() as s:
        stuck = add(s, "root", "test:ds2", rse_expression="T2_Y")
        # Stuck too, but SUSPENDED: never taken.
        suspended = add(s, "root", "test:ds1", rse_expression="T2_X")
        rules.update_rule(s, "root", stuck, {"state": "STUCK", "cancel_requests": True})
        rules.update_rule(s, "root", suspended, {"state": "STUCK"})
        rules.update_rule(s, "root", suspended, {"state": "SUSPENDED"})
        other = add(s, "root", "test:f0", rse_expression="T2_Z")
        rules.update_rule(s, "root", other, {"state": "STUCK"})
        # The queue: the least recently updated first, as in Rucio.
        long_ago = utcnow() - timedelta(hours=1)
        get_rule(s, stuck).updated_at = long_ago
        get_rule(s, other).updated_at = long_ago + timedelta(minutes=1)
    with world() as s:
        assert rules.stuck_rules(s) == [stuck, other]
        since = get_rule(s, stuck).stuck_at
        assert since is not None
        y = rse_id(s, "T2_Y")
        assert count(s, Request, Request.dest_rse_id == y) == 0
        assert count(s, Replica, Replica.rse_id == y,
                     Replica.state == ReplicaState.UNAVAILABLE) == 2
    with world.begin() as s:
        rses.update_rse(s, "T2_Y", {"availability_write": False})
    with world.begin() as s:
        result = rules.repair_rule(s, stuck)
    assert result is not None and result.state == RuleState.STUCK
    assert (result.moved, result.requeued) == (0, 0)
    with world() as s:
        rule = get_rule(s, stuck)
        assert rule.state == RuleState.STUCK and rule.locks_stuck_cnt == 2
        # A retry is no progress: stuck_at still says since when the rule is stuck.
        assert rule.stuck_at == since
        assert rule.error is not None and "where the copy is stuck" in rule.error
        assert locks_of(s, stuck) == {"f4": {"T2_Y"}, "f5": {"T2_Y"}}
        # Its turn is over: the other rule comes first now.
        assert rules.stuck_rules(s) == [other, stuck]
        usage_matches_locks(s)
    with world.begin() as s:
        # Writable again but still the only RSE: the transfers are retried there, and
        # the locks stay STUCK until the copies arrive.
        rses.update_rse(s, "T2_Y", {"availability_write": True})
    with world.begin() as s:
        result = rules.repair_rule(s, stuck)
    assert result is not None and (result.state, result.requeued) == (RuleState.STUCK, 2)
    with world() as s:
        y = rse_id(s, "T2_Y")
        assert count(s, Request, Request.dest_rse_id == y,
                     Request.state == RequestState.QUEUED) == 2
        assert count(s, Replica, Replica.rse_id == y,
                     Replica.state == ReplicaState.COPYING) == 2
        assert set(s.scalars(select(Lock.repair_cnt).where(Lock.rule_id == stuck))) == {1}
        assert get_rule(s, suspended).state == RuleState.SUSPENDED
    with world.begin() as s:
        replicas.update_states(s, "root", "T2_Y", [
            {"scope": "test", "name": name, "state": "A"} for name in ("f4", "f5")])
    with world() as s:
        assert get_rule(s, stuck).state == RuleState.OK
        usage_matches_locks(s)


def test_stuck_locks_on_replicas_that_arrived_are_ok(world: Factory) -> None:
    """A STUCK rule with nothing left to replicate (asked for by the user) is OK after a
    pass; the repairer does not move locks whose copy is there."""
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds2", rse_expression="SITE_A|T2_Y", copies=2)
        rules.update_rule(s, "root", rule_id, {"state": "STUCK"})
    with world() as s:
        assert get_rule(s, rule_id).state == RuleState.STUCK
    with world.begin() as s:
        # The copies on T2_Y arrive without the STUCK locks being told (a replica
        # registered again as AVAILABLE).
        for name in ("f4", "f5"):
            replica = s.get(Replica, (rse_id(s, "T2_Y"), "test", name))
            assert replica is not None
            replica.state = ReplicaState.AVAILABLE
    [result] = repair_pass(world)
    assert (result.state, result.now_ok, result.moved) == (RuleState.OK, 2, 0)
    with world() as s:
        rule = get_rule(s, rule_id)
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (
            4, 0, 0)
        usage_matches_locks(s)


def test_a_rule_stuck_for_two_weeks_is_suspended_instead_of_retried(
        world: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in Rucio: the two weeks count from `stuck_at`, which failed repairs leave alone;
    past them the repairer SUSPENDs the rule without touching anything else (its locks,
    counters and error stay) and never takes it again."""
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds2", rse_expression="T2_Y")
        rules.update_rule(s, "root", rule_id, {"state": "STUCK", "cancel_requests": True})
    with world() as s:
        since = get_rule(s, rule_id).stuck_at
        assert since is not None
    # Thirteen days on, T2_Y is still the only RSE: the transfers are retried there.
    later(monkeypatch, days=13)
    [result] = repair_pass(world)
    assert (result.state, result.requeued) == (RuleState.STUCK, 2)
    with world() as s:
        rule = get_rule(s, rule_id)
        assert rule.stuck_at == since
        error = rule.error
        assert error is not None and "where the copy is stuck" in error
    later(monkeypatch, days=14, minutes=1)
    [result] = repair_pass(world)
    assert (result.rule_id, result.state, result.stuck_since) == (
        rule_id, RuleState.SUSPENDED, since)
    assert (result.placed, result.moved, result.now_ok, result.requeued) == (0, 0, 0, 0)
    assert result.changed and "not repaired any more" in str(result)
    with world() as s:
        rule = get_rule(s, rule_id)
        assert rule.state == RuleState.SUSPENDED
        assert (rule.stuck_at, rule.error) == (since, error)
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (
            0, 0, 2)
        # Not retried: the repair count is the first retry's.
        assert set(s.execute(select(Lock.state, Lock.repair_cnt).where(
            Lock.rule_id == rule_id))) == {(LockState.STUCK, 1)}
        assert rules.stuck_rules(s) == []
        usage_matches_locks(s)
    assert repair_pass(world) == []
    with world.begin() as s:
        assert rules.repair_rule(s, rule_id) is None


def test_a_rule_taken_up_again_after_suspension_gets_two_more_weeks(
        world: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds2", rse_expression="T2_Y")
        rules.update_rule(s, "root", rule_id, {"state": "STUCK", "cancel_requests": True})
    later(monkeypatch, days=15)
    [result] = repair_pass(world)
    assert result.state == RuleState.SUSPENDED
    with world.begin() as s:
        # Lifting the suspension re-evaluates the rule: still STUCK, stuck from now on.
        rules.update_rule(s, "root", rule_id, {"state": "REPLICATING"})
    with world() as s:
        rule = get_rule(s, rule_id)
        assert rule.state == RuleState.STUCK
        assert rule.stuck_at is not None
        assert rule.stuck_at > clock.utcnow() + timedelta(days=14)
    # So the repairer retries it instead of suspending it again.
    [result] = repair_pass(world)
    assert (result.rule_id, result.state, result.requeued) == (rule_id, RuleState.STUCK, 2)
