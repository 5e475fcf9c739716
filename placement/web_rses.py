"""REST: RSEs, attributes, protocols, limits, usage, distances."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy.orm import Session

from stashflow.placement import accounts, rses
from stashflow.placement.exceptions import AccessDenied, InvalidObject, RSEProtocolNotSupported
from stashflow.placement.rest import (
    Catalog,
    created,
    json_response,
    ok,
    read_json,
    stream_response,
)


def _boolean(name: str, value: Any) -> bool:
    """A boolean as Rucio's param_get_bool reads it: JSON true/false or the strings
    true/false/1/0 in any case (the client puts `bidirectional=False` in query strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).lower() if isinstance(value, str | int) else ""
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise InvalidObject(f"'{name}' must be true or false, not {value!r}")


def _admin(session: Session, caller: str, action: str) -> None:
    if not accounts.is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not {action}")


def routes(catalog: Catalog) -> list[web.RouteDef]:
    async def list_(request: web.Request) -> web.Response:
        expression = request.query.get("expression")

        def work(session: Session, _caller: str) -> list[dict[str, Any]]:
            if expression is not None:
                return [{"rse": r.rse, "id": r.id, "vo": r.vo}
                        for r in rses.resolve(session, expression)]
            return [rses.rse_dict(r) for r in rses.list_rses(session)]

        return stream_response(await catalog.call(request, work))

    async def add(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        body = await read_json(request)

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"add RSE {name}")
            rses.add_rse(session, name, body)

        await catalog.call(request, work)
        return created()

    async def update(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        body = await read_json(request)

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"update RSE {name}")
            rses.update_rse(session, name, body)

        await catalog.call(request, work)
        # 201 as in Rucio: the client's update_rse treats anything else as an error.
        return created()

    async def remove(request: web.Request) -> web.Response:
        name = request.match_info["rse"]

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"delete RSE {name}")
            rses.delete_rse(session, name)

        await catalog.call(request, work)
        return ok()

    async def show(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        return json_response(await catalog.call(
            request, lambda s, _c: rses.rse_info(s, rses.get_rse(s, name))))

    async def attributes(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        return json_response(await catalog.call(
            request, lambda s, _c: rses.list_attributes(s, rses.get_rse(s, name))))

    async def set_attribute(request: web.Request) -> web.Response:
        name, key = request.match_info["rse"], request.match_info["key"]
        body = await read_json(request, allowed={"value"}, required=("value",))

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"set attributes of RSE {name}")
            rses.set_attribute(session, name, key, body["value"])

        await catalog.call(request, work)
        return created()

    async def delete_attribute(request: web.Request) -> web.Response:
        name, key = request.match_info["rse"], request.match_info["key"]

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"delete attributes of RSE {name}")
            rses.delete_attribute(session, name, key)

        await catalog.call(request, work)
        return ok()

    async def protocols(request: web.Request) -> web.Response:
        name = request.match_info["rse"]

        def work(session: Session, _caller: str) -> dict[str, Any]:
            row = rses.get_rse(session, name)
            found = rses.protocols_of(session, row)
            if not found:
                raise RSEProtocolNotSupported(f"RSE '{name}' has no protocols")
            info = rses.rse_info(session, row)
            info["protocols"] = [rses.protocol_dict(p) for p in found]
            return info

        return json_response(await catalog.call(request, work))

    async def scheme_protocols(request: web.Request) -> web.Response:
        name, scheme = request.match_info["rse"], request.match_info["scheme"]

        def work(session: Session, _caller: str) -> list[dict[str, Any]]:
            found = [rses.protocol_dict(p) for p in
                     rses.protocols_of(session, rses.get_rse(session, name))
                     if p.scheme == scheme]
            if not found:
                raise RSEProtocolNotSupported(f"RSE '{name}' has no {scheme} protocol")
            return found

        return json_response(await catalog.call(request, work))

    async def add_protocol(request: web.Request) -> web.Response:
        name, scheme = request.match_info["rse"], request.match_info["scheme"]
        body = await read_json(request, allowed={"hostname", "scheme", "port", "impl",
                                                 "prefix", "domains", "extended_attributes"})
        if body.get("scheme", scheme) != scheme:
            raise InvalidObject("The scheme in the body differs from the one in the path")
        body["scheme"] = scheme

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"add protocols to RSE {name}")
            rses.add_protocol(session, name, body)

        await catalog.call(request, work)
        return created()

    async def delete_protocol(request: web.Request) -> web.Response:
        info = request.match_info
        port_text = info.get("port")
        try:
            port = None if port_text is None else int(port_text)
        except ValueError:
            raise InvalidObject(f"Invalid port {port_text!r}") from None

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"delete protocols of RSE {info['rse']}")
            rses.delete_protocols(session, info["rse"], info["scheme"], info.get("hostname"),
                                  port)

        await catalog.call(request, work)
        return ok()

    async def get_usage(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        return stream_response(await catalog.call(
            request, lambda s, _c: rses.usage_of(s, rses.get_rse(s, name))))

    async def set_usage(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        body = await read_json(request, allowed={"source", "used", "free", "files"},
                               required=("source",))

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"set the usage of RSE {name}")
            for key in ("used", "free", "files"):
                if body.get(key) is not None and not isinstance(body[key], int):
                    raise InvalidObject(f"'{key}' must be an integer")
            rses.set_usage(session, name, str(body["source"]), body.get("used"),
                           body.get("free"), body.get("files"))

        await catalog.call(request, work)
        return ok()

    async def get_limits(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        return json_response(await catalog.call(
            request, lambda s, _c: rses.limits_of(s, rses.get_rse(s, name))))

    async def set_limit(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        body = await read_json(request, allowed={"name", "value"}, required=("name", "value"))
        if not isinstance(body["value"], int) or isinstance(body["value"], bool):
            raise InvalidObject("An RSE limit must be an integer number of bytes")

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"set limits of RSE {name}")
            rses.set_limit(session, name, str(body["name"]), body["value"])

        await catalog.call(request, work)
        return ok()

    async def delete_limits(request: web.Request) -> web.Response:
        name = request.match_info["rse"]
        # As in Rucio 41: `name` is required in the body; null removes every limit, and
        # removing a limit that is not there is not an error.
        body = await read_json(request, allowed={"name"}, required=("name",))
        limit = body["name"]
        if limit is not None and not isinstance(limit, str):
            raise InvalidObject("An RSE limit name must be a string")

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, f"update RSE limits for RSE {name}")
            rses.delete_limits(session, name, limit)

        await catalog.call(request, work)
        return ok()

    async def set_distance(request: web.Request) -> web.Response:
        source, dest = request.match_info["rse"], request.match_info["dest"]
        body = await read_json(request, allowed={"distance", "bidirectional", "ranking"},
                               required=("distance",))

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, "set distances")
            distance = body["distance"]
            rses.set_distance(session, source, dest, distance)
            if _boolean("bidirectional", body.get("bidirectional", False)):
                rses.set_distance(session, dest, source, distance)

        await catalog.call(request, work)
        return created()

    async def update_distance(request: web.Request) -> web.Response:
        source, dest = request.match_info["rse"], request.match_info["dest"]
        # rucio-clients' update_distance always sends `bidirectional`; `ranking` is the
        # old name of `distance`, still read by Rucio.
        body = await read_json(request, allowed={"distance", "ranking", "bidirectional"})
        distance = body.get("distance", body.get("ranking"))
        if distance is None:
            raise InvalidObject("'distance' not defined")
        bidirectional = _boolean("bidirectional", body.get("bidirectional", False))

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, "set distances")
            rses.update_distance(session, source, dest, distance, bidirectional)

        await catalog.call(request, work)
        return ok()

    async def get_distance(request: web.Request) -> web.Response:
        source, dest = request.match_info["rse"], request.match_info["dest"]
        return json_response(await catalog.call(
            request, lambda s, _c: rses.distances_from(s, source, dest)))

    async def delete_distance(request: web.Request) -> web.Response:
        source, dest = request.match_info["rse"], request.match_info["dest"]
        bidirectional = _boolean("bidirectional", request.query.get("bidirectional", False))

        def work(session: Session, caller: str) -> None:
            _admin(session, caller, "delete distances")
            rses.delete_distance(session, source, dest, bidirectional)

        await catalog.call(request, work)
        return ok()

    base = "/rses/{rse}"
    proto = base + "/protocols/{scheme}"
    return [
        web.get("/rses", list_), web.get("/rses/", list_),
        web.post(base, add), web.put(base, update), web.delete(base, remove),
        web.get(base, show), web.get(base + "/", show),
        web.get(base + "/attr", attributes), web.get(base + "/attr/", attributes),
        web.post(base + "/attr/{key}", set_attribute),
        web.delete(base + "/attr/{key}", delete_attribute),
        web.get(base + "/protocols", protocols), web.get(base + "/protocols/", protocols),
        web.post(proto, add_protocol), web.get(proto, scheme_protocols),
        web.delete(proto, delete_protocol),
        web.delete(proto + "/{hostname}", delete_protocol),
        web.delete(proto + "/{hostname}/{port}", delete_protocol),
        web.get(base + "/usage", get_usage), web.put(base + "/usage", set_usage),
        web.get(base + "/limits", get_limits), web.put(base + "/limits", set_limit),
        web.delete(base + "/limits", delete_limits),
        web.post(base + "/distances/{dest}", set_distance),
        web.put(base + "/distances/{dest}", update_distance),
        web.get(base + "/distances/{dest}", get_distance),
        web.delete(base + "/distances/{dest}", delete_distance),
    ]
