"""Account limits and usage. Usage is counted per lock, like Rucio: two rules of one account
on the same file at the same RSE count twice. It is updated in the same transaction as the
locks, so it is exact at once (Rucio folds it in later with an accounting daemon).

No limit row means zero quota, as in Rucio: an account may place data only where an admin
has granted it space, so a new account cannot fill a site by accident. Admin accounts and
rules with ignore_account_limit bypass quota. -1 means unlimited.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from stashflow.placement.accounts import get_account, is_admin
from stashflow.placement.clock import utcnow
from stashflow.placement.exceptions import AccessDenied, InvalidObject
from stashflow.placement.models import RSE, AccountGlobalLimit, AccountLimit, AccountUsage
from stashflow.placement.rses import get_rse, resolve

UNLIMITED = -1


def _check_admin(session: Session, caller: str) -> None:
    if not is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not set or delete account limits")


def _check_bytes(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < UNLIMITED:
        raise InvalidObject(f"A limit must be a number of bytes or -1 (unlimited), not "
                            f"{value!r}")
    return value


def set_local_limit(session: Session, caller: str, account: str, rse: str, value: Any) -> None:
    _check_admin(session, caller)
    get_account(session, account)
    row = get_rse(session, rse)
    limit = session.get(AccountLimit, (account, row.id))
    if limit is None:
        session.add(AccountLimit(account=account, rse_id=row.id, bytes=_check_bytes(value)))
    else:
        limit.bytes = _check_bytes(value)


def delete_local_limit(session: Session, caller: str, account: str, rse: str) -> None:
    _check_admin(session, caller)
    row = get_rse(session, rse)
    limit = session.get(AccountLimit, (account, row.id))
    if limit is not None:
        session.delete(limit)


def set_global_limit(session: Session, caller: str, account: str, expression: str,
                     value: Any) -> None:
    _check_admin(session, caller)
    get_account(session, account)
    resolve(session, expression)  # refuse expressions that select nothing
    limit = session.get(AccountGlobalLimit, (account, expression))
    if limit is None:
        session.add(AccountGlobalLimit(account=account, rse_expression=expression,
                                       bytes=_check_bytes(value)))
    else:
        limit.bytes = _check_bytes(value)


def delete_global_limit(session: Session, caller: str, account: str, expression: str) -> None:
    _check_admin(session, caller)
    limit = session.get(AccountGlobalLimit, (account, expression))
    if limit is not None:
        session.delete(limit)


def _as_float(value: int | None) -> float:
    if value is None:
        return 0.0
    return math.inf if value == UNLIMITED else float(value)


def local_limits(session: Session, account: str) -> dict[str, float]:
    get_account(session, account)
    rows = session.execute(select(RSE.rse, AccountLimit.bytes).join(
        RSE, RSE.id == AccountLimit.rse_id).where(AccountLimit.account == account)).all()
    return {rse: _as_float(value) for rse, value in sorted(rows)}


def global_limits(session: Session, account: str) -> dict[str, dict[str, Any]]:
    get_account(session, account)
    out: dict[str, dict[str, Any]] = {}
    for row in session.scalars(select(AccountGlobalLimit).where(
            AccountGlobalLimit.account == account)):
        out[row.rse_expression] = {
            "resolved_rses": [r.rse for r in resolve(session, row.rse_expression)],
            "limit": _as_float(row.bytes)}
    return out


def _usage_row(session: Session, account: str, rse_id: str) -> tuple[int, int]:
    # Always read from the database: usage is changed with relative UPDATEs (below), which
    # ORM objects in the session would not see.
    row = session.execute(select(AccountUsage.files, AccountUsage.bytes).where(
        AccountUsage.account == account, AccountUsage.rse_id == rse_id)).first()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def usage(session: Session, account: str, rse_id: str) -> int:
    return _usage_row(session, account, rse_id)[1]


def add_usage(session: Session, account: str, rse_id: str, files: int, size: int) -> None:
    """Relative update, so concurrent transactions never lose each other's counts; a
    concurrent first insert fails on the primary key and the request is retried."""
    session.flush()
    result = session.execute(
        update(AccountUsage).where(AccountUsage.account == account,
                                   AccountUsage.rse_id == rse_id)
        .values(files=AccountUsage.files + files, bytes=AccountUsage.bytes + size,
                updated_at=utcnow())
        .execution_options(synchronize_session=False))
    if not getattr(result, "rowcount", 0):
        session.execute(insert(AccountUsage.__table__).values(
            account=account, rse_id=rse_id, files=files, bytes=size, created_at=utcnow(),
            updated_at=utcnow()))


def remaining(session: Session, account: str, rse: RSE) -> float:
    """Bytes the account may still place on the RSE, counting global limits too."""
    limit = session.get(AccountLimit, (account, rse.id))
    left = _as_float(limit.bytes if limit else None) - usage(session, account, rse.id)
    for glob in session.scalars(select(AccountGlobalLimit).where(
            AccountGlobalLimit.account == account)):
        covered = resolve(session, glob.rse_expression)
        if rse.id in {r.id for r in covered}:
            used = sum(usage(session, account, r.id) for r in covered)
            left = min(left, _as_float(glob.bytes) - used)
    return left


def local_usage(session: Session, account: str, rse: str | None = None) -> list[dict[str, Any]]:
    get_account(session, account)
    limits = {r.rse_id: r.bytes for r in session.scalars(
        select(AccountLimit).where(AccountLimit.account == account))}
    usages = {rse_id: (files, size) for rse_id, files, size in session.execute(
        select(AccountUsage.rse_id, AccountUsage.files, AccountUsage.bytes).where(
            AccountUsage.account == account))}
    rows = []
    targets = [get_rse(session, rse)] if rse else [
        r for r in session.scalars(select(RSE).where(RSE.deleted.is_(False)).order_by(RSE.rse))
        if r.id in limits or r.id in usages]
    for target in targets:
        files, size = usages.get(target.id, (0, 0))
        limit = _as_float(limits.get(target.id))
        rows.append({"rse_id": target.id, "rse": target.rse, "bytes": size,
                     "files": files, "bytes_limit": limit,
                     "bytes_remaining": limit - size})
    return rows


def global_usage(session: Session, account: str) -> list[dict[str, Any]]:
    get_account(session, account)
    rows = []
    for glob in session.scalars(select(AccountGlobalLimit).where(
            AccountGlobalLimit.account == account).order_by(AccountGlobalLimit.rse_expression)):
        covered = resolve(session, glob.rse_expression)
        counts = [_usage_row(session, account, r.id) for r in covered]
        files = sum(c[0] for c in counts)
        size = sum(c[1] for c in counts)
        limit = _as_float(glob.bytes)
        rows.append({"rse_expression": glob.rse_expression, "bytes": size, "files": files,
                     "bytes_limit": limit, "bytes_remaining": limit - size})
    return rows
