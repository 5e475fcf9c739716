"""Scopes: namespace partitions owned by one account."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from stashflow.placement import naming
from stashflow.placement.accounts import get_account, is_admin
from stashflow.placement.exceptions import AccessDenied, Duplicate, ScopeNotFound
from stashflow.placement.models import Scope


def add_scope(session: Session, caller: str, scope: str, account: str) -> None:
    naming.scope(scope)
    get_account(session, account)
    if caller != account and not is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not add scope {scope} for {account}")
    if session.get(Scope, scope) is not None:
        raise Duplicate(f"Scope '{scope}' already exists!")
    session.add(Scope(scope=scope, account=account))
    session.flush()


def get_scope(session: Session, scope: str) -> Scope:
    row = session.get(Scope, scope)
    if row is None:
        raise ScopeNotFound(f"Scope '{scope}' does not exist")
    return row


def list_scopes(session: Session) -> list[Scope]:
    return list(session.scalars(select(Scope).order_by(Scope.scope)))


def scopes_of(session: Session, account: str) -> list[str]:
    get_account(session, account)
    return list(session.scalars(select(Scope.scope).where(Scope.account == account)
                                .order_by(Scope.scope)))


def check_write(session: Session, caller: str, scope: str) -> Scope:
    """Every account reads every scope but writes only its own (admins write anywhere)."""
    row = get_scope(session, scope)
    check_owner(session, caller, scope, row.account)
    return row


def check_owner(session: Session, caller: str, scope: str, owner: str) -> None:
    """`check_write` for a caller whose scope's owner was read already."""
    if owner != caller and not is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not write to scope {scope} (owned by "
                           f"{owner})")
