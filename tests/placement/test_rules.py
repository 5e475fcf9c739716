"""Synchronous rule creation and removal on SQLite and PostgreSQL: RSE selection, locks,
shared requests, quota, counters, tombstones, and the Rucio exceptions."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from stashflow.placement import accounts, dids, quota, replicas, rses, rules, scopes
from stashflow.placement.clock import utcnow
from stashflow.placement.dids import CHUNK
from stashflow.placement.exceptions import (
    AccessDenied,
    DuplicateRule,
    InputValidationError,
    InsufficientAccountLimit,
    InsufficientTargetRSEs,
    InvalidRSEExpression,
    InvalidRuleWeight,
    RSEOverQuota,
    RuleNotFound,
    UnsupportedOperation,
)
from stashflow.placement.models import (
    AccountUsage,
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

Factory = sessionmaker[Session]
FILE_BYTES = 100


@pytest.fixture
def world(factory: Factory) -> Factory:
    """SITE_A holds ds1 (4 files) and ds2 (2 files), both in container cont; T2_X/T2_Y/T2_Z
    are empty tier-2 sites. Account alice owns scope user.alice and has quota on T2_X
    and T2_Y only."""
    with factory.begin() as s:
        scopes.add_scope(s, "root", "test", "root")
        for name, tier in (("SITE_A", "1"), ("T2_X", "2"), ("T2_Y", "2"), ("T2_Z", "2")):
            rses.add_rse(s, name, {})
            rses.set_attribute(s, name, "tier", tier)
        rses.set_attribute(s, "T2_X", "freespace", "10")
        rses.set_attribute(s, "T2_Y", "freespace", "30")
        files = [{"scope": "test", "name": f"f{i}", "bytes": FILE_BYTES} for i in range(6)]
        replicas.add_replicas(s, "root", "SITE_A", files)
        dids.add_collection(s, "root", "test", "ds1", DIDType.DATASET)
        dids.add_collection(s, "root", "test", "ds2", DIDType.DATASET)
        dids.add_collection(s, "root", "test", "cont", DIDType.CONTAINER)
        dids.attach(s, "root", "test", "ds1", [{"scope": "test", "name": f"f{i}"}
                                               for i in range(4)])
        dids.attach(s, "root", "test", "ds2", [{"scope": "test", "name": f"f{i}"}
                                               for i in (4, 5)])
        dids.attach(s, "root", "test", "cont", [{"scope": "test", "name": "ds1"},
                                                {"scope": "test", "name": "ds2"}])
        accounts.add_account(s, "alice", "USER")
        scopes.add_scope(s, "root", "user.alice", "alice")
        quota.set_local_limit(s, "root", "alice", "T2_X", 10_000)
        quota.set_local_limit(s, "root", "alice", "T2_Y", -1)
    return factory


def add(session: Session, caller: str, did: str, **body: object) -> str:
    scope, name = did.split(":")
    options = rules.parse_options(caller, {"copies": 1, **body})
    [rule_id] = rules.add_rules(session, caller, [{"scope": scope, "name": name}], options)
    return rule_id


def count(session: Session, model: type, *where: object) -> int:
    return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_rule_on_rse_holding_the_data_is_ok_at_once(world: Factory) -> None:
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds1", rse_expression="SITE_A")
    with world() as s:
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.OK
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt) == (4, 0)
        assert count(s, Request) == 0
        site = rses.get_rse(s, "SITE_A")
        assert all(r.lock_cnt == 1 for r in s.scalars(select(Replica).where(
            Replica.rse_id == site.id, Replica.name.in_(["f0", "f1", "f2", "f3"]))))


def test_transfers_are_shared_between_rules(world: Factory) -> None:
    with world.begin() as s:
        first = add(s, "root", "test:ds1", rse_expression="T2_Z")
        second = add(s, "root", "test:ds1", rse_expression="T2_Z|T2_Z", copies=1)
    with world() as s:
        for rule_id in (first, second):
            rule = s.get(Rule, rule_id)
            assert rule is not None and rule.state == RuleState.REPLICATING
            assert (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (
                0, 4, 0)
        # Two rules over the same 4 files: 8 locks but one request per (file, RSE).
        assert count(s, Lock) == 8
        assert count(s, Request, Request.state == RequestState.QUEUED) == 4
        z = rses.get_rse(s, "T2_Z")
        copying = list(s.scalars(select(Replica).where(Replica.rse_id == z.id)))
        assert len(copying) == 4
        assert all(r.state == ReplicaState.COPYING and r.lock_cnt == 2 for r in copying)
        # Usage is per lock: 2 rules x 4 files x 100 bytes.
        usage = s.get(AccountUsage, ("root", z.id))
        assert usage is not None and (usage.files, usage.bytes) == (8, 8 * FILE_BYTES)


def test_grouping(world: Factory) -> None:
    with world.begin() as s:
        all_rule = add(s, "root", "test:cont", rse_expression="tier=2", grouping="ALL")
        ds_rule = add(s, "root", "test:cont", rse_expression="tier=2", grouping="DATASET",
                      copies=2)
        none_rule = add(s, "root", "test:cont", rse_expression="tier=2", grouping="NONE",
                        copies=3)
    with world() as s:
        def rses_of(rule_id: str) -> dict[str, set[str]]:
            per_file: dict[str, set[str]] = {}
            for lock in s.scalars(select(Lock).where(Lock.rule_id == rule_id)):
                per_file.setdefault(lock.name, set()).add(lock.rse_id)
            return per_file

        placed = rses_of(all_rule)
        assert len(placed) == 6 and len(set.union(*placed.values())) == 1
        placed = rses_of(ds_rule)
        assert all(len(v) == 2 for v in placed.values())
        assert len({frozenset(placed[f"f{i}"]) for i in range(4)}) == 1  # ds1 together
        assert placed["f4"] == placed["f5"]  # ds2 together
        placed = rses_of(none_rule)
        assert all(len(v) == 3 for v in placed.values())
        assert count(s, Lock, Lock.rule_id == none_rule) == 18


def test_prefers_rses_that_already_hold_the_data(world: Factory) -> None:
    with world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="T2_Y")
        # Mark the copies done, as the conveyor would.
        for replica in s.scalars(select(Replica).where(Replica.state == ReplicaState.COPYING)):
            replica.state = ReplicaState.AVAILABLE
    for _ in range(5):
        with world.begin() as s:
            rule_id = add(s, "root", "test:ds1", rse_expression="tier=2",
                          comment=str(utcnow()))
            chosen = {lock.rse_id for lock in s.scalars(select(Lock).where(
                Lock.rule_id == rule_id))}
            assert chosen == {rses.get_rse(s, "T2_Y").id}
            rule = s.get(Rule, rule_id)
            assert rule is not None and rule.state == RuleState.OK
            rules.remove_rule_now(s, rule)


def test_weight_excludes_rses_without_the_attribute(world: Factory) -> None:
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds2", rse_expression="tier=2", weight="freespace",
                      copies=2)
        chosen = {lock.rse_id for lock in s.scalars(select(Lock).where(
            Lock.rule_id == rule_id))}
        assert chosen == {rses.get_rse(s, "T2_X").id, rses.get_rse(s, "T2_Y").id}
    with pytest.raises(InsufficientTargetRSEs), world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="tier=2", weight="freespace", copies=3)
    with world.begin() as s:
        rses.set_attribute(s, "T2_Z", "freespace", "lots")
    with pytest.raises(InvalidRuleWeight), world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="tier=2", weight="freespace")


def test_quota_no_limit_row_means_zero(world: Factory) -> None:
    with world.begin() as s:
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"a{i}", "bytes": 4000} for i in range(2)])
        dids.add_collection(s, "alice", "user.alice", "mine", DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "mine", [
            {"scope": "user.alice", "name": f"a{i}"} for i in range(2)])
    with pytest.raises(InsufficientAccountLimit), world.begin() as s:
        add(s, "alice", "user.alice:mine", rse_expression="T2_Z")  # no limit row
    with world.begin() as s:
        add(s, "alice", "user.alice:mine", rse_expression="T2_X")  # 8000 of 10000
    with pytest.raises(InsufficientAccountLimit), world.begin() as s:
        add(s, "alice", "user.alice:mine", rse_expression="T2_X|T2_Z", copies=1,
            grouping="ALL")  # 8000 more does not fit on T2_X; T2_Z has no quota
    with world.begin() as s:
        add(s, "alice", "user.alice:mine", rse_expression="T2_Y")  # -1 = unlimited
        usage = {row["rse"]: row for row in quota.local_usage(s, "alice")}
        assert usage["T2_X"]["bytes"] == 8000 and usage["T2_X"]["bytes_remaining"] == 2000
        assert usage["T2_Y"]["bytes_limit"] == float("inf")
    with pytest.raises(AccessDenied), world.begin() as s:
        add(s, "alice", "user.alice:mine", rse_expression="T2_Z", ignore_account_limit=True)


def test_space_limit_and_availability(world: Factory) -> None:
    with world.begin() as s:
        rses.set_limit(s, "T2_Z", "MaxSpaceAvailable", 150)
    with pytest.raises(RSEOverQuota), world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="T2_Z")
    with world.begin() as s:
        rses.update_rse(s, "T2_X", {"availability_write": False})
    with pytest.raises(InsufficientTargetRSEs), world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="T2_X")
    with world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="T2_X", ignore_availability=True)


def test_refusals_write_nothing(world: Factory) -> None:
    with world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="T2_X")
    with world() as s:
        before = (count(s, Rule), count(s, Lock), count(s, Request), count(s, Replica))
    with pytest.raises(DuplicateRule), world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="T2_X")
    with pytest.raises(InsufficientTargetRSEs, match="3 copies"), world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="T2_X|T2_Y", copies=3)
    with pytest.raises(InvalidRSEExpression) as info, world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="tier=2&(T2_X")
    assert info.value.status == 409
    with pytest.raises(InvalidRSEExpression, match="empty set"), world.begin() as s:
        add(s, "root", "test:ds1", rse_expression="tier=7")
    # A multi-DID request where the second DID fails leaves no trace of the first.
    with pytest.raises(DuplicateRule), world.begin() as s:
        options = rules.parse_options("root", {"copies": 1, "rse_expression": "T2_X"})
        rules.add_rules(s, "root", [{"scope": "test", "name": "ds2"},
                                    {"scope": "test", "name": "ds1"}], options)
    with world() as s:
        assert (count(s, Rule), count(s, Lock), count(s, Request), count(s, Replica)) == before


def test_soft_delete_cleaner_and_tombstones(world: Factory) -> None:
    with world.begin() as s:
        keep = add(s, "root", "test:ds1", rse_expression="SITE_A")
        purge = add(s, "root", "test:ds2", rse_expression="SITE_A", purge_replicas=True)
        moving = add(s, "root", "test:ds2", rse_expression="T2_Z")
        locked = add(s, "root", "test:ds2", rse_expression="T2_Y", locked=True)
    with world.begin() as s:
        with pytest.raises(AccessDenied):
            rules.delete_rule(s, "alice", keep)
        with pytest.raises(UnsupportedOperation, match="locked"):
            rules.delete_rule(s, "root", locked)
        for rule_id in (keep, purge, moving):
            rules.delete_rule(s, "root", rule_id)
    with world() as s:
        rule = s.get(Rule, keep)
        assert rule is not None and rule.expires_at is not None
        assert timedelta(minutes=59) < rule.expires_at - utcnow() <= timedelta(hours=1)
    with world.begin() as s:
        assert rules.clean_expired(s) == 0  # not yet expired
        assert rules.clean_expired(s, utcnow() + timedelta(hours=2)) == 3
    with world() as s:
        assert count(s, Rule) == 1 and count(s, Lock) == 2
        site_a, t2_z = rses.get_rse(s, "SITE_A"), rses.get_rse(s, "T2_Z")
        kept = s.get(Replica, (site_a.id, "test", "f0"))
        assert kept is not None and kept.lock_cnt == 0
        assert kept.tombstone == kept.created_at  # LRU order for the reaper
        purged = s.get(Replica, (site_a.id, "test", "f4"))
        assert purged is not None and purged.tombstone == EPOCH
        unfinished = s.get(Replica, (t2_z.id, "test", "f4"))
        assert unfinished is not None and unfinished.tombstone == EPOCH
        # The transfer nobody needs any more is gone; the locked rule's stay.
        assert count(s, Request, Request.dest_rse_id == t2_z.id) == 0
        assert count(s, Request) == 2
        usage = s.get(AccountUsage, ("root", site_a.id))
        assert usage is not None and (usage.files, usage.bytes) == (0, 0)


def test_updates_and_approval(world: Factory) -> None:
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds2", rse_expression="T2_X", ask_approval=True)
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.WAITING_APPROVAL
        assert count(s, Lock, Lock.rule_id == rule_id) == 0
        rules.update_rule(s, "root", rule_id, {"approve": True, "lifetime": 60,
                                               "comment": "ok"})
        assert rule.state == RuleState.REPLICATING and rule.locks_replicating_cnt == 2
        assert rule.expires_at is not None and rule.comments == "ok"
        with pytest.raises(AccessDenied):
            rules.update_rule(s, "alice", rule_id, {"locked": True})
    listed = None
    with world() as s:
        listed = rules.list_rules(s, {"state": "R", "account": "root"})
    assert [r["id"] for r in listed] == [rule_id] and listed[0]["bytes"] == 200
    assert listed[0]["state"] == "REPLICATING" and listed[0]["grouping"] == "DATASET"
    with world() as s:
        locks = rules.list_locks(s, rule_id)
        assert {lock["state"] for lock in locks} == {LockState.REPLICATING.value}


def locks_of(s: Session, rule_id: str) -> dict[str, set[str]]:
    names = {r.id: r.rse for r in s.scalars(select(rses.RSE))}
    out: dict[str, set[str]] = {}
    for lock in s.scalars(select(Lock).where(Lock.rule_id == rule_id)):
        out.setdefault(lock.name, set()).add(names[lock.rse_id])
    return out


def test_attaching_extends_rules_at_once(world: Factory) -> None:
    with world.begin() as s:
        on_ds = add(s, "root", "test:ds1", rse_expression="tier=2")
        on_cont = add(s, "root", "test:cont", rse_expression="tier=2", copies=2)
        on_all = add(s, "root", "test:cont", rse_expression="tier=2|SITE_A", grouping="ALL")
        replicas.add_replicas(s, "root", "SITE_A", [
            {"scope": "test", "name": n, "bytes": FILE_BYTES} for n in ("g1", "g2", "g3")])
        dids.attach(s, "root", "test", "ds1", [{"scope": "test", "name": "g1"}])
        dids.add_collection(s, "root", "test", "ds3", DIDType.DATASET)
        dids.attach(s, "root", "test", "ds3", [{"scope": "test", "name": "g2"},
                                               {"scope": "test", "name": "g3"}])
        dids.attach(s, "root", "test", "cont", [{"scope": "test", "name": "ds3"}])
    with world() as s:
        placed = locks_of(s, on_ds)
        assert set(placed) == {"f0", "f1", "f2", "f3", "g1"}
        assert len({frozenset(v) for v in placed.values()}) == 1  # g1 joins its dataset
        rule = s.get(Rule, on_ds)
        assert rule is not None and rule.locks_replicating_cnt == 5
        placed = locks_of(s, on_cont)
        assert set(placed) == {"f0", "f1", "f2", "f3", "f4", "f5", "g1", "g2", "g3"}
        assert placed["g1"] == placed["f0"] and placed["g2"] == placed["g3"]
        assert all(len(v) == 2 for v in placed.values())
        placed = locks_of(s, on_all)
        assert len({frozenset(v) for v in placed.values()}) == 1 and len(placed) == 9
        rule = s.get(Rule, on_all)
        assert rule is not None
        assert rule.locks_ok_cnt + rule.locks_replicating_cnt == 9
        # One request per (file, destination), however many rules need it.
        pairs = s.execute(select(Request.name, Request.dest_rse_id)).all()
        assert len(pairs) == len(set(pairs))


def test_a_rule_that_cannot_follow_new_content_becomes_stuck(world: Factory) -> None:
    with world.begin() as s:
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"a{i}", "bytes": 6000} for i in range(2)])
        dids.add_collection(s, "alice", "user.alice", "mine", DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "a0"}])
        rule_id = add(s, "alice", "user.alice:mine", rse_expression="T2_X", grouping="NONE")
    with world.begin() as s:
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "a1"}])
    with world() as s:
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.STUCK
        assert rule.error is not None and "quota" in rule.error
        assert [c["name"] for c in dids.list_content(s, "user.alice", "mine")] == ["a0", "a1"]
        assert set(locks_of(s, rule_id)) == {"a0"}


def test_detaching_releases_locks_not_reachable_any_more(world: Factory) -> None:
    with world.begin() as s:
        on_ds = add(s, "root", "test:ds1", rse_expression="T2_Z")
        on_cont = add(s, "root", "test:cont", rse_expression="T2_Y")
        dids.attach(s, "root", "test", "ds2", [{"scope": "test", "name": "f0"}])
        dids.detach(s, "root", "test", "ds1", [{"scope": "test", "name": "f0"}])
    with world() as s:
        assert set(locks_of(s, on_ds)) == {"f1", "f2", "f3"}
        rule = s.get(Rule, on_ds)
        assert rule is not None and rule.locks_replicating_cnt == 3
        # f0 is still in the container through ds2, so the container's rule keeps it.
        assert "f0" in locks_of(s, on_cont)
        z = rses.get_rse(s, "T2_Z")
        assert count(s, Request, Request.dest_rse_id == z.id, Request.name == "f0") == 0
        gone = s.get(Replica, (z.id, "test", "f0"))
        assert gone is not None and gone.lock_cnt == 0 and gone.tombstone == EPOCH
        usage = s.get(AccountUsage, ("root", z.id))
        assert usage is not None and (usage.files, usage.bytes) == (3, 3 * FILE_BYTES)


def test_bulk_paths_cross_chunk_boundaries(factory: Factory) -> None:
    """More files than one statement chunk, in two scopes: registration, attachment,
    listing, a rule and its removal stay exact."""
    total = 2 * CHUNK + 7
    with factory.begin() as s:
        scopes.add_scope(s, "root", "big", "root")
        scopes.add_scope(s, "root", "big2", "root")
        rses.add_rse(s, "SRC", {})
        rses.add_rse(s, "DST", {})
        rses.add_protocol(s, "SRC", {"scheme": "root", "hostname": "xrd.example.org",
                                     "port": 1094, "prefix": "/store", "impl": "x",
                                     "domains": {"wan": {"read": 1}}})
        files = [{"scope": "big" if i % 3 else "big2", "name": f"f{i:05d}", "bytes": i,
                  "adler32": f"{i:08x}", "meta": {"events": i, "color": "red"}}
                 for i in range(total)]
        assert replicas.add_replicas(s, "root", "SRC", files) == total
        dids.add_collection(s, "root", "big", "ds", DIDType.DATASET)
        dids.attach(s, "root", "big", "ds", [{"scope": f["scope"], "name": f["name"]}
                                             for f in files])
    with factory() as s:
        ds = dids.get_did(s, "big", "ds")
        assert (ds.bytes, ds.length) == (sum(range(total)), total)
        listed = replicas.list_replicas(s, [{"scope": "big", "name": "ds"}])
        assert len(listed) == total
        first = next(line for line in listed if line["name"] == "f00001")
        [pfn] = first["rses"]["SRC"]
        # Rucio writes the port whenever it is not 0, the scheme's default included.
        assert pfn == "root://xrd.example.org:1094/store/" + rses.deterministic_path(
            "big", "f00001")
        assert dids.get_metadata(s, "big2", "f00003", "ALL")["events"] == 3
    with factory.begin() as s:
        rule_id = add(s, "root", "big:ds", rse_expression="DST")
    with factory() as s:
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.locks_replicating_cnt == total
        assert count(s, Request) == total and count(s, Lock) == total
    with factory.begin() as s:
        rule = s.get(Rule, rule_id)
        assert rule is not None
        rules.remove_rule_now(s, rule)
    with factory() as s:
        assert count(s, Lock) == 0 and count(s, Request) == 0
        dst = rses.get_rse(s, "DST")
        assert count(s, Replica, Replica.rse_id == dst.id, Replica.tombstone == EPOCH) == total
        usage = s.get(AccountUsage, ("root", dst.id))
        assert usage is not None and (usage.files, usage.bytes) == (0, 0)


def usage_matches_locks(s: Session) -> None:
    """Account usage is counted per lock: for every (account, RSE) it must equal the locks
    that exist, whatever happened on the way."""
    expected: dict[tuple[str, str], tuple[int, int]] = {}
    for account, rse_id, files, size in s.execute(
            select(Lock.account, Lock.rse_id, func.count(), func.sum(Lock.bytes))
            .group_by(Lock.account, Lock.rse_id)):
        expected[(account, rse_id)] = (int(files), int(size or 0))
    recorded = {(u.account, u.rse_id): (u.files, u.bytes)
                for u in s.scalars(select(AccountUsage)) if (u.files, u.bytes) != (0, 0)}
    assert recorded == expected


def test_following_rses_checks_quota_and_availability(world: Factory) -> None:
    """Files attached to a dataset follow the RSE its rule already uses, but only if that
    RSE still qualifies; otherwise the rule becomes STUCK and nothing is locked there."""
    with world.begin() as s:
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"a{i}", "bytes": 4000} for i in range(4)])
        for name in ("quota_ds", "avail_ds"):
            dids.add_collection(s, "alice", "user.alice", name, DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "quota_ds",
                    [{"scope": "user.alice", "name": "a0"}])
        dids.attach(s, "alice", "user.alice", "avail_ds",
                    [{"scope": "user.alice", "name": "a2"}])
        by_quota = add(s, "alice", "user.alice:quota_ds", rse_expression="T2_X")
        by_avail = add(s, "alice", "user.alice:avail_ds", rse_expression="T2_Y",
                       grouping="ALL")
        rses.update_rse(s, "T2_Y", {"availability_write": False})
    with world.begin() as s:
        # 4000 of 10000 used on T2_X: two more files of 4000 do not fit.
        dids.attach(s, "alice", "user.alice", "quota_ds",
                    [{"scope": "user.alice", "name": "a1"},
                     {"scope": "user.alice", "name": "a3"}])
        dids.attach(s, "alice", "user.alice", "avail_ds",
                    [{"scope": "user.alice", "name": "a3"}])
    with world() as s:
        rule = s.get(Rule, by_quota)
        assert rule is not None and rule.state == RuleState.STUCK
        assert rule.error is not None and "quota" in rule.error
        assert set(locks_of(s, by_quota)) == {"a0"}
        rule = s.get(Rule, by_avail)
        assert rule is not None and rule.state == RuleState.STUCK
        assert rule.error is not None and "not writable" in rule.error
        assert set(locks_of(s, by_avail)) == {"a2"}
        usage = {row["rse"]: row["bytes"] for row in quota.local_usage(s, "alice")}
        assert usage["T2_X"] == 4000
        usage_matches_locks(s)


def test_following_moves_on_when_the_rse_in_use_does_not_qualify(world: Factory) -> None:
    """Rucio's selector takes the RSEs already in use as preferred ones and chooses among
    the other qualifying RSEs of the expression when they do not qualify any more."""
    with world.begin() as s:
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"a{i}", "bytes": 4000} for i in range(2)])
        dids.add_collection(s, "alice", "user.alice", "mine", DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "a0"}])
        rses.update_rse(s, "T2_Y", {"availability_write": False})
        rule_id = add(s, "alice", "user.alice:mine", rse_expression="T2_X|T2_Y")
        rses.update_rse(s, "T2_Y", {"availability_write": True})
        rses.update_rse(s, "T2_X", {"availability_write": False})
    with world.begin() as s:
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "a1"}])
    with world() as s:
        assert locks_of(s, rule_id) == {"a0": {"T2_X"}, "a1": {"T2_Y"}}
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.REPLICATING
        usage_matches_locks(s)


def test_usage_counts_the_locks_of_a_partly_extended_rule(world: Factory) -> None:
    """The first attached file (or dataset) is placed, the next is refused: the rule is
    STUCK, and the locks that were made are in the account's usage."""
    with world.begin() as s:
        rses.add_rse(s, "T2_W", {})
        quota.set_local_limit(s, "root", "alice", "T2_W", 10_000)
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"b{i}", "bytes": 6000} for i in range(2)])
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"c{i}", "bytes": 3000} for i in range(4)])
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": "seed", "bytes": 1}])
        dids.add_collection(s, "alice", "user.alice", "none_ds", DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "none_ds",
                    [{"scope": "user.alice", "name": "seed"}])
        none_rule = add(s, "alice", "user.alice:none_ds", rse_expression="T2_W",
                        grouping="NONE")
        # A container whose rule places dataset by dataset: d1 fits, d2 does not.
        dids.add_collection(s, "alice", "user.alice", "cont", DIDType.CONTAINER)
        for name in ("d1", "d2"):
            dids.add_collection(s, "alice", "user.alice", name, DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "d1", [{"scope": "user.alice", "name": "c0"},
                                                     {"scope": "user.alice", "name": "c1"}])
        dids.attach(s, "alice", "user.alice", "d2", [{"scope": "user.alice", "name": "c2"},
                                                     {"scope": "user.alice", "name": "c3"}])
        cont_rule = add(s, "alice", "user.alice:cont", rse_expression="T2_X")
    with world.begin() as s:
        dids.attach(s, "alice", "user.alice", "none_ds",
                    [{"scope": "user.alice", "name": "b0"},
                     {"scope": "user.alice", "name": "b1"}])
        dids.attach(s, "alice", "user.alice", "cont",
                    [{"scope": "user.alice", "name": "d1"},
                     {"scope": "user.alice", "name": "d2"}])
    with world() as s:
        for rule_id, placed in ((none_rule, {"seed", "b0"}), (cont_rule, {"c0", "c1"})):
            rule = s.get(Rule, rule_id)
            assert rule is not None and rule.state == RuleState.STUCK
            assert set(locks_of(s, rule_id)) == placed
        usage = {row["rse"]: (row["files"], row["bytes"])
                 for row in quota.local_usage(s, "alice")}
        assert usage["T2_W"] == (2, 6001) and usage["T2_X"] == (2, 6000)
        usage_matches_locks(s)


def test_suspended_rules_are_not_extended(world: Factory) -> None:
    with world.begin() as s:
        rule_id = add(s, "root", "test:ds2", rse_expression="T2_Y")
        rules.update_rule(s, "root", rule_id, {"state": "SUSPENDED"})
        dids.attach(s, "root", "test", "ds2", [{"scope": "test", "name": "f0"}])
    with world() as s:
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.SUSPENDED
        assert set(locks_of(s, rule_id)) == {"f4", "f5"}
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt) == (0, 2)
        usage_matches_locks(s)


def test_a_stuck_rule_stays_stuck_while_work_is_unplaced(world: Factory) -> None:
    """Until the judge-repairer places what could not be placed, a later attachment that
    does fit must not make the rule look healthy; detaching the unplaced file does."""
    with world.begin() as s:
        rses.add_rse(s, "T2_W", {})
        quota.set_local_limit(s, "root", "alice", "T2_W", 10_000)
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": f"b{i}", "bytes": 6000} for i in range(2)])
        replicas.add_replicas(s, "alice", "SITE_A", [
            {"scope": "user.alice", "name": "small", "bytes": 1}])
        dids.add_collection(s, "alice", "user.alice", "mine", DIDType.DATASET)
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "b0"}])
        rule_id = add(s, "alice", "user.alice:mine", rse_expression="T2_W", grouping="NONE")
    with world.begin() as s:
        dids.attach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "b1"}])
    with world.begin() as s:
        quota.set_local_limit(s, "root", "alice", "T2_W", -1)
        dids.attach(s, "alice", "user.alice", "mine",
                    [{"scope": "user.alice", "name": "small"}])
    with world() as s:
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.STUCK
        assert rule.error is not None and "quota" in rule.error
        assert set(locks_of(s, rule_id)) == {"b0", "small"}
    with world.begin() as s:
        # Asking for the state again does not hide the unplaced file either.
        rules.update_rule(s, "root", rule_id, {"state": "REPLICATING"})
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.STUCK
    with world.begin() as s:
        dids.detach(s, "alice", "user.alice", "mine", [{"scope": "user.alice", "name": "b1"}])
    with world() as s:
        rule = s.get(Rule, rule_id)
        assert rule is not None and rule.state == RuleState.REPLICATING
        assert rule.error is None and rule.stuck_at is None


def rse_id(s: Session, name: str) -> str:
    return rses.get_rse(s, name).id


def test_asking_for_stuck_marks_locks_and_cancel_requests_gives_the_copies_up(
        world: Factory) -> None:
    """Rucio's update_rule(state=STUCK): the rule's REPLICATING locks become STUCK (so the
    repairer retries them), requests stay; with cancel_requests every REPLICATING lock on
    those replicas is STUCK with its rule, the requests go and the copies are
    UNAVAILABLE."""
    with world.begin() as s:
        plain = add(s, "root", "test:ds1", rse_expression="T2_X")
        cancelled = add(s, "root", "test:ds2", rse_expression="T2_Y")
        other = add(s, "root", "test:f4", rse_expression="T2_Y")
        rules.update_rule(s, "root", plain, {"state": "STUCK"})
    with world() as s:
        rule = s.get(Rule, plain)
        assert rule is not None and rule.state == RuleState.STUCK
        assert rule.stuck_at is not None
        assert (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (
            0, 0, 4)
        assert count(s, Lock, Lock.rule_id == plain, Lock.state == LockState.STUCK) == 4
        x = rse_id(s, "T2_X")
        assert count(s, Request, Request.dest_rse_id == x) == 4
        assert count(s, Replica, Replica.rse_id == x,
                     Replica.state == ReplicaState.COPYING) == 4
    with world.begin() as s:
        rules.update_rule(s, "root", cancelled, {"state": "STUCK", "cancel_requests": True})
    with world() as s:
        y = rse_id(s, "T2_Y")
        for rule_id, locks in ((cancelled, 2), (other, 1)):
            rule = s.get(Rule, rule_id)
            assert rule is not None and rule.state == RuleState.STUCK
            assert (rule.locks_replicating_cnt, rule.locks_stuck_cnt) == (0, locks)
        assert count(s, Request, Request.dest_rse_id == y) == 0
        assert count(s, Replica, Replica.rse_id == y,
                     Replica.state == ReplicaState.UNAVAILABLE) == 2
        # The other rule's requests were not touched.
        assert count(s, Request, Request.dest_rse_id == rse_id(s, "T2_X")) == 4
        usage_matches_locks(s)
    with world.begin() as s:
        # cancel_requests alone does nothing, as in Rucio; SUSPENDED still suspends.
        rules.update_rule(s, "root", plain, {"cancel_requests": True})
        assert count(s, Request, Request.dest_rse_id == rse_id(s, "T2_X")) == 4
        rules.update_rule(s, "root", plain, {"state": "SUSPENDED"})
        rule = s.get(Rule, plain)
        assert rule is not None and rule.state == RuleState.SUSPENDED


def test_child_rules_and_boost(world: Factory) -> None:
    """Rucio's parent/child relation: same DID only, never itself; the parent cannot be
    deleted nor cleaned while it has a child, and is released when the child is OK."""
    with world.begin() as s:
        parent = add(s, "root", "test:ds2", rse_expression="SITE_A")
        child = add(s, "root", "test:ds2", rse_expression="T2_Y")
        elsewhere = add(s, "root", "test:ds1", rse_expression="T2_X")
        with pytest.raises(InputValidationError, match="same dataset"):
            rules.update_rule(s, "root", parent, {"child_rule_id": elsewhere})
        with pytest.raises(InputValidationError, match="Self-referencing"):
            rules.update_rule(s, "root", parent, {"child_rule_id": parent})
        with pytest.raises(InputValidationError, match="no such relationship"):
            rules.update_rule(s, "root", parent, {"child_rule_id": None})
        with pytest.raises(RuleNotFound):
            rules.update_rule(s, "root", parent, {"child_rule_id": "0" * 32})
        rules.update_rule(s, "root", parent, {"child_rule_id": child, "lifetime": 0})
        row = s.get(Rule, parent)
        assert row is not None and row.child_rule_id == child
        with pytest.raises(UnsupportedOperation, match="child rule"):
            rules.delete_rule(s, "root", parent)
    with world.begin() as s:
        assert rules.clean_expired(s, utcnow() + timedelta(seconds=5)) == 0
        # The child's copies arrive: the child is OK and lets its parent go.
        rules.replicas_available(s, rse_id(s, "T2_Y"), [("test", "f4"), ("test", "f5")])
    with world.begin() as s:
        row = s.get(Rule, parent)
        assert row is not None and row.child_rule_id is None
        assert rules.clean_expired(s, utcnow() + timedelta(seconds=5)) == 1
        assert s.get(Rule, parent) is None
        # Dissolving a relation also drops the parent's expiry, as in Rucio.
        again = add(s, "root", "test:ds1", rse_expression="SITE_A")
        rules.update_rule(s, "root", again, {"child_rule_id": elsewhere, "lifetime": 60})
        rules.update_rule(s, "root", again, {"child_rule_id": None})
        row = s.get(Rule, again)
        assert row is not None and row.child_rule_id is None and row.expires_at is None
        # Removing a child releases its parent and keeps the parent's data.
        rules.update_rule(s, "root", again, {"child_rule_id": elsewhere, "lifetime": 0})
        elsewhere_row = s.get(Rule, elsewhere)
        assert elsewhere_row is not None
        rules.remove_rule_now(s, elsewhere_row)
        row = s.get(Rule, again)
        assert row is not None and row.child_rule_id is None and row.expires_at is None
    with world.begin() as s:
        stuck = add(s, "root", "test:ds1", rse_expression="T2_X")
        rules.update_rule(s, "root", stuck, {"state": "STUCK", "boost_rule": True})
    with world() as s:
        row = s.get(Rule, stuck)
        assert row is not None and row.state == RuleState.STUCK
        assert row.updated_at < utcnow() - timedelta(hours=23)
        assert count(s, Lock, Lock.rule_id == stuck,
                     Lock.updated_at < utcnow() - timedelta(hours=23)) == 4
