"""The placement catalog schema (SQLAlchemy 2 declarative models).

Column names follow Rucio's where a REST payload exposes them, so that serialising a row
for the Rucio-compatible API is a rename-free copy. Enumerations are stored by name in
plain strings with CHECK constraints (no native PostgreSQL enums): adding a state later is
then a one-line migration on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from stashflow.placement.clock import utcnow

# Explicit constraint names keep Alembic migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SCOPE_LEN = 25
NAME_LEN = 255
ACCOUNT_LEN = 25
RSE_ID_LEN = 32


def _key(length: int) -> String:
    """A string that identifies something (scope, name, account, RSE or rule id): compared
    byte by byte on PostgreSQL (COLLATE "C") as it is on SQLite. Every index lookup and
    insert compares these keys, and a locale-aware collation (the server's default, e.g.
    C.UTF-8 or en_US.UTF-8) makes each comparison several times dearer; it would also make
    listings sort differently on the two databases."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=24,
                validate_strings=True)


class AccountType(enum.Enum):
    USER = "USER"
    GROUP = "GROUP"
    SERVICE = "SERVICE"


class AccountStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    DELETED = "DELETED"


class IdentityType(enum.Enum):
    USERPASS = "USERPASS"
    X509 = "X509"
    GSS = "GSS"
    SSH = "SSH"
    OIDC = "OIDC"


class DIDType(enum.Enum):
    FILE = "FILE"
    DATASET = "DATASET"
    CONTAINER = "CONTAINER"


class DIDAvailability(enum.Enum):
    AVAILABLE = "AVAILABLE"
    LOST = "LOST"
    DELETED = "DELETED"


class RSEType(enum.Enum):
    DISK = "DISK"
    TAPE = "TAPE"


class ReplicaState(enum.Enum):
    AVAILABLE = "AVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"
    COPYING = "COPYING"
    BEING_DELETED = "BEING_DELETED"
    BAD = "BAD"
    TEMPORARY_UNAVAILABLE = "TEMPORARY_UNAVAILABLE"


# Rucio's one-letter codes, accepted on input (`PUT /replicas` sends "A", "U", ...).
REPLICA_STATE_CODES = {
    "A": ReplicaState.AVAILABLE,
    "U": ReplicaState.UNAVAILABLE,
    "C": ReplicaState.COPYING,
    "B": ReplicaState.BEING_DELETED,
    "D": ReplicaState.BAD,
    "T": ReplicaState.TEMPORARY_UNAVAILABLE,
}


class RuleState(enum.Enum):
    REPLICATING = "REPLICATING"
    OK = "OK"
    STUCK = "STUCK"
    SUSPENDED = "SUSPENDED"
    WAITING_APPROVAL = "WAITING_APPROVAL"
    INJECT = "INJECT"


class RuleGrouping(enum.Enum):
    ALL = "ALL"
    DATASET = "DATASET"
    NONE = "NONE"


class RuleNotification(enum.Enum):
    YES = "YES"
    NO = "NO"
    CLOSE = "CLOSE"
    PROGRESS = "PROGRESS"


class LockState(enum.Enum):
    REPLICATING = "REPLICATING"
    OK = "OK"
    STUCK = "STUCK"


class RequestType(enum.Enum):
    TRANSFER = "TRANSFER"
    STAGEIN = "STAGEIN"
    STAGEOUT = "STAGEOUT"


class RequestState(enum.Enum):
    QUEUED = "QUEUED"
    SUBMITTING = "SUBMITTING"
    SUBMITTED = "SUBMITTED"
    DONE = "DONE"
    FAILED = "FAILED"
    NO_SOURCES = "NO_SOURCES"
    ONLY_TAPE_SOURCES = "ONLY_TAPE_SOURCES"
    SUBMISSION_FAILED = "SUBMISSION_FAILED"
    MISMATCH_SCHEME = "MISMATCH_SCHEME"
    SUSPEND = "SUSPEND"
    WAITING = "WAITING"
    PREPARING = "PREPARING"
    LOST = "LOST"


class SubscriptionState(enum.Enum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    NEW = "NEW"
    UPDATED = "UPDATED"
    BROKEN = "BROKEN"


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


# --- accounts, identities, tokens ---------------------------------------------------


class Account(Timestamps, Base):
    __tablename__ = "accounts"
    account: Mapped[str] = mapped_column(_key(ACCOUNT_LEN), primary_key=True)
    account_type: Mapped[AccountType] = mapped_column(_enum(AccountType, "account_type"))
    status: Mapped[AccountStatus] = mapped_column(
        _enum(AccountStatus, "account_status"), default=AccountStatus.ACTIVE
    )
    email: Mapped[str | None] = mapped_column(String(255))
    suspended_at: Mapped[datetime | None] = mapped_column(DateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime)


class AccountAttribute(Timestamps, Base):
    __tablename__ = "account_attributes"
    account: Mapped[str] = mapped_column(
        ForeignKey("accounts.account", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str | None] = mapped_column(String(255))


class Identity(Timestamps, Base):
    __tablename__ = "identities"
    identity: Mapped[str] = mapped_column(String(2048), primary_key=True)
    identity_type: Mapped[IdentityType] = mapped_column(
        _enum(IdentityType, "identity_type"), primary_key=True
    )
    # "scrypt$n$r$p$salt_hex$hash_hex"; NULL for identities that carry no secret (x509...).
    password_hash: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(255))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class IdentityAccount(Timestamps, Base):
    __tablename__ = "identity_account_map"
    identity: Mapped[str] = mapped_column(String(2048), primary_key=True)
    identity_type: Mapped[IdentityType] = mapped_column(
        _enum(IdentityType, "identity_type"), primary_key=True
    )
    account: Mapped[str] = mapped_column(
        ForeignKey("accounts.account", ondelete="CASCADE"), primary_key=True
    )
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    __table_args__ = (
        ForeignKeyConstraint(
            ["identity", "identity_type"],
            ["identities.identity", "identities.identity_type"],
            ondelete="CASCADE",
        ),
    )


class Token(Base):
    __tablename__ = "tokens"
    token: Mapped[str] = mapped_column(String(352), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account", ondelete="CASCADE"))
    identity: Mapped[str | None] = mapped_column(String(2048))
    app_id: Mapped[str | None] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(39))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


# --- scopes and DIDs ---------------------------------------------------------------


class Scope(Timestamps, Base):
    __tablename__ = "scopes"
    scope: Mapped[str] = mapped_column(_key(SCOPE_LEN), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account"), index=True)
    status: Mapped[str] = mapped_column(String(10), default="OPEN")


# The fixed DID columns that Rucio's DidColumnMeta plugin owns; every other metadata key
# goes to the free JSON column `meta`.
DID_COLUMN_META = (
    "project", "datatype", "run_number", "stream_name", "prod_step", "version",
    "campaign", "task_id", "panda_id", "lumiblocknr", "provenance", "phys_group",
    "events", "guid", "eol_at", "expired_at", "hidden", "obsolete",
)


class DID(Timestamps, Base):
    __tablename__ = "dids"
    scope: Mapped[str] = mapped_column(ForeignKey("scopes.scope"), primary_key=True)
    name: Mapped[str] = mapped_column(_key(NAME_LEN), primary_key=True)
    did_type: Mapped[DIDType] = mapped_column(_enum(DIDType, "did_type"))
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account"))
    is_open: Mapped[bool | None] = mapped_column(Boolean)
    monotonic: Mapped[bool] = mapped_column(Boolean, default=False)
    hidden: Mapped[bool] = mapped_column(Boolean, default=False)
    suppressed: Mapped[bool] = mapped_column(Boolean, default=False)
    obsolete: Mapped[bool] = mapped_column(Boolean, default=False)
    is_new: Mapped[bool] = mapped_column(Boolean, default=True)
    complete: Mapped[bool | None] = mapped_column(Boolean)
    availability: Mapped[DIDAvailability | None] = mapped_column(
        _enum(DIDAvailability, "did_availability")
    )
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    length: Mapped[int | None] = mapped_column(BigInteger)
    md5: Mapped[str | None] = mapped_column(String(32))
    adler32: Mapped[str | None] = mapped_column(String(8))
    guid: Mapped[str | None] = mapped_column(String(36))
    events: Mapped[int | None] = mapped_column(BigInteger)
    project: Mapped[str | None] = mapped_column(String(50))
    datatype: Mapped[str | None] = mapped_column(String(50))
    run_number: Mapped[int | None] = mapped_column(Integer)
    stream_name: Mapped[str | None] = mapped_column(String(70))
    prod_step: Mapped[str | None] = mapped_column(String(50))
    version: Mapped[str | None] = mapped_column(String(50))
    campaign: Mapped[str | None] = mapped_column(String(50))
    task_id: Mapped[int | None] = mapped_column(Integer)
    panda_id: Mapped[int | None] = mapped_column(Integer)
    lumiblocknr: Mapped[int | None] = mapped_column(Integer)
    provenance: Mapped[str | None] = mapped_column(String(2))
    phys_group: Mapped[str | None] = mapped_column(String(25))
    eol_at: Mapped[datetime | None] = mapped_column(DateTime)
    expired_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class DeletedDID(Base):
    """Names once used, so that a DID name is never reused, as Rucio guarantees."""

    __tablename__ = "deleted_dids"
    scope: Mapped[str] = mapped_column(_key(SCOPE_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(_key(NAME_LEN), primary_key=True)
    did_type: Mapped[DIDType] = mapped_column(_enum(DIDType, "did_type"))
    deleted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Attachment(Base):
    """One edge of the content graph: collection (scope, name) contains child."""

    __tablename__ = "contents"
    scope: Mapped[str] = mapped_column(_key(SCOPE_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(_key(NAME_LEN), primary_key=True)
    child_scope: Mapped[str] = mapped_column(_key(SCOPE_LEN), primary_key=True)
    child_name: Mapped[str] = mapped_column(_key(NAME_LEN), primary_key=True)
    did_type: Mapped[DIDType] = mapped_column(_enum(DIDType, "did_type"))
    child_type: Mapped[DIDType] = mapped_column(_enum(DIDType, "child_type"))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    adler32: Mapped[str | None] = mapped_column(String(8))
    md5: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # No foreign keys to dids, on purpose: PostgreSQL checks a foreign key with one
    # trigger and one locking lookup per inserted row, which made up more than half of
    # the time of attaching files in bulk. Integrity holds without them: attach inserts
    # only children it selects from dids in the same statement, under a lock on the
    # parent, and DIDs are never deleted (names are never reused, see DeletedDID).
    __table_args__ = (Index("ix_contents_child", "child_scope", "child_name"),)


# --- RSEs --------------------------------------------------------------------------


class RSE(Timestamps, Base):
    __tablename__ = "rses"
    id: Mapped[str] = mapped_column(_key(RSE_ID_LEN), primary_key=True)
    rse: Mapped[str] = mapped_column(String(255), unique=True)
    vo: Mapped[str] = mapped_column(String(3), default="def")
    rse_type: Mapped[RSEType] = mapped_column(_enum(RSEType, "rse_type"), default=RSEType.DISK)
    deterministic: Mapped[bool] = mapped_column(Boolean, default=True)
    volatile: Mapped[bool] = mapped_column(Boolean, default=False)
    staging_area: Mapped[bool] = mapped_column(Boolean, default=False)
    city: Mapped[str | None] = mapped_column(String(255))
    region_code: Mapped[str | None] = mapped_column(String(2))
    country_name: Mapped[str | None] = mapped_column(String(255))
    continent: Mapped[str | None] = mapped_column(String(2))
    time_zone: Mapped[str | None] = mapped_column(String(255))
    ISP: Mapped[str | None] = mapped_column(String(255))
    ASN: Mapped[str | None] = mapped_column(String(255))
    longitude: Mapped[float | None] = mapped_column(Float)
    latitude: Mapped[float | None] = mapped_column(Float)
    availability_read: Mapped[bool] = mapped_column(Boolean, default=True)
    availability_write: Mapped[bool] = mapped_column(Boolean, default=True)
    availability_delete: Mapped[bool] = mapped_column(Boolean, default=True)
    qos_class: Mapped[str | None] = mapped_column(String(64))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime)


class RSEAttribute(Timestamps, Base):
    __tablename__ = "rse_attributes"
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                        primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # JSON so that `<RSE>=True` stays a boolean on the wire, as Rucio sends it.
    value: Mapped[Any] = mapped_column(JSON)


class RSEProtocol(Timestamps, Base):
    __tablename__ = "rse_protocols"
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                        primary_key=True)
    scheme: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    port: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str | None] = mapped_column(String(1024))
    impl: Mapped[str] = mapped_column(String(255))
    # Priorities per domain and operation; NULL = not supported (lowest number wins).
    read_lan: Mapped[int | None] = mapped_column(Integer)
    write_lan: Mapped[int | None] = mapped_column(Integer)
    delete_lan: Mapped[int | None] = mapped_column(Integer)
    read_wan: Mapped[int | None] = mapped_column(Integer)
    write_wan: Mapped[int | None] = mapped_column(Integer)
    delete_wan: Mapped[int | None] = mapped_column(Integer)
    third_party_copy_read: Mapped[int | None] = mapped_column(Integer)
    third_party_copy_write: Mapped[int | None] = mapped_column(Integer)
    extended_attributes: Mapped[Any] = mapped_column(JSON)


class RSELimit(Timestamps, Base):
    __tablename__ = "rse_limits"
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                        primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class RSEUsage(Timestamps, Base):
    __tablename__ = "rse_usage"
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                        primary_key=True)
    source: Mapped[str] = mapped_column(String(255), primary_key=True)
    used: Mapped[int | None] = mapped_column(BigInteger)
    free: Mapped[int | None] = mapped_column(BigInteger)
    files: Mapped[int | None] = mapped_column(BigInteger)


class Distance(Timestamps, Base):
    __tablename__ = "distances"
    src_rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                            primary_key=True)
    dest_rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                             primary_key=True)
    distance: Mapped[int] = mapped_column(Integer)


# --- replicas, rules, locks, requests ------------------------------------------------


class Replica(Timestamps, Base):
    __tablename__ = "replicas"
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id"), primary_key=True)
    scope: Mapped[str] = mapped_column(_key(SCOPE_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(_key(NAME_LEN), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    md5: Mapped[str | None] = mapped_column(String(32))
    adler32: Mapped[str | None] = mapped_column(String(8))
    path: Mapped[str | None] = mapped_column(String(1024))
    state: Mapped[ReplicaState] = mapped_column(
        _enum(ReplicaState, "replica_state"), default=ReplicaState.UNAVAILABLE
    )
    lock_cnt: Mapped[int] = mapped_column(Integer, default=0)
    accessed_at: Mapped[datetime | None] = mapped_column(DateTime)
    tombstone: Mapped[datetime | None] = mapped_column(DateTime)
    __table_args__ = (
        ForeignKeyConstraint(["scope", "name"], ["dids.scope", "dids.name"]),
        Index("ix_replicas_did", "scope", "name"),
        Index("ix_replicas_tombstone", "rse_id", "tombstone"),
    )


class Rule(Timestamps, Base):
    __tablename__ = "rules"
    id: Mapped[str] = mapped_column(_key(32), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account"), index=True)
    scope: Mapped[str] = mapped_column(_key(SCOPE_LEN))
    name: Mapped[str] = mapped_column(_key(NAME_LEN))
    did_type: Mapped[DIDType] = mapped_column(_enum(DIDType, "did_type"))
    state: Mapped[RuleState] = mapped_column(_enum(RuleState, "rule_state"))
    error: Mapped[str | None] = mapped_column(String(255))
    rse_expression: Mapped[str] = mapped_column(String(3000))
    copies: Mapped[int] = mapped_column(Integer, default=1)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    weight: Mapped[str | None] = mapped_column(String(255))
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    locks_ok_cnt: Mapped[int] = mapped_column(BigInteger, default=0)
    locks_replicating_cnt: Mapped[int] = mapped_column(BigInteger, default=0)
    locks_stuck_cnt: Mapped[int] = mapped_column(BigInteger, default=0)
    source_replica_expression: Mapped[str | None] = mapped_column(String(255))
    activity: Mapped[str] = mapped_column(String(50), default="User Subscriptions")
    grouping: Mapped[RuleGrouping] = mapped_column(_enum(RuleGrouping, "rule_grouping"))
    notification: Mapped[RuleNotification] = mapped_column(
        _enum(RuleNotification, "rule_notification"), default=RuleNotification.NO
    )
    stuck_at: Mapped[datetime | None] = mapped_column(DateTime)
    purge_replicas: Mapped[bool] = mapped_column(Boolean, default=False)
    ignore_availability: Mapped[bool] = mapped_column(Boolean, default=False)
    ignore_account_limit: Mapped[bool] = mapped_column(Boolean, default=False)
    priority: Mapped[int] = mapped_column(Integer, default=3)
    comments: Mapped[str | None] = mapped_column(String(255))
    child_rule_id: Mapped[str | None] = mapped_column(_key(32))
    eol_at: Mapped[datetime | None] = mapped_column(DateTime)
    split_container: Mapped[bool] = mapped_column(Boolean, default=False)
    meta: Mapped[Any] = mapped_column(JSON)
    subscription_id: Mapped[str | None] = mapped_column(_key(32))
    __table_args__ = (
        ForeignKeyConstraint(["scope", "name"], ["dids.scope", "dids.name"]),
        UniqueConstraint("scope", "name", "account", "rse_expression", "copies",
                         name="uq_rules_did_account_expression_copies"),
        Index("ix_rules_did", "scope", "name"),
    )


class Lock(Timestamps, Base):
    __tablename__ = "locks"
    rule_id: Mapped[str] = mapped_column(ForeignKey("rules.id", ondelete="CASCADE"),
                                         primary_key=True)
    scope: Mapped[str] = mapped_column(_key(SCOPE_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(_key(NAME_LEN), primary_key=True)
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id"), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account"))
    bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[LockState] = mapped_column(_enum(LockState, "lock_state"))
    repair_cnt: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (Index("ix_locks_replica", "rse_id", "scope", "name"),)


class Request(Timestamps, Base):
    __tablename__ = "requests"
    id: Mapped[str] = mapped_column(_key(32), primary_key=True)
    request_type: Mapped[RequestType] = mapped_column(_enum(RequestType, "request_type"))
    scope: Mapped[str] = mapped_column(_key(SCOPE_LEN))
    name: Mapped[str] = mapped_column(_key(NAME_LEN))
    dest_rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id"))
    source_rse_id: Mapped[str | None] = mapped_column(ForeignKey("rses.id"))
    state: Mapped[RequestState] = mapped_column(_enum(RequestState, "request_state"))
    rule_id: Mapped[str | None] = mapped_column(_key(32))
    activity: Mapped[str] = mapped_column(String(50))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    md5: Mapped[str | None] = mapped_column(String(32))
    adler32: Mapped[str | None] = mapped_column(String(8))
    priority: Mapped[int] = mapped_column(Integer, default=3)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    err_msg: Mapped[str | None] = mapped_column(String(4000))
    external_id: Mapped[str | None] = mapped_column(String(64))
    external_host: Mapped[str | None] = mapped_column(String(256))
    attributes: Mapped[Any] = mapped_column(JSON)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime)
    __table_args__ = (
        # One transfer per (file, destination), shared by every rule that needs it.
        UniqueConstraint("scope", "name", "dest_rse_id", name="uq_requests_file_dest"),
        Index("ix_requests_state", "state", "dest_rse_id"),
    )


# --- quota -------------------------------------------------------------------------


class AccountLimit(Timestamps, Base):
    __tablename__ = "account_limits"
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account", ondelete="CASCADE"),
                                         primary_key=True)
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                        primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)  # -1 = unlimited


class AccountGlobalLimit(Timestamps, Base):
    __tablename__ = "account_global_limits"
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account", ondelete="CASCADE"),
                                         primary_key=True)
    rse_expression: Mapped[str] = mapped_column(String(3000), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)


class AccountUsage(Timestamps, Base):
    __tablename__ = "account_usage"
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account", ondelete="CASCADE"),
                                         primary_key=True)
    rse_id: Mapped[str] = mapped_column(ForeignKey("rses.id", ondelete="CASCADE"),
                                        primary_key=True)
    files: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)


# --- subscriptions -----------------------------------------------------------------


class Subscription(Timestamps, Base):
    __tablename__ = "subscriptions"
    id: Mapped[str] = mapped_column(_key(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    account: Mapped[str] = mapped_column(ForeignKey("accounts.account"))
    filter: Mapped[Any] = mapped_column(JSON)
    replication_rules: Mapped[Any] = mapped_column(JSON)
    policyid: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[SubscriptionState] = mapped_column(
        _enum(SubscriptionState, "subscription_state"), default=SubscriptionState.ACTIVE
    )
    last_processed: Mapped[datetime | None] = mapped_column(DateTime)
    lifetime: Mapped[datetime | None] = mapped_column(DateTime)
    retroactive: Mapped[bool] = mapped_column(Boolean, default=False)
    expired_at: Mapped[datetime | None] = mapped_column(DateTime)
    comments: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("name", "account", name="uq_subscriptions_name"),)
