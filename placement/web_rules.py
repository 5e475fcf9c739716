"""REST: replication rules and their locks."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy.orm import Session

from stashflow.placement import rules
from stashflow.placement.rest import (
    Catalog,
    HTTPError,
    json_response,
    ok,
    read_json,
    stream_response,
)

_ADD_KEYS = {"dids", "copies", "rse_expression", "weight", "lifetime", "grouping", "account",
             "locked", "source_replica_expression", "activity", "notify", "purge_replicas",
             "ignore_availability", "comment", "ask_approval", "asynchronous",
             "delay_injection", "priority", "meta", "split_container",
             "ignore_account_limit"}


def routes(catalog: Catalog) -> list[web.RouteDef]:
    async def add(request: web.Request) -> web.Response:
        body = await read_json(request, allowed=_ADD_KEYS,
                               required=("dids", "copies", "rse_expression"))

        def work(session: Session, caller: str) -> list[str]:
            options = rules.parse_options(caller, body)
            return rules.add_rules(session, caller, body["dids"], options)

        ids = await catalog.call(request, work)
        # Rucio answers with text/html here; the client reads r.text, so any type works.
        return web.Response(status=201, text=json_response(ids).text,
                            content_type="text/html")

    async def list_(request: web.Request) -> web.Response:
        filters = dict(request.query)
        return stream_response(await catalog.call(
            request, lambda s, _c: rules.list_rules(s, filters)))

    async def get(request: web.Request) -> web.Response:
        rule_id = request.match_info["rule_id"]
        return json_response(await catalog.call(
            request, lambda s, _c: rules.rule_dict(rules.get_rule(s, rule_id))))

    async def delete(request: web.Request) -> web.Response:
        rule_id = request.match_info["rule_id"]
        body = await read_json(request, allowed={"purge_replicas"})
        purge = body.get("purge_replicas")
        if purge is not None and not isinstance(purge, bool):
            purge = None if purge in ("", "None") else str(purge).lower() == "true"
        await catalog.call(request, lambda s, c: rules.delete_rule(s, c, rule_id, purge))
        return ok()

    async def update(request: web.Request) -> web.Response:
        rule_id = request.match_info["rule_id"]
        body = await read_json(request, allowed={"options"}, required=("options",))
        await catalog.call(request, lambda s, c: rules.update_rule(s, c, rule_id,
                                                                    body["options"]))
        return ok()

    async def analysis(request: web.Request) -> web.Response:
        rule_id = request.match_info["rule_id"]
        return json_response(await catalog.call(request,
                                                lambda s, _c: rules.examine(s, rule_id)))

    async def locks(request: web.Request) -> web.Response:
        rule_id = request.match_info["rule_id"]

        def work(session: Session, _caller: str) -> list[dict[str, Any]]:
            return rules.list_locks(session, rule_id)

        return stream_response(await catalog.call(request, work))

    async def dataset_locks(request: web.Request) -> web.Response:
        # /locks/{scope}/{name}: the name may hold slashes, so the tail is split here.
        scope, _, name = request.match_info["tail"].partition("/")
        if request.query.get("did_type") != "dataset":
            # Rucio answers a bare 500 with this text for any other did_type.
            raise HTTPError(500, "ValueError", "Wrong did_type specified")
        if not scope or not name:
            raise HTTPError(400, "ValueError", "Cannot extract a scope and a name")
        return stream_response(await catalog.call(
            request, lambda s, _c: rules.dataset_locks(s, scope, name)))

    return [
        web.get("/locks/{tail:.+}", dataset_locks),
        web.post("/rules", add), web.post("/rules/", add),
        web.get("/rules", list_), web.get("/rules/", list_),
        web.get("/rules/{rule_id}", get), web.delete("/rules/{rule_id}", delete),
        web.put("/rules/{rule_id}", update),
        web.get("/rules/{rule_id}/analysis", analysis),
        web.get("/rules/{rule_id}/locks", locks),
    ]
