"""The name patterns of Rucio's generic schema; every name entering the catalog passes here
first, so that a bad name is refused before anything is written."""

from __future__ import annotations

import re

from stashflow.placement.exceptions import InvalidObject

ACCOUNT = re.compile(r"^[a-z0-9-_]{1,25}$")
SCOPE = re.compile(r"^[a-zA-Z_\-.0-9]{1,25}$")
DID_NAME = re.compile(r"^[/A-Za-z0-9][/A-Za-z0-9.\-_]{0,254}$")
RSE = re.compile(r"^([A-Z0-9]+([_-][A-Z0-9]+)*)$")
RSE_ATTRIBUTE_KEY = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


def _check(kind: str, pattern: re.Pattern[str], value: object) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else (
            repr(value[:80]) + f"... ({len(value)} characters)")
        raise InvalidObject(f"Invalid {kind} {shown}: it does not match {pattern.pattern}")
    return value


def account(value: object) -> str:
    return _check("account name", ACCOUNT, value)


def scope(value: object) -> str:
    return _check("scope", SCOPE, value)


def did_name(value: object) -> str:
    return _check("DID name", DID_NAME, value)


def rse(value: object) -> str:
    if isinstance(value, str) and len(value) > 255:
        raise InvalidObject(f"Invalid RSE name of {len(value)} characters (at most 255)")
    return _check("RSE name", RSE, value)


def rse_attribute_key(value: object) -> str:
    return _check("RSE attribute key", RSE_ATTRIBUTE_KEY, value)
