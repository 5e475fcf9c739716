"""Accounts and userpass identities. Passwords are stored as salted scrypt hashes: Rucio
uses salted SHA-256, but nothing outside this server ever reads the hash, so we take the
memory-hard function."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from stashflow.placement import naming
from stashflow.placement.clock import iso, utcnow
from stashflow.placement.exceptions import (
    AccountNotFound,
    Duplicate,
    IdentityError,
    InvalidObject,
)
from stashflow.placement.models import (
    Account,
    AccountAttribute,
    AccountStatus,
    AccountType,
    Identity,
    IdentityAccount,
    IdentityType,
)

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R,
                            p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        algo, n, r, p, salt, expected = stored.split("$")
    except ValueError:
        return False
    if algo != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                            p=int(p), dklen=32)
    return hmac.compare_digest(digest.hex(), expected)


def get_account(session: Session, name: str) -> Account:
    row = session.get(Account, name)
    if row is None or row.status == AccountStatus.DELETED:
        raise AccountNotFound(f"Account '{name}' does not exist")
    return row


def add_account(session: Session, name: str, account_type: str = "USER",
                email: str | None = None) -> Account:
    naming.account(name)
    try:
        kind = AccountType[account_type.upper()]
    except (KeyError, AttributeError):
        raise InvalidObject(f"Invalid account type {account_type!r} for account '{name}'") \
            from None
    if session.get(Account, name) is not None:
        raise Duplicate(f"Account '{name}' already exists")
    row = Account(account=name, account_type=kind, email=email)
    session.add(row)
    session.flush()
    return row


def list_accounts(session: Session, filters: dict[str, str]) -> list[dict[str, Any]]:
    """Rucio's list_accounts: active accounts, filtered by `account_type`, `identity`,
    `account` (with * wildcards) and any other key as an account attribute equal to the
    value (core/account.py list_accounts)."""
    query = select(Account).where(Account.status == AccountStatus.ACTIVE)
    for key, value in filters.items():
        if key == "account_type":
            try:
                kind = AccountType[value.upper()]
            except KeyError:
                raise InvalidObject(f"Invalid account type {value!r}") from None
            query = query.where(Account.account_type == kind)
        elif key == "identity":
            query = query.where(Account.account.in_(
                select(IdentityAccount.account).where(IdentityAccount.identity == value)))
        elif key == "account":
            if "*" in value:
                query = query.where(Account.account.like(value.replace("*", "%")))
            else:
                query = query.where(Account.account == value)
        else:
            query = query.where(Account.account.in_(
                select(AccountAttribute.account).where(AccountAttribute.key == key,
                                                       AccountAttribute.value == _stored(value))))
    return [{"account": r.account, "type": r.account_type.value, "email": r.email}
            for r in session.scalars(query.order_by(Account.account))]


def update_account(session: Session, name: str, key: str, value: Any) -> None:
    """Rucio's update_account for the keys its client sends: `email`, and `status`
    (ACTIVE or SUSPENDED, stamping suspended_at as Rucio does). Rucio would set any
    column named by the key; we refuse other keys rather than let a client rewrite the
    account's name, type or timestamps."""
    row = get_account(session, name)
    if key == "email":
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            raise InvalidObject(f"Invalid email {str(value)[:100]!r}")
        row.email = value
    elif key == "status":
        try:
            status = AccountStatus[str(value).upper()]
        except KeyError:
            raise InvalidObject(f"Unknown value {value}") from None
        if status == AccountStatus.SUSPENDED:
            row.status, row.suspended_at = status, utcnow()
        elif status == AccountStatus.ACTIVE:
            row.status, row.suspended_at = status, None
        else:
            raise InvalidObject(f"Unknown value {value}")
    else:
        raise InvalidObject(f"The account parameter {key!r} cannot be updated")
    session.flush()


def delete_account(session: Session, name: str) -> None:
    """Rucio's del_account: a soft delete of an active account (its rules, scopes and
    identities stay, as in Rucio)."""
    row = session.get(Account, name)
    if row is None or row.status != AccountStatus.ACTIVE:
        raise AccountNotFound(f"Account with ID '{name}' cannot be found")
    row.status, row.deleted_at = AccountStatus.DELETED, utcnow()
    session.flush()


def list_identities(session: Session, name: str) -> list[dict[str, Any]]:
    row = session.get(Account, name)
    if row is None or row.status != AccountStatus.ACTIVE:
        raise AccountNotFound(f"Account with ID '{name}' cannot be found")
    query = (select(IdentityAccount.identity_type, IdentityAccount.identity, Identity.email)
             .join(Identity, (Identity.identity == IdentityAccount.identity)
                   & (Identity.identity_type == IdentityAccount.identity_type))
             .where(IdentityAccount.account == name)
             .order_by(IdentityAccount.identity_type, IdentityAccount.identity))
    return [{"type": kind.value, "identity": identity, "email": email}
            for kind, identity, email in session.execute(query)]


def delete_identity_mapping(session: Session, identity: str, identity_type: str,
                            account: str) -> None:
    """Rucio's del_account_identity: only the mapping goes; the identity itself stays
    (other accounts may still use it)."""
    get_account(session, account)
    try:
        kind = IdentityType[str(identity_type).upper()]
    except KeyError:
        raise InvalidObject(f"Invalid identity type {identity_type!r}") from None
    mapping = session.get(IdentityAccount, (identity, kind, account))
    if mapping is None:
        raise IdentityError(f"Identity ('{identity}','{kind.value}') does not exist!")
    session.delete(mapping)
    session.flush()


def account_dict(row: Account) -> dict[str, object]:
    # The account endpoint is the one place Rucio uses ISO dates instead of RFC 1123.
    return {
        "account": row.account,
        "account_type": row.account_type.value,
        "status": row.status.value,
        "email": row.email,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "suspended_at": iso(row.suspended_at),
        "deleted_at": iso(row.deleted_at),
    }


# Rucio's schema for account attribute keys and values (common/schema/generic.py).
_ATTRIBUTE = re.compile(r"[a-zA-Z0-9\-_\\/.]{1,30}")


def _stored(value: str) -> str:
    # Rucio's BooleanString column: "True"/"FALSE"/... are kept as "true"/"false".
    return value.lower() if value.lower() in ("true", "false") else value


def _loaded(value: str | None) -> str | bool | None:
    if value is not None and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def add_attribute(session: Session, account: str, key: Any, value: Any) -> None:
    """Rucio's add_account_attribute: a new key only (Duplicate otherwise), on an active
    account, key and value matching Rucio's account_attribute schema."""
    for what, text in (("key", key), ("value", value)):
        if not isinstance(text, str) or not _ATTRIBUTE.fullmatch(text):
            raise InvalidObject(f"Invalid account attribute {what} {str(text)[:100]!r}: "
                                f"1 to 30 of a-z A-Z 0-9 - _ \\ / .")
    get_account(session, account)
    if session.get(AccountAttribute, (account, key)) is not None:
        raise Duplicate(f"Key {key} already exist for account {account}!")
    session.add(AccountAttribute(account=account, key=key, value=_stored(value)))
    session.flush()


def delete_attribute(session: Session, account: str, key: str) -> None:
    row = session.get(AccountAttribute, (account, key))
    if row is None:
        raise AccountNotFound(f"Attribute ({key}) does not exist for the account {account}!")
    session.delete(row)
    session.flush()


def list_attributes(session: Session, account: str) -> list[dict[str, Any]]:
    get_account(session, account)
    return [{"key": row.key, "value": _loaded(row.value)} for row in session.scalars(
        select(AccountAttribute).where(AccountAttribute.account == account)
        .order_by(AccountAttribute.key))]


def set_attribute(session: Session, account: str, key: str, value: str) -> None:
    get_account(session, account)
    row = session.get(AccountAttribute, (account, key))
    if row is None:
        session.add(AccountAttribute(account=account, key=key, value=_stored(value)))
    else:
        row.value = _stored(value)
    session.flush()


def is_admin(session: Session, account: str) -> bool:
    """Rucio's default policy (core/permission/generic.py): root, or any account that has
    the attribute `admin`, whatever its value (has_account_attribute tests presence)."""
    if account == "root":
        return True
    return session.get(AccountAttribute, (account, "admin")) is not None


def add_userpass_identity(session: Session, username: str, password: str, account: str,
                          email: str | None = None, default: bool = True,
                          reset_password: bool = False) -> None:
    """Map a userpass identity to an account, as Rucio's add_account_identity: an existing
    identity is reused unchanged (its password is not touched, else any admin adding a
    mapping could take over another account's login), and an existing mapping is a
    Duplicate. Only the bootstrap passes reset_password, to recover root's login."""
    get_account(session, account)
    if not username or len(username) > 2048:
        raise InvalidObject("A userpass identity needs a username of 1 to 2048 characters")
    identity = session.get(Identity, (username, IdentityType.USERPASS))
    if identity is None or reset_password:
        if not password:
            raise InvalidObject(f"The userpass identity '{username}' needs a non-empty "
                                f"password")
    if identity is None:
        session.add(Identity(identity=username, identity_type=IdentityType.USERPASS,
                             password_hash=hash_password(password), email=email))
    elif reset_password:
        identity.password_hash = hash_password(password)
    session.flush()
    mapping = session.get(IdentityAccount, (username, IdentityType.USERPASS, account))
    if mapping is not None:
        if reset_password:
            return
        raise Duplicate(f"Identity pair '{username}','USERPASS' already exists!")
    session.add(IdentityAccount(identity=username, identity_type=IdentityType.USERPASS,
                                account=account, is_default=default))
    session.flush()


def accounts_for_identity(session: Session, username: str) -> list[IdentityAccount]:
    return list(session.scalars(
        select(IdentityAccount).where(IdentityAccount.identity == username,
                                      IdentityAccount.identity_type == IdentityType.USERPASS)
    ))


def bootstrap_root(session: Session, username: str, password: str) -> bool:
    """Create the root account with a userpass identity; True if anything was created.
    Idempotent: running it again only resets the password."""
    created = False
    if session.get(Account, "root") is None:
        add_account(session, "root", "SERVICE")
        created = True
    set_attribute(session, "root", "admin", "True")
    add_userpass_identity(session, username, password, "root", reset_password=True)
    return created
