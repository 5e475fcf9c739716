"""REST: authentication, ping, accounts, identities, scopes, account limits and usage."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy.orm import Session

from stashflow.placement import accounts, auth, quota, scopes
from stashflow.placement.clock import rfc1123
from stashflow.placement.exceptions import AccessDenied, ScopeNotFound
from stashflow.placement.rest import (
    OCTET,
    Catalog,
    HTTPError,
    created,
    json_response,
    ok,
    read_json,
    stream_response,
    stream_response_with_infinity,
)
from stashflow.placement.rules import list_rules

VERSION = "41.5.1"


def routes(catalog: Catalog) -> list[web.RouteDef]:
    async def login(request: web.Request) -> web.Response:
        username = request.headers.get("X-Rucio-Username")
        password = request.headers.get("X-Rucio-Password")
        if not username or password is None:
            raise HTTPError(401, "CannotAuthenticate",
                            "Cannot authenticate: X-Rucio-Username and X-Rucio-Password "
                            "headers are required")
        account = request.headers.get("X-Rucio-Account") or None
        app_id = request.headers.get("X-Rucio-AppID")

        def work(session: Session, _caller: None) -> auth.Issued:
            return auth.login_userpass(session, username, password, account, app_id,
                                       request.remote)

        try:
            issued = await catalog.call(request, work, authenticated=False)
        except auth.MultipleAccounts as exc:
            return web.Response(status=206, body=json_response(exc.accounts).body,
                                headers={"Content-Type": "application/json"})
        return web.Response(status=200, headers={
            "Content-Type": OCTET, "X-Rucio-Auth-Token": issued.token,
            "X-Rucio-Auth-Token-Expires": rfc1123(issued.expires_at) or "",
            "X-Rucio-Auth-Account": issued.account})

    async def validate(request: web.Request) -> web.Response:
        token = request.headers.get("X-Rucio-Auth-Token", "")

        def work(session: Session, caller: str) -> dict[str, Any]:
            row = session.get(auth.Token, token)
            assert row is not None
            return {"account": caller, "identity": row.identity,
                    "lifetime": rfc1123(row.expires_at), "audience": None,
                    "authz_scope": None}

        return json_response(await catalog.call(request, work))

    async def revoke(request: web.Request) -> web.Response:
        # Extension: revoke the presented token (or, for an admin, the token in the body).
        body = await read_json(request, allowed={"token"})
        token = body.get("token") or request.headers.get("X-Rucio-Auth-Token", "")

        def work(session: Session, caller: str) -> None:
            auth.revoke(session, auth.Caller(caller, ""), token)

        await catalog.call(request, work)
        return ok()

    async def ping(_request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def get_account(request: web.Request) -> web.Response:
        name = request.match_info["account"]

        def work(session: Session, caller: str) -> dict[str, Any]:
            return accounts.account_dict(accounts.get_account(
                session, caller if name == "whoami" else name))

        return json_response(await catalog.call(request, work))

    async def add_account(request: web.Request) -> web.Response:
        name = request.match_info["account"]
        body = await read_json(request, allowed={"type", "email"}, required=("type",))

        def work(session: Session, caller: str) -> None:
            _require_admin(session, caller, f"add account {name}")
            accounts.add_account(session, name, str(body["type"]), body.get("email"))

        await catalog.call(request, work)
        return created()

    async def list_accounts(request: web.Request) -> web.Response:
        # Rucio filters on every query argument (account_type, identity, account, or an
        # account attribute), first value of each.
        filters = {key: request.query[key] for key in request.query}

        def work(session: Session, _caller: str) -> list[dict[str, Any]]:
            return accounts.list_accounts(session, filters)

        return stream_response(await catalog.call(request, work))

    async def update_account(request: web.Request) -> web.Response:
        name = request.match_info["account"]
        body = await read_json(request, allowed={"email", "status"})

        def work(session: Session, caller: str) -> None:
            _require_admin(session, caller, f"change the account {name}")
            for key, value in body.items():
                accounts.update_account(session, name, key, value)

        await catalog.call(request, work)
        return ok()

    async def delete_account(request: web.Request) -> web.Response:
        name = request.match_info["account"]

        def work(session: Session, caller: str) -> None:
            _require_admin(session, caller, "delete account")
            accounts.delete_account(session, name)

        await catalog.call(request, work)
        return ok()

    async def list_identities(request: web.Request) -> web.Response:
        name = request.match_info["account"]
        return stream_response(await catalog.call(
            request, lambda s, _c: accounts.list_identities(s, name)))

    async def delete_identity(request: web.Request) -> web.Response:
        name = request.match_info["account"]
        body = await read_json(request, allowed={"identity", "authtype"},
                               required=("identity", "authtype"))

        def work(session: Session, caller: str) -> None:
            _require_admin(session, caller, f"delete identities of account {name}")
            accounts.delete_identity_mapping(session, str(body["identity"]),
                                             str(body["authtype"]), name)

        await catalog.call(request, work)
        return ok()

    async def add_identity(request: web.Request) -> web.Response:
        name = request.match_info["account"]
        body = await read_json(request, allowed={"identity", "authtype", "email", "password",
                                                 "default"},
                               required=("identity", "authtype"))

        def work(session: Session, caller: str) -> None:
            _require_admin(session, caller, f"add identities to account {name}")
            if str(body["authtype"]).upper() != "USERPASS":
                raise HTTPError(400, "InvalidObject", "Only USERPASS identities are supported")
            accounts.add_userpass_identity(session, str(body["identity"]),
                                           str(body.get("password") or ""), name,
                                           body.get("email"), bool(body.get("default")))

        await catalog.call(request, work)
        return created()

    async def list_attributes(request: web.Request) -> web.Response:
        name = request.match_info["account"]
        # A JSON document (the client's list_account_attributes yields it whole).
        return json_response(await catalog.call(
            request, lambda s, _c: accounts.list_attributes(s, name)))

    async def add_attribute(request: web.Request) -> web.Response:
        name, key = request.match_info["account"], request.match_info["key"]
        # Rucio's client also sends the key in the body; the one in the path counts.
        body = await read_json(request, allowed={"key", "value"}, required=("value",))

        def work(session: Session, caller: str) -> None:
            _require_admin(session, caller, "add attributes")
            accounts.add_attribute(session, name, key, body["value"])

        await catalog.call(request, work)
        return created()

    async def delete_attribute(request: web.Request) -> web.Response:
        name, key = request.match_info["account"], request.match_info["key"]

        def work(session: Session, caller: str) -> None:
            _require_admin(session, caller, "delete attribute")
            accounts.delete_attribute(session, name, key)

        await catalog.call(request, work)
        return ok()

    async def add_scope(request: web.Request) -> web.Response:
        account, scope = request.match_info["account"], request.match_info["scope"]

        def work(session: Session, caller: str) -> None:
            scopes.add_scope(session, caller, scope, account)

        await catalog.call(request, work)
        return created()

    async def account_scopes(request: web.Request) -> web.Response:
        account = request.match_info["account"]

        def work(session: Session, _caller: str) -> list[str]:
            found = scopes.scopes_of(session, account)
            if not found:
                raise ScopeNotFound(f"No scopes found for account {account}")
            return found

        return json_response(await catalog.call(request, work))

    async def list_scopes(request: web.Request) -> web.Response:
        def work(session: Session, _caller: str) -> list[str]:
            return [s.scope for s in scopes.list_scopes(session)]

        return json_response(await catalog.call(request, work))

    async def scope_owners(request: web.Request) -> web.Response:
        def work(session: Session, _caller: str) -> list[dict[str, str]]:
            return [{"scope": s.scope, "account": s.account}
                    for s in scopes.list_scopes(session)]

        return json_response(await catalog.call(request, work))

    async def account_rules(request: web.Request) -> web.Response:
        account = request.match_info["account"]

        def work(session: Session, _caller: str) -> list[dict[str, Any]]:
            accounts.get_account(session, account)
            return list_rules(session, {**request.query, "account": account})

        return stream_response(await catalog.call(request, work))

    # --- limits ------------------------------------------------------------------------

    async def set_limit(request: web.Request) -> web.Response:
        account, locality = request.match_info["account"], request.match_info["locality"]
        target = request.match_info["target"]
        body = await read_json(request, allowed={"bytes"}, required=("bytes",))

        def work(session: Session, caller: str) -> None:
            if locality == "local":
                quota.set_local_limit(session, caller, account, target, body["bytes"])
            else:
                quota.set_global_limit(session, caller, account, target, body["bytes"])

        await catalog.call(request, work)
        return created()

    async def delete_limit(request: web.Request) -> web.Response:
        account, locality = request.match_info["account"], request.match_info["locality"]
        target = request.match_info["target"]

        def work(session: Session, caller: str) -> None:
            if locality == "local":
                quota.delete_local_limit(session, caller, account, target)
            else:
                quota.delete_global_limit(session, caller, account, target)

        await catalog.call(request, work)
        return ok()

    async def get_limits(request: web.Request) -> web.Response:
        account, locality = request.match_info["account"], request.match_info["locality"]
        target = request.match_info.get("target")

        def work(session: Session, _caller: str) -> dict[str, Any]:
            if locality == "local":
                limits: dict[str, Any] = quota.local_limits(session, account)
                if target is not None:
                    from stashflow.placement.rses import get_rse

                    get_rse(session, target)
                    return {target: limits.get(target, 0.0)}
                return limits
            found = quota.global_limits(session, account)
            if target is not None:
                return {target: found[target]} if target in found else {}
            return found

        return json_response(await catalog.call(request, work))

    async def get_usage(request: web.Request) -> web.Response:
        account, locality = request.match_info["account"], request.match_info["locality"]
        target = request.match_info.get("target")

        def work(session: Session, _caller: str) -> list[dict[str, Any]]:
            if locality == "local":
                return quota.local_usage(session, account, target)
            rows = quota.global_usage(session, account)
            return [r for r in rows if target is None or r["rse_expression"] == target]

        return stream_response_with_infinity(await catalog.call(request, work))

    limit_path = "/accounts/{account}/limits/{locality:local|global}"
    usage_path = "/accounts/{account}/usage/{locality:local|global}"
    return [
        web.get("/auth/userpass", login),
        web.get("/auth/validate", validate),
        web.post("/stashflow/v1/auth/revoke", revoke),
        web.get("/ping", ping),
        web.get("/accounts", list_accounts), web.get("/accounts/", list_accounts),
        web.get("/accounts/{account}", get_account),
        web.post("/accounts/{account}", add_account),
        web.put("/accounts/{account}", update_account),
        web.delete("/accounts/{account}", delete_account),
        web.post("/accounts/{account}/identities", add_identity),
        web.get("/accounts/{account}/identities", list_identities),
        web.delete("/accounts/{account}/identities", delete_identity),
        web.get("/accounts/{account}/attr", list_attributes),
        web.get("/accounts/{account}/attr/", list_attributes),
        web.post("/accounts/{account}/attr/{key}", add_attribute),
        web.delete("/accounts/{account}/attr/{key}", delete_attribute),
        web.post("/accounts/{account}/scopes/{scope}", add_scope),
        web.get("/accounts/{account}/scopes", account_scopes),
        web.get("/accounts/{account}/scopes/", account_scopes),
        web.get("/accounts/{account}/rules", account_rules),
        web.get("/accounts/{account}/rules/", account_rules),
        web.get("/scopes", list_scopes), web.get("/scopes/", list_scopes),
        web.get("/scopes/owner", scope_owners), web.get("/scopes/owner/", scope_owners),
        web.post(limit_path + "/{target}", set_limit),
        web.delete(limit_path + "/{target}", delete_limit),
        web.get(limit_path, get_limits), web.get(limit_path + "/", get_limits),
        web.get(limit_path + "/{target}", get_limits),
        web.get(usage_path, get_usage), web.get(usage_path + "/", get_usage),
        web.get(usage_path + "/{target}", get_usage),
    ]


def _require_admin(session: Session, caller: str, action: str) -> None:
    if not accounts.is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not {action}")
