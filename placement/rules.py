"""Replication rules: synchronous creation (RSE selection, locks, transfer requests),
soft deletion and the cleaner that removes expired rules, updates, analysis.

Creation runs in the caller's transaction: either the rule, all its locks, the replicas in
COPYING state, the shared transfer requests and the quota usage exist, or none of them.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, func, select, update
from sqlalchemy.orm import Session

from stashflow.placement import quota
from stashflow.placement.accounts import get_account, is_admin
from stashflow.placement.clock import rfc1123, utcnow
from stashflow.placement.db import bulk_insert, keys_in
from stashflow.placement.dids import (
    CHUNK,
    datasets_of,
    get_did,
    iter_files,
    lock_collections,
)
from stashflow.placement.exceptions import (
    AccessDenied,
    DuplicateRule,
    InputValidationError,
    InsufficientAccountLimit,
    InsufficientTargetRSEs,
    InvalidObject,
    InvalidReplicationRule,
    InvalidRSEExpression,
    InvalidRuleWeight,
    RSEOverQuota,
    RuleNotFound,
    StagingAreaRuleRequiresLifetime,
    UnsupportedOperation,
)
from stashflow.placement.models import (
    DID,
    RSE,
    Attachment,
    DIDType,
    Lock,
    LockState,
    Replica,
    ReplicaState,
    Request,
    RequestState,
    RequestType,
    Rule,
    RuleGrouping,
    RuleNotification,
    RuleState,
)
from stashflow.placement.replicas import catalog_usage
from stashflow.placement.rses import deterministic_path, list_attributes, resolve
from stashflow.placement.rses import limits_of as rse_limits

DEFAULT_ACTIVITY = "User Subscriptions"
SOFT_DELETE_DELAY = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1)
_NOTIFY = {"Y": RuleNotification.YES, "N": RuleNotification.NO, "C": RuleNotification.CLOSE,
           "P": RuleNotification.PROGRESS}
_ACTIVE_REQUEST_STATES = {RequestState.QUEUED, RequestState.SUBMITTING, RequestState.SUBMITTED,
                          RequestState.WAITING, RequestState.PREPARING}


@dataclass
class RuleOptions:
    """What `POST /rules/` carries, validated."""

    copies: int
    rse_expression: str
    account: str
    grouping: RuleGrouping = RuleGrouping.DATASET
    weight: str | None = None
    lifetime: int | None = None
    locked: bool = False
    source_replica_expression: str | None = None
    activity: str = DEFAULT_ACTIVITY
    notify: RuleNotification = RuleNotification.NO
    purge_replicas: bool = False
    ignore_availability: bool = False
    ignore_account_limit: bool = False
    comment: str | None = None
    ask_approval: bool = False
    priority: int = 3
    meta: Any = None
    split_container: bool = False
    subscription_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _as_bool(name: str, value: Any, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidObject(f"'{name}' must be true or false, not {value!r}")
    return value


def parse_options(caller: str, body: dict[str, Any]) -> RuleOptions:
    copies = body.get("copies")
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
        raise InvalidObject(f"'copies' must be a positive integer, not {copies!r}")
    expression = body.get("rse_expression")
    if not isinstance(expression, str) or not expression:
        raise InvalidObject("'rse_expression' must be a non-empty string")
    if len(expression) > 3000:
        raise InvalidObject("'rse_expression' is longer than 3000 characters")
    grouping_value = body.get("grouping") or "DATASET"
    try:
        grouping = RuleGrouping[str(grouping_value).upper()]
    except KeyError:
        raise InvalidObject(f"Invalid grouping {grouping_value!r}: use ALL, DATASET or "
                            f"NONE") from None
    lifetime = body.get("lifetime")
    if lifetime is not None and (not isinstance(lifetime, int) or isinstance(lifetime, bool)
                                 or lifetime < 0):
        raise InvalidObject(f"'lifetime' must be a non-negative number of seconds, not "
                            f"{lifetime!r}")
    notify_value = body.get("notify")
    if notify_value is None:
        notify = RuleNotification.NO
    elif notify_value in _NOTIFY:
        notify = _NOTIFY[notify_value]
    elif isinstance(notify_value, str) and notify_value.upper() in RuleNotification.__members__:
        notify = RuleNotification[notify_value.upper()]
    else:
        raise InvalidObject(f"Invalid notify {notify_value!r}: use Y, N, C or P")
    priority = body.get("priority", 3)
    if priority is None:
        priority = 3
    if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= 5:
        raise InvalidObject(f"'priority' must be an integer from 1 to 5, not {priority!r}")
    strings = {}
    for key in ("weight", "source_replica_expression", "activity", "comment", "account"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidObject(f"'{key}' must be a string")
        strings[key] = value
    if strings["comment"] is not None and len(strings["comment"]) > 255:
        raise InvalidObject("'comment' is longer than 255 characters")
    return RuleOptions(
        copies=copies, rse_expression=expression, account=strings["account"] or caller,
        grouping=grouping, weight=strings["weight"], lifetime=lifetime,
        locked=_as_bool("locked", body.get("locked")),
        source_replica_expression=strings["source_replica_expression"],
        activity=strings["activity"] or DEFAULT_ACTIVITY, notify=notify,
        purge_replicas=_as_bool("purge_replicas", body.get("purge_replicas")),
        ignore_availability=_as_bool("ignore_availability", body.get("ignore_availability")),
        ignore_account_limit=_as_bool("ignore_account_limit",
                                      body.get("ignore_account_limit")),
        comment=strings["comment"], ask_approval=_as_bool("ask_approval",
                                                          body.get("ask_approval")),
        priority=priority, meta=body.get("meta"),
        split_container=_as_bool("split_container", body.get("split_container")))


def _resolve_for_rule(session: Session, expression: str) -> list[RSE]:
    try:
        return resolve(session, expression)
    except InvalidRSEExpression as exc:
        # Same exception, but rule creation answers 409 where `GET /rses/` answers 400.
        conflict = InvalidRSEExpression(exc.message)
        conflict.status = 409
        raise conflict from None


def add_rules(session: Session, caller: str, dids: Any, options: RuleOptions) -> list[str]:
    if not isinstance(dids, list) or not dids or not all(isinstance(d, dict) for d in dids):
        raise InvalidObject("'dids' must be a non-empty list of {scope, name} objects")
    get_account(session, options.account)
    admin = is_admin(session, caller)
    if options.account != caller and not admin:
        raise AccessDenied(f"Account {caller} can not add a rule for account "
                           f"{options.account}")
    if options.ignore_account_limit and not admin:
        raise AccessDenied(f"Account {caller} can not ignore account limits")
    targets = _resolve_for_rule(session, options.rse_expression)
    if options.source_replica_expression:
        _resolve_for_rule(session, options.source_replica_expression)
    if len(targets) < options.copies:
        raise InsufficientTargetRSEs(
            f"Target RSE set not sufficient for number of copies. ({options.copies} copies "
            f"requested, RSE set size {len(targets)})")
    if any(rse.staging_area for rse in targets) and options.lifetime is None:
        raise StagingAreaRuleRequiresLifetime(
            "Rules on staging-area RSEs need a lifetime")
    weights = _weights(session, targets, options.weight)
    ids = []
    for did in dids:
        scope, name = did.get("scope"), did.get("name")
        if not isinstance(scope, str) or not isinstance(name, str):
            raise InvalidObject("Every DID needs a 'scope' and a 'name'")
        row = get_did(session, scope, name)
        ids.append(_add_rule(session, row, options, targets, weights,
                             bypass_quota=admin_account(session, options) or
                             options.ignore_account_limit))
    return ids


def admin_account(session: Session, options: RuleOptions) -> bool:
    return is_admin(session, options.account)


def _weights(session: Session, targets: list[RSE], weight: str | None) -> dict[str, float]:
    if not weight:
        return {rse.id: 1.0 for rse in targets}
    found = {}
    for rse in targets:
        value = list_attributes(session, rse).get(weight)
        if value is None:
            continue  # RSEs without the weight attribute are excluded, as in Rucio
        try:
            found[rse.id] = float(value)
        except (TypeError, ValueError):
            raise InvalidRuleWeight(f"The weight '{weight}' of RSE '{rse.rse}' is not a "
                                    f"number: {value!r}") from None
    return found


def _groups(session: Session, did: DID, grouping: RuleGrouping) -> list[list[DID]]:
    if did.did_type == DIDType.FILE:
        return [[did]]
    if grouping == RuleGrouping.ALL:
        return [list(iter_files(session, did.scope, did.name))]
    if grouping == RuleGrouping.NONE:
        return [[f] for f in iter_files(session, did.scope, did.name)]
    groups = []
    seen: set[tuple[str, str]] = set()
    for dataset in datasets_of(session, did.scope, did.name):
        files = [f for f in iter_files(session, dataset.scope, dataset.name)
                 if (f.scope, f.name) not in seen]
        seen.update((f.scope, f.name) for f in files)
        groups.append(files)
    return groups


def _add_rule(session: Session, did: DID, options: RuleOptions, targets: list[RSE],
              weights: dict[str, float], bypass_quota: bool) -> str:
    lock_collections(session, did)
    duplicate = session.scalar(select(Rule.id).where(
        Rule.scope == did.scope, Rule.name == did.name, Rule.account == options.account,
        Rule.rse_expression == options.rse_expression, Rule.copies == options.copies))
    if duplicate is not None:
        raise DuplicateRule(f"A rule for '{did.scope}:{did.name}' of account "
                            f"{options.account} on '{options.rse_expression}' with "
                            f"{options.copies} copies already exists: {duplicate}")
    now = utcnow()
    rule = Rule(
        id=uuid.uuid4().hex, account=options.account, scope=did.scope, name=did.name,
        did_type=did.did_type, state=RuleState.REPLICATING,
        rse_expression=options.rse_expression, copies=options.copies,
        expires_at=None if options.lifetime is None else now + timedelta(
            seconds=options.lifetime),
        weight=options.weight, locked=options.locked,
        source_replica_expression=options.source_replica_expression,
        activity=options.activity, grouping=options.grouping, notification=options.notify,
        purge_replicas=options.purge_replicas,
        ignore_availability=options.ignore_availability,
        ignore_account_limit=options.ignore_account_limit, priority=options.priority,
        comments=options.comment, split_container=options.split_container,
        meta=options.meta, subscription_id=options.subscription_id,
        locks_ok_cnt=0, locks_replicating_cnt=0, locks_stuck_cnt=0)
    session.add(rule)
    session.flush()
    if options.ask_approval:
        rule.state = RuleState.WAITING_APPROVAL
        return rule.id
    apply_rule(session, rule, targets, weights, bypass_quota)
    return rule.id


def apply_rule(session: Session, rule: Rule, targets: list[RSE], weights: dict[str, float],
               bypass_quota: bool) -> None:
    """Choose RSEs per group, create locks, COPYING replicas and shared requests."""
    did = get_did(session, rule.scope, rule.name)
    planner = _Planner(session, rule, targets, weights, bypass_quota)
    try:
        for files in _groups(session, did, rule.grouping):
            if files:
                planner.place(files)
    except _REFUSALS:
        # Usage must equal the locks whatever the caller does with the refusal.
        planner.finish()
        raise
    planner.finish()
    _refresh_state(session, rule)


class _Planner:
    """Places groups of files for one rule. Everything is done in bulk (one query or one
    multi-row statement per chunk), since a rule may cover hundreds of thousands of files;
    quota and space are tracked in memory and usage is written once at the end."""

    def __init__(self, session: Session, rule: Rule, targets: list[RSE],
                 weights: dict[str, float], bypass_quota: bool) -> None:
        self.session = session
        self.rule = rule
        self.targets = targets
        self.weights = weights
        self.bypass_quota = bypass_quota
        self.quota: dict[str, float] = {}
        self.space: dict[str, float] = {}
        self.usage: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def _quota(self, rse: RSE) -> float:
        if rse.id not in self.quota:
            self.quota[rse.id] = (float("inf") if self.bypass_quota else
                                  quota.remaining(self.session, self.rule.account, rse))
        return self.quota[rse.id]

    def _space(self, rse: RSE) -> float:
        if rse.id not in self.space:
            limit = rse_limits(self.session, rse).get("MaxSpaceAvailable")
            self.space[rse.id] = float("inf") if limit is None else \
                limit - catalog_usage(self.session, rse.id)[0]
        return self.space[rse.id]

    def place(self, files: list[DID], preferred: Collection[str] = (),
              copies: int | None = None, exclude: Collection[str] = ()) -> None:
        """Lock `files` on `copies` (default: the rule's) qualifying RSEs. `preferred` RSEs
        (those a rule already uses for the files' dataset) come first when they qualify,
        as with the preferred RSEs of Rucio's RSE selector; otherwise the choice falls to
        the other ones. `exclude`d RSEs are never chosen (the repairer's blocklist: RSEs
        that already hold a lock of the rule on these files)."""
        wanted = self.rule.copies if copies is None else copies
        size = sum(f.bytes or 0 for f in files)
        reasons: set[str] = set()
        candidates = []
        for rse in self.targets:
            if rse.id in exclude:
                reasons.add("excluded")
                continue
            if rse.id not in self.weights:
                reasons.add("weight")
            elif not self.rule.ignore_availability and not rse.availability_write:
                reasons.add("availability")
            elif self._quota(rse) < size:
                reasons.add("quota")
            elif self._space(rse) < size:
                reasons.add("space")
            else:
                candidates.append(rse)
        if len(candidates) < wanted:
            self._refuse(reasons, len(candidates), wanted)
        present = self._present(files, candidates)
        chosen: list[RSE] = []
        pool = list(candidates)
        def rank(rse: RSE) -> tuple[bool, int]:
            return rse.id in preferred, present.get(rse.id, 0)

        while len(chosen) < wanted:
            # Prefer RSEs already in use, then those that already hold most of the data;
            # among equals, weighted random.
            best = max(rank(r) for r in pool)
            tier = [r for r in pool if rank(r) == best]
            pick = random.choices(tier, weights=[self.weights[r.id] or 1e-9 for r in tier])[0]
            chosen.append(pick)
            pool.remove(pick)
        for rse in chosen:
            self.lock_many(files, rse)

    def _refuse(self, reasons: set[str], found: int, wanted: int) -> None:
        message = (f"The rule on '{self.rule.scope}:{self.rule.name}' needs "
                   f"{wanted} RSE(s) but only {found} of "
                   f"'{self.rule.rse_expression}' qualify")
        if "quota" in reasons:
            raise InsufficientAccountLimit(
                f"{message}: account {self.rule.account} lacks quota (no limit means zero)")
        if "space" in reasons:
            raise RSEOverQuota(f"{message}: not enough space (MaxSpaceAvailable)")
        if "availability" in reasons:
            why = "not writable"
        elif "weight" in reasons:
            why = "lacking the weight attribute"
        else:
            why = "already holding a copy for the rule, or where the copy is stuck"
        raise InsufficientTargetRSEs(f"{message}: the others are {why}")

    def _present(self, files: list[DID], candidates: list[RSE]) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        ids = [r.id for r in candidates]
        keys = [(f.scope, f.name) for f in files]
        for i in range(0, len(keys), CHUNK):
            for rse_id, bytes_ in self.session.execute(
                    select(Replica.rse_id, func.sum(Replica.bytes)).where(
                        keys_in(Replica.scope, Replica.name, keys[i:i + CHUNK]),
                        Replica.rse_id.in_(ids),
                        Replica.state == ReplicaState.AVAILABLE).group_by(Replica.rse_id)):
                counts[rse_id] += int(bytes_ or 0) + 1
        return counts

    def lock_many(self, files: list[DID], rse: RSE) -> None:
        """One lock per file on `rse`: OK where the replica is AVAILABLE, otherwise
        REPLICATING with a COPYING replica and a (shared) transfer request."""
        session, rule, now = self.session, self.rule, utcnow()
        for i in range(0, len(files), CHUNK):
            chunk = files[i:i + CHUNK]
            keys = [(f.scope, f.name) for f in chunk]
            states = dict(((s, n), state) for s, n, state in session.execute(
                select(Replica.scope, Replica.name, Replica.state).where(
                    Replica.rse_id == rse.id, keys_in(Replica.scope, Replica.name, keys))))
            new_replicas, locks, pending = [], [], []
            for file in chunk:
                key = (file.scope, file.name)
                ok = states.get(key) == ReplicaState.AVAILABLE
                if key not in states:
                    new_replicas.append({
                        "rse_id": rse.id, "scope": file.scope, "name": file.name,
                        "bytes": file.bytes or 0, "md5": file.md5, "adler32": file.adler32,
                        "path": deterministic_path(file.scope, file.name)
                        if rse.deterministic else None, "state": ReplicaState.COPYING,
                        "lock_cnt": 0, "tombstone": None, "accessed_at": None,
                        "created_at": now, "updated_at": now})
                locks.append({"rule_id": rule.id, "scope": file.scope, "name": file.name,
                              "rse_id": rse.id, "account": rule.account,
                              "bytes": file.bytes or 0,
                              "state": LockState.OK if ok else LockState.REPLICATING,
                              "repair_cnt": 0, "created_at": now, "updated_at": now})
                if not ok:
                    pending.append(file)
            if new_replicas:
                bulk_insert(session, Replica.__table__, new_replicas)
            # Every replica of the chunk gains a lock; a lock protects it from deletion.
            session.execute(
                update(Replica).where(Replica.rse_id == rse.id,
                                      keys_in(Replica.scope, Replica.name, keys))
                .values(lock_cnt=Replica.lock_cnt + 1, tombstone=None, updated_at=now)
                .execution_options(synchronize_session=False))
            if pending:
                pending_keys = [(f.scope, f.name) for f in pending]
                session.execute(
                    update(Replica).where(Replica.rse_id == rse.id,
                                          keys_in(Replica.scope, Replica.name, pending_keys),
                                          Replica.state != ReplicaState.COPYING)
                    .values(state=ReplicaState.COPYING)
                    .execution_options(synchronize_session=False))
                self._requests(pending, rse, now)
            bulk_insert(session, Lock.__table__, locks)
            ok_count = len(chunk) - len(pending)
            rule.locks_ok_cnt += ok_count
            rule.locks_replicating_cnt += len(pending)
            size = sum(f.bytes or 0 for f in chunk)
            self.usage[rse.id][0] += len(chunk)
            self.usage[rse.id][1] += size
            if rse.id in self.quota:
                self.quota[rse.id] -= size
            if rse.id in self.space:
                self.space[rse.id] -= sum(f.bytes or 0 for f in chunk
                                          if (f.scope, f.name) not in states)

    def _requests(self, files: list[DID], rse: RSE, now: datetime) -> None:
        session, rule = self.session, self.rule
        keys = [(f.scope, f.name) for f in files]
        known = dict(((s, n), (rid, state)) for s, n, rid, state in session.execute(
            select(Request.scope, Request.name, Request.id, Request.state).where(
                Request.dest_rse_id == rse.id, keys_in(Request.scope, Request.name, keys))))
        revive = [rid for rid, state in known.values() if state not in _ACTIVE_REQUEST_STATES]
        if revive:
            session.execute(update(Request).where(Request.id.in_(revive))
                            .values(state=RequestState.QUEUED, rule_id=rule.id, updated_at=now)
                            .execution_options(synchronize_session=False))
        rows = [{"id": uuid.uuid4().hex, "request_type": RequestType.TRANSFER,
                 "scope": f.scope, "name": f.name, "dest_rse_id": rse.id,
                 "source_rse_id": None, "state": RequestState.QUEUED, "rule_id": rule.id,
                 "activity": rule.activity, "bytes": f.bytes, "md5": f.md5,
                 "adler32": f.adler32, "priority": rule.priority, "retry_count": 0,
                 "err_msg": None, "external_id": None, "external_host": None,
                 "attributes": {"source_replica_expression": rule.source_replica_expression},
                 "submitted_at": None, "created_at": now, "updated_at": now}
                for f in files if (f.scope, f.name) not in known]
        if rows:
            bulk_insert(session, Request.__table__, rows)

    def finish(self) -> None:
        for rse_id, (count, size) in self.usage.items():
            quota.add_usage(self.session, self.rule.account, rse_id, count, size)
        self.usage.clear()


_REFUSALS = (InsufficientTargetRSEs, InsufficientAccountLimit, RSEOverQuota,
             InvalidRSEExpression, InvalidRuleWeight)


def _refresh_state(session: Session, rule: Rule, recheck: bool = False) -> None:
    """The rule's state from its lock counters. A rule is STUCK while it has stuck locks or
    files it could not place: that state is what brings the judge-repairer to it (and
    tells the user). Whether files are unplaced costs a walk of the rule's content,
    so it is asked only of a rule that is STUCK now, or when `recheck` (a user asking for
    the state to be re-evaluated)."""
    if rule.state in (RuleState.SUSPENDED, RuleState.WAITING_APPROVAL, RuleState.INJECT):
        return
    if rule.locks_stuck_cnt or ((rule.state == RuleState.STUCK or recheck)
                                and _has_unplaced_files(session, rule)):
        state = RuleState.STUCK
    elif rule.locks_replicating_cnt:
        state = RuleState.REPLICATING
    else:
        state = RuleState.OK
    if state == RuleState.STUCK:
        if rule.stuck_at is None:
            rule.stuck_at = utcnow()
    else:
        # The error and the time describe why and since when the rule is stuck.
        rule.error = None
        rule.stuck_at = None
    if state == RuleState.OK and rule.state != RuleState.OK:
        # Only on the transition: the lookup is paid once per rule reaching OK.
        _release_parents(session, rule)
    rule.state = state


def _has_unplaced_files(session: Session, rule: Rule) -> bool:
    """Fewer locks than `copies` per file under the rule's DID (one query)."""
    if rule.did_type == DIDType.FILE:
        files = 1
    else:
        # Seeded from the DID's own row, as in _ancestry, for PostgreSQL's collations.
        down = select(DID.scope, DID.name).where(
            DID.scope == rule.scope, DID.name == rule.name).cte("down", recursive=True)
        down = down.union(select(Attachment.child_scope, Attachment.child_name).where(
            Attachment.scope == down.c.scope, Attachment.name == down.c.name,
            Attachment.child_type != DIDType.FILE))
        distinct_files = select(Attachment.child_scope, Attachment.child_name).join(
            down, and_(Attachment.scope == down.c.scope, Attachment.name == down.c.name)
        ).where(Attachment.child_type == DIDType.FILE).distinct().subquery()
        files = int(session.scalar(select(func.count()).select_from(distinct_files)) or 0)
    locks = rule.locks_ok_cnt + rule.locks_replicating_cnt + rule.locks_stuck_cnt
    return locks < files * rule.copies


# --- reading ---------------------------------------------------------------------------


def get_rule(session: Session, rule_id: str) -> Rule:
    row = session.get(Rule, rule_id) if isinstance(rule_id, str) and len(rule_id) <= 64 \
        else None
    if row is None:
        raise RuleNotFound(f"No replication rule found with the id {rule_id}")
    return row


def rule_dict(row: Rule) -> dict[str, Any]:
    return {
        "id": row.id, "subscription_id": row.subscription_id, "account": row.account,
        "scope": row.scope, "name": row.name, "did_type": row.did_type.value,
        "state": row.state.value, "error": row.error, "rse_expression": row.rse_expression,
        "copies": row.copies, "expires_at": rfc1123(row.expires_at), "weight": row.weight,
        "locked": row.locked, "locks_ok_cnt": row.locks_ok_cnt,
        "locks_replicating_cnt": row.locks_replicating_cnt,
        "locks_stuck_cnt": row.locks_stuck_cnt,
        "source_replica_expression": row.source_replica_expression,
        "activity": row.activity, "grouping": row.grouping.value,
        "notification": row.notification.value, "stuck_at": rfc1123(row.stuck_at),
        "purge_replicas": row.purge_replicas,
        "ignore_availability": row.ignore_availability,
        "ignore_account_limit": row.ignore_account_limit, "priority": row.priority,
        "comments": row.comments, "child_rule_id": row.child_rule_id,
        "eol_at": rfc1123(row.eol_at), "split_container": row.split_container,
        "meta": row.meta, "created_at": rfc1123(row.created_at),
        "updated_at": rfc1123(row.updated_at),
    }


_FILTERS = {"scope", "name", "account", "state", "rse_expression", "did_type", "activity",
            "id", "grouping", "subscription_id", "locked", "copies"}


def list_rules(session: Session, filters: dict[str, str]) -> list[dict[str, Any]]:
    query = select(Rule)
    value: Any
    for key, value in filters.items():
        if key not in _FILTERS:
            raise InvalidObject(f"Unknown rule filter {key!r}")
        column = getattr(Rule, key)
        if key == "state":
            from stashflow.placement.models import RuleState as States

            try:
                value = States[value] if value in States.__members__ else \
                    {s.value[0]: s for s in States}[value]
            except KeyError:
                raise InvalidObject(f"Invalid rule state {value!r}") from None
        elif key == "did_type":
            value = DIDType[str(value).upper()] if str(value).upper() in \
                DIDType.__members__ else value
        elif key == "grouping":
            value = RuleGrouping[str(value).upper()] if str(value).upper() in \
                RuleGrouping.__members__ else value
        elif key == "locked":
            value = str(value).lower() in ("true", "1")
        elif key == "copies":
            try:
                value = int(value)
            except ValueError:
                raise InvalidObject(f"Invalid copies {value!r}") from None
        query = query.where(column == value)
    return _with_bytes(session, list(session.scalars(query.order_by(Rule.created_at,
                                                                    Rule.id))))


def _with_bytes(session: Session, rows: list[Rule]) -> list[dict[str, Any]]:
    """Rule dicts plus `bytes`, which `rule list` prints as SIZE: the size of the rule's
    DID, as Rucio joins it in (core/rule.py list_rules), not what its locks cover."""
    sizes: dict[tuple[str, str], int | None] = {}
    keys = sorted({(r.scope, r.name) for r in rows})
    for i in range(0, len(keys), CHUNK):
        sizes.update(((scope, name), size) for scope, name, size in session.execute(
            select(DID.scope, DID.name, DID.bytes)
            .where(keys_in(DID.scope, DID.name, keys[i:i + CHUNK]))).all())
    return [{**rule_dict(r), "bytes": sizes.get((r.scope, r.name))} for r in rows]


def did_rules(session: Session, scope: str, name: str) -> list[dict[str, Any]]:
    get_did(session, scope, name)
    return _with_bytes(session, list(session.scalars(
        select(Rule).where(Rule.scope == scope, Rule.name == name)
        .order_by(Rule.created_at, Rule.id))))


def associated_rules_for_file(session: Session, scope: str, name: str) -> list[dict[str, Any]]:
    """Rucio's list_associated_rules_for_file: the rules holding a lock on the file."""
    get_did(session, scope, name)
    held = select(Lock.rule_id).where(Lock.scope == scope, Lock.name == name)
    return _with_bytes(session, list(session.scalars(
        select(Rule).where(Rule.id.in_(held)).order_by(Rule.created_at, Rule.id))))


def dataset_locks(session: Session, scope: str, name: str) -> list[dict[str, Any]]:
    """Rucio's get_dataset_locks. Rucio stores a dataset lock per (rule, RSE) for rules
    grouped by DATASET or ALL on the dataset or on a container above it; we keep only
    file locks, so the dataset locks are derived from them: the RSEs where such a rule
    locks the dataset's files, STUCK if any of those locks is, else REPLICATING if any
    is, else OK."""
    did = session.get(DID, (scope, name))
    if did is None or did.did_type != DIDType.DATASET:
        return []
    covering = {(scope, name)}
    frontier = [(scope, name)]
    while frontier:  # the containers above the dataset, however deep
        parents = set(session.execute(
            select(Attachment.scope, Attachment.name)
            .where(keys_in(Attachment.child_scope, Attachment.child_name, frontier))).all())
        frontier = [tuple(p) for p in parents if tuple(p) not in covering]
        covering.update(frontier)
    grouped = list(session.scalars(select(Rule).where(
        keys_in(Rule.scope, Rule.name, sorted(covering)),
        Rule.grouping != RuleGrouping.NONE)))
    if not grouped:
        return []
    by_id = {rule.id: rule for rule in grouped}
    in_dataset = exists().where(Attachment.scope == scope, Attachment.name == name,
                                Attachment.child_scope == Lock.scope,
                                Attachment.child_name == Lock.name)
    counts: dict[tuple[str, str, str], set[LockState]] = defaultdict(set)
    for rule_id, rse_id, rse, state in session.execute(
            select(Lock.rule_id, Lock.rse_id, RSE.rse, Lock.state).distinct()
            .join(RSE, RSE.id == Lock.rse_id)
            .where(Lock.rule_id.in_(list(by_id)), in_dataset)):
        counts[(rule_id, rse_id, rse)].add(state)
    out = []
    for (rule_id, rse_id, rse), states in sorted(counts.items(), key=lambda i: i[0]):
        state = next(s for s in (LockState.STUCK, LockState.REPLICATING, LockState.OK)
                     if s in states)
        out.append({"rse_id": rse_id, "rse": rse, "scope": scope, "name": name,
                    "rule_id": rule_id, "account": by_id[rule_id].account,
                    "state": state.value, "length": did.length, "bytes": did.bytes,
                    "accessed_at": None})
    return out


def list_locks(session: Session, rule_id: str) -> list[dict[str, Any]]:
    get_rule(session, rule_id)
    rows = session.execute(select(Lock, RSE.rse).join(RSE, RSE.id == Lock.rse_id)
                           .where(Lock.rule_id == rule_id)
                           .order_by(Lock.scope, Lock.name, RSE.rse)).all()
    return [{"scope": lock.scope, "name": lock.name, "rse_id": lock.rse_id, "rse": rse,
             "state": lock.state.value, "rule_id": lock.rule_id, "account": lock.account,
             "bytes": lock.bytes, "repair_cnt": lock.repair_cnt,
             "created_at": rfc1123(lock.created_at), "updated_at": rfc1123(lock.updated_at)}
            for lock, rse in rows]


def examine(session: Session, rule_id: str) -> dict[str, Any]:
    rule = get_rule(session, rule_id)
    if rule.state == RuleState.OK:
        return {"rule_error": "This replication rule is OK", "transfers": []}
    transfers = []
    stuck = session.execute(select(Lock, RSE.rse).join(RSE, RSE.id == Lock.rse_id).where(
        Lock.rule_id == rule_id, Lock.state == LockState.STUCK)).all()
    for lock, rse in stuck:
        request = session.scalar(select(Request).where(
            Request.scope == lock.scope, Request.name == lock.name,
            Request.dest_rse_id == lock.rse_id))
        sources = session.execute(select(RSE.rse, RSE.availability_read).join(
            Replica, Replica.rse_id == RSE.id).where(
            Replica.scope == lock.scope, Replica.name == lock.name,
            Replica.state == ReplicaState.AVAILABLE)).all()
        transfers.append({
            "scope": lock.scope, "name": lock.name, "rse": rse, "rse_id": lock.rse_id,
            "attempts": request.retry_count if request else None,
            "last_error": request.err_msg if request else None,
            "last_source": None, "sources": [list(s) for s in sources],
            "last_time": rfc1123(request.updated_at) if request else None})
    error = rule.error or f"This replication rule is {rule.state.value}"
    return {"rule_error": error, "transfers": transfers}


# --- changing and removing ---------------------------------------------------------------


def _check_owner(session: Session, caller: str, rule: Rule, action: str) -> None:
    if rule.account != caller and not is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not {action} rule {rule.id} of account "
                           f"{rule.account}")


def delete_rule(session: Session, caller: str, rule_id: str,
                purge_replicas: bool | None = None) -> None:
    """Soft deletion, as in Rucio: the rule expires within the hour and the cleaner removes
    it; `rule show` keeps working meanwhile."""
    rule = get_rule(session, rule_id)
    _check_owner(session, caller, rule, "delete")
    if rule.locked:
        raise UnsupportedOperation(f"The replication rule {rule.id} is locked and has to be "
                                   f"unlocked before it can be deleted.")
    if rule.child_rule_id is not None:
        raise UnsupportedOperation(f"The replication rule {rule.id} has a child rule and "
                                   f"thus cannot be deleted.")
    if purge_replicas is not None:
        rule.purge_replicas = purge_replicas
    deadline = utcnow() + SOFT_DELETE_DELAY
    if rule.expires_at is None or rule.expires_at > deadline:
        rule.expires_at = deadline


_UPDATABLE = {"lifetime", "locked", "comment", "activity", "priority", "purge_replicas",
              "approve", "account", "state", "source_replica_expression", "meta",
              "cancel_requests", "boost_rule", "child_rule_id"}
# How far `boost_rule` moves a rule's (and its stuck locks') updated_at back, as in Rucio,
# whose judge-repairer leaves a rule alone for a while (30 min) after its last update.
BOOST = timedelta(days=1)


def update_rule(session: Session, caller: str, rule_id: str, options: Any) -> None:
    if not isinstance(options, dict):
        raise InvalidObject("'options' must be an object")
    unknown = set(options) - _UPDATABLE
    if unknown:
        raise InvalidObject(f"Rule options that cannot be updated: {', '.join(sorted(unknown))}")
    rule = get_rule(session, rule_id)
    _check_owner(session, caller, rule, "update")
    # As in Rucio, cancel_requests only qualifies a state change; alone it does nothing.
    cancel = _as_bool("cancel_requests", options.get("cancel_requests", False))
    for key, value in options.items():
        if key == "lifetime":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise InvalidObject("'lifetime' must be a non-negative number of seconds")
            rule.expires_at = None if value is None else utcnow() + timedelta(seconds=value)
        elif key in ("locked", "purge_replicas"):
            setattr(rule, key, _as_bool(key, value))
        elif key == "comment":
            rule.comments = None if value is None else str(value)[:255]
        elif key == "activity":
            rule.activity = str(value)
        elif key == "source_replica_expression":
            if value is not None:
                _resolve_for_rule(session, str(value))
            rule.source_replica_expression = value
        elif key == "meta":
            rule.meta = value
        elif key == "priority":
            if not isinstance(value, int) or not 1 <= value <= 5:
                raise InvalidObject("'priority' must be an integer from 1 to 5")
            rule.priority = value
        elif key == "account":
            if not is_admin(session, caller):
                raise AccessDenied(f"Account {caller} can not move rules between accounts")
            get_account(session, str(value))
            _move_usage(session, rule, str(value))
        elif key == "state":
            _set_state(session, rule, value, cancel)
        elif key == "approve":
            _approve(session, caller, rule, _as_bool("approve", value))
        elif key == "child_rule_id":
            _set_child(session, rule, value)
    # After the loop, as in Rucio: boosting a rule that this same update made STUCK must
    # move the new lock times too.
    if "boost_rule" in options and _as_bool("boost_rule", options["boost_rule"]):
        _boost(session, rule)


def _set_state(session: Session, rule: Rule, value: Any, cancel: bool) -> None:
    """Rucio's update_rule(state=...): SUSPENDED suspends; STUCK marks the rule's
    REPLICATING locks STUCK so that the judge-repairer retries them; with `cancel` every
    REPLICATING lock on those replicas (whichever rule holds it) is STUCK, its rule too,
    the transfer requests are dropped and the copies are UNAVAILABLE. REPLICATING and OK,
    which Rucio accepts without acting on them, re-evaluate the state from the locks."""
    wanted = str(value).upper()
    if wanted not in ("SUSPENDED", "STUCK", "REPLICATING", "OK"):
        raise InvalidReplicationRule(f"A rule cannot be set to state {value!r}")
    if cancel:
        _cancel_requests(session, rule)
    if wanted == "SUSPENDED":
        rule.state = RuleState.SUSPENDED
    elif wanted == "STUCK":
        by_rse: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for rse_id, scope, name in session.execute(select(
                Lock.rse_id, Lock.scope, Lock.name).where(
                Lock.rule_id == rule.id, Lock.state == LockState.REPLICATING)):
            by_rse[rse_id].append((scope, name))
        now = utcnow()
        for rse_id, keys in by_rse.items():
            for i in range(0, len(keys), CHUNK):
                session.execute(update(Lock).where(
                    Lock.rule_id == rule.id, Lock.rse_id == rse_id,
                    keys_in(Lock.scope, Lock.name, keys[i:i + CHUNK]),
                    Lock.state == LockState.REPLICATING)
                    .values(state=LockState.STUCK, updated_at=now)
                    .execution_options(synchronize_session=False))
            _count(rule, LockState.REPLICATING, -len(keys))
            _count(rule, LockState.STUCK, len(keys))
        # As in Rucio the rule is STUCK even with nothing left to replicate: the
        # judge-repairer re-evaluates it on its next pass (so does asking for
        # REPLICATING or OK).
        rule.state = RuleState.STUCK
        rule.stuck_at = now
    else:
        if rule.state == RuleState.SUSPENDED:
            rule.state = RuleState.REPLICATING
            # A rule taken up again gets its two weeks again, as a rule set STUCK does
            # (otherwise the repairer would suspend it again at once).
            rule.stuck_at = None
        _refresh_state(session, rule, recheck=True)


def _cancel_requests(session: Session, rule: Rule) -> None:
    """Rucio's cancel_requests: for each REPLICATING lock of the rule, the copy being made
    is given up. Other rules waiting for the same copy are STUCK as well, since the
    transfer they were waiting for is gone."""
    by_rse: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for rse_id, scope, name in session.execute(select(Lock.rse_id, Lock.scope, Lock.name).where(
            Lock.rule_id == rule.id, Lock.state == LockState.REPLICATING)):
        by_rse[rse_id].append((scope, name))
    now = utcnow()
    for rse_id, keys in by_rse.items():
        locks, holders = _locks_on(session, rse_id, keys, (LockState.REPLICATING,))
        _set_lock_states(session, rse_id, locks, LockState.STUCK)
        for lock in locks:
            holder = holders[lock.rule_id]
            _count(holder, LockState.REPLICATING, -1)
            _count(holder, LockState.STUCK, 1)
            if holder.state != RuleState.SUSPENDED:
                holder.state = RuleState.STUCK
                if holder.stuck_at is None:
                    holder.stuck_at = now
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i:i + CHUNK]
            session.execute(delete(Request).where(
                Request.dest_rse_id == rse_id, Request.request_type == RequestType.TRANSFER,
                keys_in(Request.scope, Request.name, chunk)))
            # An AVAILABLE copy would have made the lock OK already; the guard keeps a
            # racing arrival from being undone.
            session.execute(update(Replica).where(
                Replica.rse_id == rse_id, keys_in(Replica.scope, Replica.name, chunk),
                Replica.state != ReplicaState.AVAILABLE)
                .values(state=ReplicaState.UNAVAILABLE, updated_at=now)
                .execution_options(synchronize_session=False))


def _set_child(session: Session, rule: Rule, child_id: Any) -> None:
    """Rucio's parent/child relation (rule moves): the parent is not removed while its
    child is not OK. `None` dissolves the relation and the parent's expiry."""
    if child_id is None:
        if not rule.child_rule_id:
            raise InputValidationError("Cannot detach child when no such relationship exists")
        rule.child_rule_id = None
        rule.expires_at = None
        return
    child = get_rule(session, str(child_id))
    if (rule.scope, rule.name) != (child.scope, child.name):
        raise InputValidationError("Parent and child rule must be set on the same dataset.")
    if child.id == rule.id:
        raise InputValidationError("Self-referencing parent/child-relationship.")
    # As in Rucio, a child that is OK already releases its parent at once, so the
    # relation is not recorded at all.
    if child.state != RuleState.OK:
        rule.child_rule_id = child.id


def _boost(session: Session, rule: Rule) -> None:
    """Rucio's boost_rule: date the rule and its stuck locks back so that a repairer,
    which waits after a rule's last update, takes it on its next round. Our repairer does
    not wait, but it takes the least recently updated STUCK rules first, so a boosted rule
    comes before those updated since."""
    # Rucio subtracts a day from each time; a common "a day ago" is what the repairer
    # sees the same way, and needs no date arithmetic in SQL (SQLite has none for it).
    then = utcnow() - BOOST
    session.execute(update(Lock).where(Lock.rule_id == rule.id, Lock.state == LockState.STUCK)
                    .values(updated_at=then).execution_options(synchronize_session=False))
    rule.updated_at = then


def _release_parents(session: Session, child: Rule, drop_expiry: bool = False) -> None:
    """The child became OK (or, with `drop_expiry`, went away): its parents are released,
    as in Rucio's release_parent_rule; a released parent that has expired is then removed
    by the cleaner like any other."""
    values: dict[str, Any] = {"child_rule_id": None}
    if drop_expiry:
        values["expires_at"] = None
    session.execute(update(Rule).where(Rule.child_rule_id == child.id).values(**values)
                    .execution_options(synchronize_session="fetch"))


def _move_usage(session: Session, rule: Rule, account: str) -> None:
    for lock in session.scalars(select(Lock).where(Lock.rule_id == rule.id)):
        quota.add_usage(session, rule.account, lock.rse_id, -1, -lock.bytes)
        quota.add_usage(session, account, lock.rse_id, 1, lock.bytes)
        lock.account = account
    rule.account = account


def _approve(session: Session, caller: str, rule: Rule, approve: bool) -> None:
    if not is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not approve rules")
    if rule.state != RuleState.WAITING_APPROVAL:
        raise InvalidReplicationRule(f"Rule {rule.id} is not waiting for approval")
    if not approve:
        session.delete(rule)
        return
    targets = _resolve_for_rule(session, rule.rse_expression)
    rule.state = RuleState.REPLICATING
    apply_rule(session, rule, targets, _weights(session, targets, rule.weight),
               bypass_quota=True)


def clean_expired(session: Session, now: datetime | None = None, limit: int = 1000) -> int:
    """The judge-cleaner: remove expired, unlocked rules with their locks; replicas whose
    last lock goes get a tombstone (epoch = delete now) so that the reaper can act."""
    now = now or utcnow()
    # SKIP LOCKED: several cleaners (or a cleaner and a user request) share the work
    # instead of waiting for each other.
    rules = list(session.scalars(select(Rule).where(
        Rule.expires_at.is_not(None), Rule.expires_at < now, Rule.locked.is_(False),
        # A parent stays until its child is OK (Rucio's get_expired_rules).
        Rule.child_rule_id.is_(None))
        .order_by(Rule.expires_at).limit(limit)
        .with_for_update(skip_locked=True, key_share=True)))
    for rule in rules:
        remove_rule_now(session, rule)
    return len(rules)


def remove_rule_now(session: Session, rule: Rule) -> None:
    release_locks(session, rule, None)
    # As in Rucio, a parent whose child goes keeps its data: no expiry, no child.
    _release_parents(session, rule, drop_expiry=True)
    session.delete(rule)
    session.flush()


def release_locks(session: Session, rule: Rule, files: list[tuple[str, str]] | None,
                  on_rse: str | None = None) -> None:
    """Drop the rule's locks (on `files`, or all; on the RSE `on_rse` only, if given): rule
    counters, replica lock counts and tombstones, usage, and transfer requests that
    nothing needs any more."""
    query = select(Lock.scope, Lock.name, Lock.rse_id, Lock.state, Lock.bytes, Lock.account)\
        .where(Lock.rule_id == rule.id)
    if on_rse is not None:
        query = query.where(Lock.rse_id == on_rse)
    locks = []
    if files is None:
        locks = list(session.execute(query))
    else:
        for i in range(0, len(files), CHUNK):
            locks.extend(session.execute(query.where(
                keys_in(Lock.scope, Lock.name, files[i:i + CHUNK]))))
    if not locks:
        return
    session.flush()
    by_rse: dict[str, list[Any]] = defaultdict(list)
    usage: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for lock in locks:
        by_rse[lock.rse_id].append(lock)
        usage[(lock.account, lock.rse_id)][0] -= 1
        usage[(lock.account, lock.rse_id)][1] -= lock.bytes
        if lock.state == LockState.OK:
            rule.locks_ok_cnt -= 1
        elif lock.state == LockState.REPLICATING:
            rule.locks_replicating_cnt -= 1
        else:
            rule.locks_stuck_cnt -= 1
    now = utcnow()
    for rse_id, rse_locks in by_rse.items():
        for i in range(0, len(rse_locks), CHUNK):
            chunk = rse_locks[i:i + CHUNK]
            keys = [(lock.scope, lock.name) for lock in chunk]
            unfinished = {(lock.scope, lock.name) for lock in chunk
                          if lock.state != LockState.OK}
            session.execute(delete(Lock).where(
                Lock.rule_id == rule.id, Lock.rse_id == rse_id,
                keys_in(Lock.scope, Lock.name, keys)))
            session.execute(
                update(Replica).where(Replica.rse_id == rse_id,
                                      keys_in(Replica.scope, Replica.name, keys),
                                      Replica.lock_cnt > 0)
                .values(lock_cnt=Replica.lock_cnt - 1, updated_at=now)
                .execution_options(synchronize_session=False))
            _tombstone_unlocked(session, rule, rse_id, keys, unfinished)
            _drop_unneeded_requests(session, rse_id, sorted(unfinished))
    for (account, rse_id), (count, size) in usage.items():
        quota.add_usage(session, account, rse_id, count, size)


def _tombstone_unlocked(session: Session, rule: Rule, rse_id: str,
                        keys: list[tuple[str, str]], unfinished: set[tuple[str, str]]) -> None:
    # The epoch means "delete now": purged rules, and copies that never completed.
    # Otherwise the last access (or creation) time: LRU order for the reaper.
    rows = session.execute(select(Replica.scope, Replica.name, Replica.state).where(
        Replica.rse_id == rse_id, Replica.lock_cnt == 0,
        keys_in(Replica.scope, Replica.name, keys))).all()
    dead = [(s, n) for s, n, state in rows
            if rule.purge_replicas or (s, n) in unfinished or state != ReplicaState.AVAILABLE]
    dead_set = set(dead)
    idle = [(s, n) for s, n, _state in rows if (s, n) not in dead_set]
    for chosen, value in ((dead, EPOCH),
                          (idle, func.coalesce(Replica.accessed_at, Replica.created_at))):
        if chosen:
            session.execute(
                update(Replica).where(Replica.rse_id == rse_id,
                                      keys_in(Replica.scope, Replica.name, chosen))
                .values(tombstone=value).execution_options(synchronize_session=False))


def _drop_unneeded_requests(session: Session, rse_id: str,
                            keys: list[tuple[str, str]]) -> None:
    if not keys:
        return
    needed = set(session.execute(select(Lock.scope, Lock.name).where(
        Lock.rse_id == rse_id, keys_in(Lock.scope, Lock.name, keys))).all())
    orphans = [key for key in keys if key not in needed]
    if orphans:
        session.execute(delete(Request).where(
            Request.dest_rse_id == rse_id, keys_in(Request.scope, Request.name, orphans),
            Request.state.in_(_ACTIVE_REQUEST_STATES)))


# --- replica states: what Rucio's conveyor-finisher does through update_replicas_states ---


def _staging_required(session: Session, rse_id: str) -> bool:
    rse = session.get(RSE, rse_id)
    value = None if rse is None else list_attributes(session, rse).get("staging_required")
    return value is True or str(value).lower() in ("true", "1")


def _locks_on(session: Session, rse_id: str, keys: list[tuple[str, str]],
              states: tuple[LockState, ...]) -> tuple[list[Any], dict[str, Rule]]:
    """(rule_id, scope, name, state) of the locks in `states` on these replicas, and their
    rules, row-locked first and so read afresh. Rules are locked in the order
    covering_rules uses, so that this and an attachment cannot deadlock."""
    found: list[Any] = []
    query = select(Lock.rule_id, Lock.scope, Lock.name, Lock.state).where(
        Lock.rse_id == rse_id, Lock.state.in_(states))
    for i in range(0, len(keys), CHUNK):
        found.extend(session.execute(query.where(
            keys_in(Lock.scope, Lock.name, keys[i:i + CHUNK]))).all())
    rule_ids = sorted({lock.rule_id for lock in found})
    if not rule_ids:
        return [], {}
    rules: dict[str, Rule] = {}
    for i in range(0, len(rule_ids), CHUNK):
        rules.update((rule.id, rule) for rule in session.scalars(
            select(Rule).where(Rule.id.in_(rule_ids[i:i + CHUNK]))
            .order_by(Rule.created_at, Rule.id).with_for_update(key_share=True)
            .execution_options(populate_existing=True)))
    # Read again under the rule locks: a concurrent state change may have moved some.
    found = []
    for i in range(0, len(keys), CHUNK):
        found.extend(session.execute(query.where(
            keys_in(Lock.scope, Lock.name, keys[i:i + CHUNK]))
            .with_for_update(key_share=True)).all())
    return [lock for lock in found if lock.rule_id in rules], rules


def _set_lock_states(session: Session, rse_id: str, locks: list[Any],
                     state: LockState) -> None:
    by_rule: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for lock in locks:
        by_rule[lock.rule_id].append((lock.scope, lock.name))
    now = utcnow()
    for rule_id, keys in by_rule.items():
        for i in range(0, len(keys), CHUNK):
            session.execute(update(Lock).where(
                Lock.rule_id == rule_id, Lock.rse_id == rse_id,
                keys_in(Lock.scope, Lock.name, keys[i:i + CHUNK]))
                .values(state=state, updated_at=now)
                .execution_options(synchronize_session=False))


def _count(rule: Rule, state: LockState, delta: int) -> None:
    if state == LockState.OK:
        rule.locks_ok_cnt += delta
    elif state == LockState.REPLICATING:
        rule.locks_replicating_cnt += delta
    else:
        rule.locks_stuck_cnt += delta


def replicas_available(session: Session, rse_id: str, keys: list[tuple[str, str]]) -> None:
    """These replicas on `rse_id` became AVAILABLE (Rucio's successful_transfer): every
    lock on them is OK, the rules' counters and states follow, and the transfers that
    were bringing them there are DONE."""
    if not keys:
        return
    locks, rules = _locks_on(session, rse_id, keys, (LockState.REPLICATING, LockState.STUCK))
    _set_lock_states(session, rse_id, locks, LockState.OK)
    changed: dict[str, Rule] = {}
    stuck_before: dict[str, int] = {}
    for lock in locks:
        rule = rules[lock.rule_id]
        stuck_before.setdefault(rule.id, rule.locks_stuck_cnt)
        _count(rule, lock.state, -1)
        _count(rule, LockState.OK, 1)
        changed[rule.id] = rule
    for rule in changed.values():
        # A rule STUCK without stuck locks has unplaced files, which a replica arriving
        # does not change: spare it the walk of its content.
        if rule.state != RuleState.STUCK or stuck_before[rule.id]:
            _refresh_state(session, rule)
    now = utcnow()
    for i in range(0, len(keys), CHUNK):
        session.execute(update(Request).where(
            Request.dest_rse_id == rse_id, keys_in(Request.scope, Request.name,
                                                   keys[i:i + CHUNK]),
            Request.state.in_(_ACTIVE_REQUEST_STATES))
            .values(state=RequestState.DONE, updated_at=now)
            .execution_options(synchronize_session=False))


def replicas_unavailable(session: Session, rse_id: str, failures: dict[tuple[str, str],
                                                                       dict[str, Any]],
                         rse_name: str) -> None:
    """These replicas on `rse_id` became UNAVAILABLE (Rucio's failed_transfer): their locks
    are STUCK (on a staging_required RSE only the replicating ones, since the OK copies
    there are still on tape) and so are the rules, with the error; a rule named as
    `broken_rule_id` is SUSPENDED with `broken_message` instead. Transfer requests stay:
    one still in flight may yet deliver the file, which makes the locks OK again."""
    if not failures:
        return
    states = (LockState.REPLICATING,) if _staging_required(session, rse_id) else (
        LockState.REPLICATING, LockState.OK)
    locks, rules = _locks_on(session, rse_id, list(failures), states)
    _set_lock_states(session, rse_id, locks, LockState.STUCK)
    now = utcnow()
    for lock in locks:
        rule = rules[lock.rule_id]
        _count(rule, lock.state, -1)
        _count(rule, LockState.STUCK, 1)
        details = failures[(lock.scope, lock.name)]
        if rule.state == RuleState.SUSPENDED:
            continue
        if details.get("broken_rule_id") == rule.id:
            rule.state = RuleState.SUSPENDED
            rule.error = _error_text(details.get("broken_message"))
            continue
        rule.state = RuleState.STUCK
        if rule.stuck_at is None:
            rule.stuck_at = now
        rule.error = _error_text(details.get("error_message")) or _error_text(
            f"The replica of {lock.scope}:{lock.name} on {rse_name} was marked UNAVAILABLE")


def _error_text(message: Any) -> str | None:
    if message is None:
        return None
    text = str(message)
    # Rucio keeps 245 characters and marks the cut, within the 255 of the column.
    return text if len(text) <= 245 else text[:245] + "..."


# --- the judge-evaluator, synchronous ------------------------------------------------------


def covering_rules(session: Session, parent: DID) -> list[Rule]:
    """The rules on `parent` and its ancestors, row-locked, oldest first."""
    return list(session.scalars(_covering_statement(),
                                {"scope": parent.scope, "name": parent.name}))


# Rules that do not place anything (yet, or while suspended): they are not extended to
# new content, as in Rucio's attach evaluation.
_NOT_STARTED = (RuleState.WAITING_APPROVAL, RuleState.INJECT, RuleState.SUSPENDED)


@functools.cache
def _covering_statement() -> Any:
    """One query, built once."""
    up = _ancestry("scope", "name")
    # FOR NO KEY UPDATE: concurrent attachments to one collection extend its rules one
    # after the other, so lock counters are never updated from a stale read.
    return (select(Rule).join(up, and_(Rule.scope == up.c.scope, Rule.name == up.c.name))
            .where(Rule.state.not_in(_NOT_STARTED))
            .order_by(Rule.created_at, Rule.id).with_for_update(key_share=True, of=Rule))


def covered(scope_key: str, name_key: str) -> Any:
    """EXISTS (a rule on the collection bound as the parameters `scope_key`, `name_key`
    or on one of its ancestors): for statements that learn it on the way."""
    up = _ancestry(scope_key, name_key)
    return exists().where(Rule.scope == up.c.scope, Rule.name == up.c.name,
                          Rule.state.not_in(_NOT_STARTED))


def _ancestry(scope_key: str, name_key: str) -> Any:
    """The collection and its ancestors, walked up the attachment graph by a recursive CTE
    (UNION, so a DID reached twice in the DAG is visited once)."""
    # Seeded from the DID's own row, whose columns carry their collation (PostgreSQL
    # refuses a recursive CTE whose terms differ in it).
    up = select(DID.scope, DID.name).where(
        DID.scope == bindparam(scope_key), DID.name == bindparam(name_key)).cte(
            "up", recursive=True)
    return up.union(select(Attachment.scope, Attachment.name).where(
        Attachment.child_scope == up.c.scope, Attachment.child_name == up.c.name))


def _locked_names(session: Session, rule: Rule, files: list[DID]) -> set[tuple[str, str]]:
    keys = [(f.scope, f.name) for f in files]
    found: set[tuple[str, str]] = set()
    for i in range(0, len(keys), CHUNK):
        found.update((s, n) for s, n in session.execute(
            select(Lock.scope, Lock.name).where(
                Lock.rule_id == rule.id,
                keys_in(Lock.scope, Lock.name, keys[i:i + CHUNK]))).all())
    return found


def extend_for_attach(session: Session, parent: DID, children: list[DID],
                      rules: list[Rule] | None = None) -> None:
    """Extend every rule on `parent` or its ancestors to newly attached content. Files of a
    dataset follow the RSEs the rule already uses for that dataset (grouping DATASET) or
    for the whole DID (ALL) when those still qualify (write availability, quota, space),
    and go to other qualifying RSEs of the expression otherwise; without grouping they are
    placed like at rule creation. A rule that cannot be extended becomes STUCK with the
    reason, as Rucio's evaluator does; the attachment itself stands, and so do the locks
    of groups placed before the refusal (counted in the account's usage)."""
    if rules is None:
        rules = covering_rules(session, parent)
    if not rules:
        return
    # The files attached directly form one group, as in Rucio's attach evaluation: with
    # grouping DATASET or ALL they go to the same RSEs, and so must fit there together.
    files = [child for child in children if child.did_type == DIDType.FILE]
    groups: list[tuple[DID | None, list[DID]]] = []
    if files:
        groups.append((parent if parent.did_type == DIDType.DATASET else None, files))
    for child in children:
        if child.did_type != DIDType.FILE:
            for dataset in datasets_of(session, child.scope, child.name):
                groups.append((dataset, list(iter_files(session, dataset.scope,
                                                        dataset.name))))
    for rule in rules:
        try:
            _extend(session, rule, groups)
        except _REFUSALS as exc:
            rule.state = RuleState.STUCK
            rule.error = exc.message[:255]
            if rule.stuck_at is None:
                rule.stuck_at = utcnow()
            continue
        _refresh_state(session, rule)


def _extend(session: Session, rule: Rule, groups: list[tuple[DID | None, list[DID]]]) -> None:
    targets = _resolve_for_rule(session, rule.rse_expression)
    weights = _weights(session, targets, rule.weight)
    planner = _Planner(session, rule, targets, weights,
                       bypass_quota=is_admin(session, rule.account) or
                       rule.ignore_account_limit)
    try:
        for dataset, files in groups:
            locked = _locked_names(session, rule, files)
            todo = [f for f in files if (f.scope, f.name) not in locked]
            if not todo:
                continue
            if rule.grouping == RuleGrouping.NONE:
                for file in todo:
                    planner.place([file])
                continue
            query = select(Lock.rse_id).where(Lock.rule_id == rule.id).distinct()
            if rule.grouping == RuleGrouping.DATASET and dataset is not None:
                query = query.join(Attachment, and_(Attachment.child_scope == Lock.scope,
                                                    Attachment.child_name == Lock.name)).where(
                    Attachment.scope == dataset.scope, Attachment.name == dataset.name)
            # The RSEs in use are preferred but pass the same checks (availability,
            # quota, space) as any other: following them blindly overran quotas.
            planner.place(todo, preferred=set(session.scalars(query)))
    except _REFUSALS:
        # Groups placed before the refusal keep their locks (the rule becomes STUCK and
        # the attachment stands), so their usage must be written too.
        planner.finish()
        raise
    planner.finish()


def shrink_for_detach(session: Session, parent: DID, children: list[DID]) -> None:
    """Remove the locks that rules on `parent` or its ancestors held on content that is no
    longer reachable from the rule's DID."""
    rules = covering_rules(session, parent)
    if not rules:
        return
    detached: list[DID] = []
    for child in children:
        detached.extend(iter_files(session, child.scope, child.name))
    for rule in rules:
        still = {(f.scope, f.name) for f in iter_files(session, rule.scope, rule.name)}
        gone = [(f.scope, f.name) for f in detached if (f.scope, f.name) not in still]
        if not gone:
            continue
        release_locks(session, rule, gone)
        _refresh_state(session, rule)


# --- the judge-repairer ----------------------------------------------------------------

# Rules taken per repairer pass, as Rucio's repairer fetches 100 at a time: a pass stays
# short however many rules are stuck, and the next pass takes the next ones.
REPAIR_BATCH = 100
# How long a rule may stay STUCK (from `stuck_at`, which retries do not move) before the
# repairer gives up and SUSPENDs it instead of trying again, as Rucio's does.
SUSPEND_AFTER = timedelta(days=14)


@dataclass
class Repair:
    """What one repair did to a rule, for the repairer's log line."""

    rule_id: str
    state: RuleState
    counts: tuple[int, int, int]
    placed: int = 0
    moved: int = 0
    now_ok: int = 0
    requeued: int = 0
    error: str | None = None
    # Set when the repair SUSPENDED the rule: since when it had been STUCK.
    stuck_since: datetime | None = None

    @property
    def changed(self) -> bool:
        return self.state != RuleState.STUCK or bool(self.placed or self.moved or self.now_ok)

    def __str__(self) -> str:
        ok, replicating, stuck = self.counts
        if self.stuck_since is not None:
            return (f"rule {self.rule_id} {self.state.value}[{ok}/{replicating}/{stuck}]: "
                    f"STUCK since {self.stuck_since:%Y-%m-%d %H:%M:%S} UTC, more than "
                    f"{SUSPEND_AFTER.days} days; not repaired any more"
                    + ("" if self.error is None else f" (last error: {self.error})"))
        text = (f"rule {self.rule_id} {self.state.value}[{ok}/{replicating}/{stuck}]: "
                f"{self.placed} lock(s) placed, {self.moved} stuck lock(s) moved, "
                f"{self.now_ok} found OK, {self.requeued} transfer(s) re-queued")
        return text if self.error is None else f"{text}; still stuck: {self.error}"


def stuck_rules(session: Session, limit: int = REPAIR_BATCH) -> list[str]:
    """The STUCK rules the repairer takes next: the least recently updated first, as in
    Rucio. A repair updates the rule, so one it cannot repair goes to the back and the
    others get their turn (`stuck_at` stays: it dates the start of the trouble, see
    SUSPEND_AFTER). SUSPENDED rules are not STUCK, so they are never taken (as in
    Rucio)."""
    return list(session.scalars(
        select(Rule.id).where(Rule.state == RuleState.STUCK)
        .order_by(Rule.updated_at, Rule.id).limit(limit)))


def repair_rule(session: Session, rule_id: str) -> Repair | None:
    """Rucio's repair_rule, in spirit: place the files the rule could not place, move
    its STUCK locks to another qualifying RSE of its expression (or retry the transfer
    where they are), then recount and re-evaluate the rule. A rule STUCK for more than
    SUSPEND_AFTER is SUSPENDED instead, untouched otherwise (locks, counters and `error`
    stay as they are), as Rucio's repair_rule does before any other work. Returns None
    when the rule is not STUCK any more or another transaction holds it (it is taken on a
    later pass)."""
    # Only the rule's row is locked first, as attachments, detachments and replica state
    # changes lock rules before the locks, replicas, requests and usage they then change:
    # whoever holds the rule works alone on it, in the same order. SKIP LOCKED: a rule
    # being changed right now is not worth waiting for.
    rule = session.scalar(
        select(Rule).where(Rule.id == rule_id, Rule.state == RuleState.STUCK)
        .with_for_update(skip_locked=True, key_share=True)
        .execution_options(populate_existing=True))
    if rule is None:
        return None
    now = utcnow()
    if rule.stuck_at is None:
        rule.stuck_at = now
    if rule.stuck_at < now - SUSPEND_AFTER:
        rule.state = RuleState.SUSPENDED
        rule.updated_at = now
        return Repair(rule.id, rule.state, (rule.locks_ok_cnt, rule.locks_replicating_cnt,
                                            rule.locks_stuck_cnt),
                      error=rule.error, stuck_since=rule.stuck_at)
    _recount(session, rule)
    before = rule.locks_ok_cnt + rule.locks_replicating_cnt + rule.locks_stuck_cnt
    errors: list[str] = []
    if _has_unplaced_files(session, rule):
        try:
            # Exactly what attaching the rule's content would do: the same groups, the
            # same preferred RSEs and checks; files already locked are skipped.
            _extend(session, rule, _content_groups(session, rule))
        except _REFUSALS as exc:
            errors.append(exc.message)
    placed = rule.locks_ok_cnt + rule.locks_replicating_cnt + rule.locks_stuck_cnt - before
    result = Repair(rule.id, rule.state, (0, 0, 0), placed=placed)
    _repair_stuck_locks(session, rule, result, errors)
    _recount(session, rule)
    _refresh_state(session, rule, recheck=True)
    now = utcnow()
    if rule.state == RuleState.STUCK:
        # `stuck_at` stays (_refresh_state keeps it while the rule is STUCK): a retry is
        # no progress. The new updated_at sends the rule to the back of the queue.
        if errors:
            rule.error = _error_text(errors[0])
        result.error = rule.error
    rule.updated_at = now
    result.state = rule.state
    result.counts = (rule.locks_ok_cnt, rule.locks_replicating_cnt, rule.locks_stuck_cnt)
    return result


def _recount(session: Session, rule: Rule) -> None:
    """The rule's counters from its locks, as Rucio's repairer resets them: whatever went
    wrong on the way, a repaired rule reports what is there."""
    counts: dict[LockState, int] = {state: int(n) for state, n in session.execute(
        select(Lock.state, func.count()).where(Lock.rule_id == rule.id)
        .group_by(Lock.state)).all()}
    rule.locks_ok_cnt = counts.get(LockState.OK, 0)
    rule.locks_replicating_cnt = counts.get(LockState.REPLICATING, 0)
    rule.locks_stuck_cnt = counts.get(LockState.STUCK, 0)


def _content_groups(session: Session, rule: Rule) -> list[tuple[DID | None, list[DID]]]:
    """The rule's files in the groups an attachment forms: per dataset (a file rule: the
    file alone)."""
    did = get_did(session, rule.scope, rule.name)
    if did.did_type == DIDType.FILE:
        return [(None, [did])]
    return [(dataset, list(iter_files(session, dataset.scope, dataset.name)))
            for dataset in datasets_of(session, did.scope, did.name)]


def _repair_stuck_locks(session: Session, rule: Rule, result: Repair,
                        errors: list[str]) -> None:
    """Each STUCK lock whose replica is AVAILABLE by now is OK. The others move to another
    RSE of the expression that passes the checks of placement and holds no lock of the
    rule on that file; the stuck lock goes (usage, replica lock count, tombstone, request
    as when a rule is removed). Where no RSE qualifies the lock stays STUCK and, if its RSE
    is writable, its transfer is queued again, as Rucio retries it on the same RSE."""
    stuck: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for scope, name, rse_id in session.execute(select(Lock.scope, Lock.name, Lock.rse_id).where(
            Lock.rule_id == rule.id, Lock.state == LockState.STUCK)
            .with_for_update(key_share=True)):
        stuck[rse_id].append((scope, name))
    if not stuck:
        return
    now = utcnow()
    for rse_id in list(stuck):
        keys = stuck[rse_id]
        arrived: set[tuple[str, str]] = set()
        for i in range(0, len(keys), CHUNK):
            arrived.update((s, n) for s, n in session.execute(
                select(Replica.scope, Replica.name).where(
                    Replica.rse_id == rse_id, keys_in(Replica.scope, Replica.name,
                                                      keys[i:i + CHUNK]),
                    Replica.state == ReplicaState.AVAILABLE)).all())
        if arrived:
            done = sorted(arrived)
            for i in range(0, len(done), CHUNK):
                session.execute(update(Lock).where(
                    Lock.rule_id == rule.id, Lock.rse_id == rse_id,
                    keys_in(Lock.scope, Lock.name, done[i:i + CHUNK]))
                    .values(state=LockState.OK, updated_at=now)
                    .execution_options(synchronize_session=False))
            result.now_ok += len(done)
            stuck[rse_id] = [key for key in keys if key not in arrived]
    stuck = {rse_id: keys for rse_id, keys in stuck.items() if keys}
    if not stuck:
        return
    try:
        targets = _resolve_for_rule(session, rule.rse_expression)
        weights = _weights(session, targets, rule.weight)
    except _REFUSALS as exc:
        # Nowhere to move them to; Rucio's repairer stops here too.
        errors.append(exc.message)
        return
    planner = _Planner(session, rule, targets, weights,
                       bypass_quota=is_admin(session, rule.account) or
                       rule.ignore_account_limit)
    # RSEs the rule uses for locks that are not stuck: preferred targets, so that moved
    # files join the rest of their group where they still can.
    in_use = set(session.scalars(select(Lock.rse_id).where(
        Lock.rule_id == rule.id, Lock.state != LockState.STUCK).distinct()))
    retry: dict[str, list[Any]] = defaultdict(list)
    try:
        for rse_id, keys in stuck.items():
            held = _lock_rses(session, rule, keys)
            files = _light_files(session, keys)
            batches: dict[frozenset[str], list[Any]] = defaultdict(list)
            for file in files:
                batches[frozenset(held[(file.scope, file.name)] | {rse_id})].append(file)
            for exclude, batch in batches.items():
                # With grouping NONE each file is placed on its own, as at creation.
                parts = [[f] for f in batch] if rule.grouping == RuleGrouping.NONE \
                    else [batch]
                for part in parts:
                    try:
                        planner.place(part, preferred=in_use - exclude, copies=1,
                                      exclude=exclude)
                    except _REFUSALS as exc:
                        errors.append(exc.message)
                        retry[rse_id].extend(part)
                        continue
                    release_locks(session, rule, [(f.scope, f.name) for f in part],
                                  on_rse=rse_id)
                    if rse_id in planner.quota:
                        # The released usage is quota again for the files still to move.
                        planner.quota[rse_id] += sum(f.bytes or 0 for f in part)
                    result.moved += len(part)
    finally:
        planner.finish()
    for rse_id, files in retry.items():
        result.requeued += _requeue(session, planner, rse_id, files, now)


def _lock_rses(session: Session, rule: Rule,
               keys: list[tuple[str, str]]) -> dict[tuple[str, str], set[str]]:
    """The RSEs holding a lock of `rule` on each of these files."""
    held: dict[tuple[str, str], set[str]] = defaultdict(set)
    for i in range(0, len(keys), CHUNK):
        for scope, name, rse_id in session.execute(
                select(Lock.scope, Lock.name, Lock.rse_id).where(
                    Lock.rule_id == rule.id, keys_in(Lock.scope, Lock.name,
                                                     keys[i:i + CHUNK]))):
            held[(scope, name)].add(rse_id)
    return held


def _light_files(session: Session, keys: list[tuple[str, str]]) -> list[Any]:
    """(scope, name, bytes, md5, adler32) of these files: what placing them needs."""
    found: list[Any] = []
    for i in range(0, len(keys), CHUNK):
        found.extend(session.execute(
            select(DID.scope, DID.name, DID.bytes, DID.md5, DID.adler32).where(
                keys_in(DID.scope, DID.name, keys[i:i + CHUNK]))
            .order_by(DID.scope, DID.name)).all())
    return found


def _requeue(session: Session, planner: _Planner, rse_id: str, files: list[Any],
             now: datetime) -> int:
    """Retry stuck copies on their own RSE, as Rucio's repairer does when no other RSE
    qualifies: the replica is being copied again and a transfer request is queued (a
    finished or failed one revived, a cancelled one made anew). The lock stays STUCK
    until the replica is AVAILABLE. Nothing is retried on an RSE one may not write to."""
    rse = session.get(RSE, rse_id)
    if rse is None or not (rse.availability_write or planner.rule.ignore_availability):
        return 0
    keys = [(f.scope, f.name) for f in files]
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i:i + CHUNK]
        session.execute(update(Lock).where(
            Lock.rule_id == planner.rule.id, Lock.rse_id == rse_id,
            keys_in(Lock.scope, Lock.name, chunk))
            .values(repair_cnt=Lock.repair_cnt + 1, updated_at=now)
            .execution_options(synchronize_session=False))
        session.execute(update(Replica).where(
            Replica.rse_id == rse_id, keys_in(Replica.scope, Replica.name, chunk),
            Replica.state.not_in((ReplicaState.AVAILABLE, ReplicaState.COPYING)))
            .values(state=ReplicaState.COPYING, updated_at=now)
            .execution_options(synchronize_session=False))
    for i in range(0, len(files), CHUNK):
        planner._requests(files[i:i + CHUNK], rse, now)
    return len(files)
