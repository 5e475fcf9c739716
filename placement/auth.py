"""Auth tokens: `<account>-<identity>-<appid>-<uuid>` like Rucio's, valid one hour,
revocable. A stale or revoked token is answered with 401 so that the rucio client, which
caches tokens on disk and never checks them, logs in again."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from stashflow.placement.accounts import accounts_for_identity, get_account, verify_password
from stashflow.placement.clock import utcnow
from stashflow.placement.exceptions import AccessDenied, CannotAuthenticate
from stashflow.placement.models import AccountStatus, Identity, IdentityType, Token

TOKEN_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    token: str
    account: str
    expires_at: datetime


@dataclass(frozen=True)
class Caller:
    account: str
    token: str


class MultipleAccounts(Exception):
    """The identity maps to several accounts and none was named (REST answers 206)."""

    def __init__(self, accounts: list[str]) -> None:
        super().__init__("identity maps to several accounts")
        self.accounts = accounts


def login_userpass(session: Session, username: str, password: str, account: str | None,
                   app_id: str | None = None, ip: str | None = None,
                   lifetime: timedelta = TOKEN_LIFETIME) -> Issued:
    identity = session.get(Identity, (username, IdentityType.USERPASS))
    # One message for every failure so that the answer does not reveal which part was wrong.
    refused = CannotAuthenticate(
        f"Cannot authenticate to account {account or '(default)'} with given credentials")
    if identity is None or identity.deleted or not verify_password(password,
                                                                     identity.password_hash):
        raise refused
    mapped = accounts_for_identity(session, username)
    if account:
        if account not in {m.account for m in mapped}:
            raise refused
    elif len(mapped) == 1:
        account = mapped[0].account
    else:
        defaults = [m.account for m in mapped if m.is_default]
        if len(defaults) != 1:
            raise MultipleAccounts(sorted(m.account for m in mapped))
        account = defaults[0]
    if get_account(session, account).status != AccountStatus.ACTIVE:
        raise refused
    app = (app_id or "unknown").replace("-", "_")[:64]
    token = f"{account}-{username}-{app}-{uuid.uuid4().hex}"
    expires = utcnow().replace(microsecond=0) + lifetime
    session.add(Token(token=token, account=account, identity=username, app_id=app, ip=ip,
                      expires_at=expires))
    session.flush()
    return Issued(token, account, expires)


def validate(session: Session, token: str) -> Caller:
    row = session.get(Token, token)
    if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
        raise CannotAuthenticate("Cannot authenticate with given credentials: the token is "
                                 "unknown, expired or revoked")
    return Caller(row.account, token)


def revoke(session: Session, caller: Caller, token: str) -> None:
    row = session.get(Token, token)
    if row is None:
        raise CannotAuthenticate("Unknown token")
    if row.account != caller.account and caller.account != "root":
        raise AccessDenied(f"Account {caller.account} cannot revoke a token of {row.account}")
    row.revoked_at = utcnow()



def purge_expired(session: Session) -> None:
    session.execute(delete(Token).where(Token.expires_at < utcnow() - timedelta(days=1)))
