"""REST: replicas (registration, listing with PFNs, dataset summaries, states)."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.orm import Session

from stashflow.placement import replicas
from stashflow.placement.exceptions import InvalidObject
from stashflow.placement.rest import (
    Catalog,
    HTTPError,
    created,
    ok,
    read_json,
    stream_lines,
    stream_response,
)

_LIST_KEYS = {"dids", "schemes", "domain", "ignore_availability", "all_states",
              "rse_expression", "client_location", "sort", "nrandom", "signature_lifetime",
              "updated_after", "resolve_archives", "resolve_parents", "unavailable"}


def routes(catalog: Catalog) -> list[web.RouteDef]:
    async def add(request: web.Request) -> web.Response:
        body = await read_json(request, allowed={"rse", "files", "ignore_availability"},
                               required=("rse", "files"))
        if not isinstance(body["rse"], str):
            raise InvalidObject("'rse' must be an RSE name")
        await catalog.call(request, lambda s, c: replicas.add_replicas(
            s, c, body["rse"], body["files"],
            ignore_availability=body.get("ignore_availability", True) is not False))
        return created()

    async def update(request: web.Request) -> web.Response:
        body = await read_json(request, allowed={"rse", "files"}, required=("rse", "files"))
        await catalog.call(request, lambda s, c: replicas.update_states(
            s, c, str(body["rse"]), body["files"]))
        return ok()

    async def delete(request: web.Request) -> web.Response:
        body = await read_json(request, allowed={"rse", "files", "ignore_availability"},
                               required=("rse", "files"))
        await catalog.call(request, lambda s, c: replicas.delete_replicas(
            s, c, str(body["rse"]), body["files"]))
        return ok()

    async def list_(request: web.Request) -> web.Response:
        if "metalink" in request.headers.get("Accept", ""):
            raise HTTPError(406, "UnsupportedRequestedContentType",
                            "Metalink responses are not supported by this server; ask for "
                            "application/x-json-stream")
        body = await read_json(request, allowed=_LIST_KEYS, required=("dids",))
        schemes = body.get("schemes")
        if schemes is not None and (not isinstance(schemes, list)
                                    or not all(isinstance(s, str) for s in schemes)):
            raise InvalidObject("'schemes' must be a list of strings")
        sort = body.get("sort")
        domain = body.get("domain")
        if domain not in (None, "lan", "wan", "all"):
            raise InvalidObject("'domain' must be lan, wan or all")
        nrandom = body.get("nrandom")
        if nrandom is not None and (not isinstance(nrandom, int) or nrandom < 1):
            raise InvalidObject("'nrandom' must be a positive integer")

        def work(session: Session, _caller: str) -> replicas.Listing:
            return replicas.gather_replicas(
                session, body["dids"], schemes=schemes,
                all_states=bool(body.get("all_states")),
                rse_expression=body.get("rse_expression"), sort=sort, domain=domain,
                resolve_parents=bool(body.get("resolve_parents")), nrandom=nrandom)

        listing = await catalog.call(request, work)
        return await stream_lines(request, listing.lines())

    async def datasets(request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        scope, _, name = tail.partition("/")
        if not scope or not name:
            raise InvalidObject(f"Cannot extract a scope and a name from '{tail[:200]}'")
        return stream_response(await catalog.call(
            request, lambda s, _c: replicas.dataset_replicas(s, scope, name)))

    return [
        web.post("/replicas", add), web.post("/replicas/", add),
        web.put("/replicas", update), web.put("/replicas/", update),
        web.delete("/replicas", delete), web.delete("/replicas/", delete),
        web.post("/replicas/list", list_), web.post("/replicas/list/", list_),
        web.get("/replicas/{tail:.+}/datasets", datasets),
    ]
