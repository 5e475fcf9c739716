"""REST: DIDs. Paths are `/dids/{scope}/{name}[/suffix]` where the name may contain
slashes (the client sends them as %2F, which arrives decoded), so one route takes the
whole tail and splits it the way Rucio does: first segment = scope, the rest = name."""

from __future__ import annotations

import ast
from typing import Any

from aiohttp import web
from sqlalchemy.orm import Session

from stashflow.placement import dids, rules
from stashflow.placement.exceptions import InvalidObject
from stashflow.placement.models import DIDType
from stashflow.placement.rest import (
    Catalog,
    HTTPError,
    created,
    json_response,
    ok,
    query_flag,
    read_json,
    stream_response,
)

_SUFFIXES = ("dids", "meta", "status", "rules", "files", "parents", "associated_rules")
_FILTER_MAX = 10_000


def split_did(tail: str) -> tuple[str, str, str]:
    """(scope, name, suffix) from the path after /dids/."""
    scope, _, rest = tail.partition("/")
    if not scope or not rest:
        raise InvalidObject(f"Cannot extract a scope and a name from '{tail[:200]}'")
    for suffix in _SUFFIXES:
        if rest.endswith("/" + suffix):
            return scope, rest[: -len(suffix) - 1], suffix
    if "/meta/" in rest:
        name, _, key = rest.rpartition("/meta/")
        return scope, name, "meta/" + key
    return scope, rest, ""


def parse_filters(raw: str | None) -> list[dict[str, Any]]:
    """`filters` is the str() of a list of dicts; literal_eval only, never eval."""
    if not raw:
        return []
    if len(raw) > _FILTER_MAX:
        raise HTTPError(400, "InvalidObject", "The filters parameter is too long")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise HTTPError(400, "InvalidObject", "The filters parameter is not a literal list "
                                              "of dictionaries") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(g, dict) for g in value):
        raise HTTPError(400, "InvalidObject", "The filters parameter must be a list of "
                                              "dictionaries")
    return value


_ADD_DID_KEYS = {"type", "statuses", "meta", "rules", "lifetime", "dids", "rse"}
_ATTACH_KEYS = {"dids", "rse"}


def _add_did(session: Session, caller: str, scope: str, name: str,
             body: dict[str, Any]) -> None:
    did_type = dids.parse_type(body.get("type"), (DIDType.DATASET, DIDType.CONTAINER))
    statuses = body.get("statuses") or {}
    if not isinstance(statuses, dict):
        raise InvalidObject("'statuses' must be an object")
    meta = body.get("meta") or {}
    if not isinstance(meta, dict):
        raise InvalidObject("'meta' must be an object")
    dids.add_collection(session, caller, scope, name, did_type,
                        monotonic=bool(statuses.get("monotonic", False)), meta=meta,
                        lifetime=body.get("lifetime"))
    content = body.get("dids")
    if content:
        dids.attach(session, caller, scope, name, content, rse=body.get("rse"))
    for rule in body.get("rules") or []:
        if not isinstance(rule, dict):
            raise InvalidObject("'rules' must be a list of rule objects")
        options = rules.parse_options(caller, rule)
        rules.add_rules(session, caller, [{"scope": scope, "name": name}], options)


def routes(catalog: Catalog) -> list[web.RouteDef]:
    async def bulk_add(request: web.Request) -> web.Response:
        body = await read_json(request, kind=list)

        def work(session: Session, caller: str) -> None:
            for item in body:
                if not isinstance(item, dict):
                    raise InvalidObject("Every DID must be an object")
                unknown = set(item) - _ADD_DID_KEYS - {"scope", "name", "account"}
                if unknown:
                    raise InvalidObject(f"Unknown field(s): {', '.join(sorted(unknown))}")
                _add_did(session, caller, str(item.get("scope")),
                         str(item.get("name")), item)

        await catalog.call(request, work)
        return created()

    async def bulk_attach(request: web.Request) -> web.Response:
        body = await read_json(request, allowed={"attachments", "ignore_duplicate"},
                               required=("attachments",))

        def work(session: Session, caller: str) -> None:
            attachments = body["attachments"]
            if not isinstance(attachments, list):
                raise InvalidObject("'attachments' must be a list")
            for item in attachments:
                if not isinstance(item, dict):
                    raise InvalidObject("Every attachment must be an object")
                dids.attach(session, caller, str(item.get("scope")), str(item.get("name")),
                            item.get("dids") or [], rse=item.get("rse"),
                            ignore_duplicate=bool(body.get("ignore_duplicate")))

        await catalog.call(request, work)
        return created()

    async def search(request: web.Request) -> web.Response:
        scope = request.match_info["scope"]
        filters = parse_filters(request.query.get("filters"))
        did_type = request.query.get("type", "collection")
        long = query_flag(request, "long")

        def work(session: Session, _caller: str) -> list[Any]:
            return dids.search(session, scope, filters, did_type, long)

        return stream_response(await catalog.call(request, work))

    async def get(request: web.Request) -> web.Response:
        scope, name, suffix = split_did(request.match_info["tail"])
        if suffix == "":
            dynamic = "dynamic_depth" in request.query or query_flag(request, "dynamic")

            def one(session: Session, _caller: str) -> dict[str, Any]:
                return dids.did_dict(session, dids.get_did(session, scope, name), dynamic)

            return json_response(await catalog.call(request, one))
        if suffix == "dids":
            return stream_response(await catalog.call(
                request, lambda s, _c: dids.list_content(s, scope, name)))
        if suffix == "files":
            def files(session: Session, _caller: str) -> list[dict[str, Any]]:
                return [{"scope": f.scope, "name": f.name, "bytes": f.bytes,
                         "adler32": f.adler32, "md5": f.md5, "guid": f.guid,
                         "events": f.events, "lumiblocknr": f.lumiblocknr}
                        for f in dids.iter_files(session, scope, name, meta=True)]

            return stream_response(await catalog.call(request, files))
        if suffix == "meta":
            plugin = request.query.get("plugin", "DID_COLUMN")
            return json_response(await catalog.call(
                request, lambda s, _c: dids.get_metadata(s, scope, name, plugin)))
        if suffix == "rules":
            return stream_response(await catalog.call(
                request, lambda s, _c: rules.did_rules(s, scope, name)))
        if suffix == "parents":
            return stream_response(await catalog.call(
                request, lambda s, _c: dids.list_parents(s, scope, name)))
        if suffix == "associated_rules":
            return stream_response(await catalog.call(
                request, lambda s, _c: rules.associated_rules_for_file(s, scope, name)))
        raise web.HTTPNotFound(reason=f"Unknown DID resource '{suffix}'")

    async def post(request: web.Request) -> web.Response:
        scope, name, suffix = split_did(request.match_info["tail"])
        if suffix == "":
            body = await read_json(request, allowed=_ADD_DID_KEYS, required=("type",))
            await catalog.call(request, lambda s, c: _add_did(s, c, scope, name, body))
            return created()
        if suffix == "dids":
            body = await read_json(request, allowed=_ATTACH_KEYS, required=("dids",))
            await catalog.call(request, lambda s, c: dids.attach(
                s, c, scope, name, body["dids"], rse=body.get("rse")))
            return created()
        if suffix == "meta":
            body = await read_json(request, allowed={"meta", "recursive"}, required=("meta",))
            if not isinstance(body["meta"], dict):
                raise InvalidObject("'meta' must be an object")

            def bulk(session: Session, caller: str) -> None:
                for key, value in body["meta"].items():
                    dids.set_metadata(session, caller, scope, name, key, value)

            await catalog.call(request, bulk)
            return created()
        if suffix.startswith("meta/"):
            key = suffix[len("meta/"):]
            body = await read_json(request, allowed={"value", "recursive"},
                                   required=("value",))
            await catalog.call(request, lambda s, c: dids.set_metadata(
                s, c, scope, name, key, body["value"]))
            return created()
        raise web.HTTPMethodNotAllowed("POST", ["GET"])

    async def put(request: web.Request) -> web.Response:
        scope, name, suffix = split_did(request.match_info["tail"])
        if suffix != "status":
            raise web.HTTPMethodNotAllowed("PUT", ["GET", "POST"])
        body = await read_json(request, allowed={"open", "monotonic"})
        await catalog.call(request, lambda s, c: dids.set_status(s, c, scope, name, body))
        return ok()

    async def delete(request: web.Request) -> web.Response:
        scope, name, suffix = split_did(request.match_info["tail"])
        if suffix == "dids":
            body = await read_json(request, allowed={"dids"}, required=("dids",))
            await catalog.call(request, lambda s, c: dids.detach(s, c, scope, name,
                                                                  body["dids"]))
            return ok()
        if suffix == "meta":
            key = request.query.get("key")
            if not key:
                raise InvalidObject("The 'key' query parameter is required")
            await catalog.call(request, lambda s, c: dids.delete_metadata(s, c, scope, name,
                                                                           key))
            return ok()
        raise web.HTTPMethodNotAllowed("DELETE", ["GET", "POST"])

    return [
        web.post("/dids", bulk_add), web.post("/dids/", bulk_add),
        web.post("/dids/attachments", bulk_attach),
        web.get("/dids/{scope}/dids/search", search),
        web.get("/dids/{tail:.+}", get),
        web.post("/dids/{tail:.+}", post),
        web.put("/dids/{tail:.+}", put),
        web.delete("/dids/{tail:.+}", delete),
    ]
