"""RSEs (storage endpoints): creation, attributes, protocols, limits, usage, distances,
expression resolution and the deterministic DID-to-path mapping."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from stashflow.placement import naming
from stashflow.placement.clock import rfc1123, utcnow
from stashflow.placement.exceptions import (
    Duplicate,
    InvalidObject,
    RSEAttributeNotFound,
    RSENotFound,
    RSEProtocolNotSupported,
)
from stashflow.placement.models import (
    RSE,
    Distance,
    RSEAttribute,
    RSELimit,
    RSEProtocol,
    RSEType,
    RSEUsage,
)
from stashflow.placement.rse_expression import RSEView, evaluate

# Columns an expression's `key=value` may test, and that `POST /rses/{rse}` may set.
EXPRESSION_COLUMNS = (
    "rse", "vo", "rse_type", "deterministic", "volatile", "staging_area", "city",
    "region_code", "country_name", "continent", "time_zone", "ISP", "ASN", "longitude",
    "latitude", "availability_read", "availability_write", "availability_delete", "qos_class",
    "id",
)
_SETTABLE = {
    "deterministic": bool, "volatile": bool, "staging_area": bool, "city": str,
    "region_code": str, "country_name": str, "continent": str, "time_zone": str, "ISP": str,
    "ASN": str, "longitude": float, "latitude": float, "availability_read": bool,
    "availability_write": bool, "availability_delete": bool, "qos_class": str,
}
_DOMAIN_FIELDS = {
    ("lan", "read"): "read_lan", ("lan", "write"): "write_lan",
    ("lan", "delete"): "delete_lan", ("wan", "read"): "read_wan",
    ("wan", "write"): "write_wan", ("wan", "delete"): "delete_wan",
    ("wan", "third_party_copy_read"): "third_party_copy_read",
    ("wan", "third_party_copy_write"): "third_party_copy_write",
    # Older clients say third_party_copy for both directions.
    ("wan", "third_party_copy"): "third_party_copy_read",
}


def get_rse(session: Session, name: str) -> RSE:
    row = session.scalar(select(RSE).where(RSE.rse == name, RSE.deleted.is_(False)))
    if row is None:
        raise RSENotFound(f"RSE '{name}' cannot be found")
    return row




def add_rse(session: Session, name: str, options: dict[str, Any]) -> RSE:
    naming.rse(name)
    if session.scalar(select(RSE.id).where(RSE.rse == name)) is not None:
        raise Duplicate(f"RSE '{name}' already exists")
    row = RSE(id=uuid.uuid4().hex, rse=name)
    _apply_options(row, options)
    session.add(row)
    session.flush()
    # Rucio gives every RSE the attribute <NAME>=True, which is what makes a bare RSE name
    # a valid expression.
    session.add(RSEAttribute(rse_id=row.id, key=name, value=True))
    session.flush()
    return row


def _apply_options(row: RSE, options: dict[str, Any]) -> None:
    for key, value in options.items():
        if key in ("rse", "vo"):
            continue
        if key == "rse_type":
            try:
                row.rse_type = RSEType[str(value).upper()]
            except KeyError:
                raise InvalidObject(f"Invalid rse_type {value!r} for RSE '{row.rse}'") from None
        elif key == "availability":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 7:
                raise InvalidObject(f"availability of RSE '{row.rse}' must be 0..7")
            row.availability_read = bool(value & 4)
            row.availability_write = bool(value & 2)
            row.availability_delete = bool(value & 1)
        elif key in _SETTABLE:
            kind = _SETTABLE[key]
            if value is not None and kind is bool and not isinstance(value, bool):
                raise InvalidObject(f"{key} of RSE '{row.rse}' must be true or false")
            if value is not None and kind is float:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise InvalidObject(f"{key} of RSE '{row.rse}' must be a number") from None
            if value is not None and kind is str and not isinstance(value, str):
                raise InvalidObject(f"{key} of RSE '{row.rse}' must be a string")
            setattr(row, key, value)
        else:
            raise InvalidObject(f"Unknown RSE property {key!r} for RSE '{row.rse}'")


def update_rse(session: Session, name: str, options: dict[str, Any]) -> None:
    _apply_options(get_rse(session, name), options)


def delete_rse(session: Session, name: str) -> None:
    row = get_rse(session, name)
    row.deleted = True
    row.deleted_at = utcnow()


def availability(row: RSE) -> int:
    return (4 * row.availability_read) + (2 * row.availability_write) + \
        int(row.availability_delete)


def rse_dict(row: RSE) -> dict[str, Any]:
    return {
        "id": row.id, "rse": row.rse, "vo": row.vo, "rse_type": row.rse_type.value,
        "deterministic": row.deterministic, "volatile": row.volatile,
        "staging_area": row.staging_area, "city": row.city, "region_code": row.region_code,
        "country_name": row.country_name, "continent": row.continent,
        "time_zone": row.time_zone, "ISP": row.ISP, "ASN": row.ASN,
        "longitude": row.longitude, "latitude": row.latitude,
        "availability": availability(row), "availability_read": row.availability_read,
        "availability_write": row.availability_write,
        "availability_delete": row.availability_delete, "qos_class": row.qos_class,
        "deleted": row.deleted, "deleted_at": rfc1123(row.deleted_at),
        "created_at": rfc1123(row.created_at), "updated_at": rfc1123(row.updated_at),
    }


def rse_info(session: Session, row: RSE) -> dict[str, Any]:
    """`GET /rses/{rse}`: the shape rsemanager and `rucio rse show` expect."""
    attributes = list_attributes(session, row)
    return {
        "rse": row.rse, "id": row.id, "rse_type": row.rse_type.value,
        "deterministic": row.deterministic, "volatile": row.volatile,
        "staging_area": row.staging_area, "availability_read": row.availability_read,
        "availability_write": row.availability_write,
        "availability_delete": row.availability_delete, "availability": availability(row),
        "credentials": None, "domain": ["lan", "wan"],
        "lfn2pfn_algorithm": attributes.get("lfn2pfn_algorithm", "hash"),
        "qos_class": row.qos_class, "sign_url": attributes.get("sign_url"),
        "verify_checksum": attributes.get("verify_checksum", True),
        "protocols": [protocol_dict(p) for p in protocols_of(session, row)],
    }


def list_rses(session: Session) -> list[RSE]:
    return list(session.scalars(select(RSE).where(RSE.deleted.is_(False)).order_by(RSE.rse)))


def views(session: Session) -> list[RSEView]:
    rows = list_rses(session)
    attributes: dict[str, dict[str, Any]] = {row.id: {} for row in rows}
    for attr in session.scalars(select(RSEAttribute)):
        if attr.rse_id in attributes:
            attributes[attr.rse_id][attr.key] = attr.value
    return [
        RSEView(id=row.id, rse=row.rse,
                columns={c: getattr(row, c) for c in EXPRESSION_COLUMNS},
                attributes=attributes[row.id])
        for row in rows
    ]


def resolve(session: Session, expression: str) -> list[RSE]:
    """The RSEs an expression selects, sorted by name; raises InvalidRSEExpression."""
    ids = evaluate(expression, views(session))
    return sorted((session.get(RSE, i) for i in ids), key=lambda r: r.rse)


# --- attributes ----------------------------------------------------------------------


def _attribute_value(value: Any) -> Any:
    # The CLI sends every value as a string; booleans become real booleans, as Rucio does.
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise InvalidObject(f"RSE attribute values must be strings, numbers or booleans, not "
                        f"{type(value).__name__}")


def set_attribute(session: Session, rse: str, key: str, value: Any) -> None:
    """Add or overwrite an attribute: Rucio merges the row, and `rucio rse attribute set`
    on an existing key is how operators change a value."""
    naming.rse_attribute_key(key)
    row = get_rse(session, rse)
    converted = _attribute_value(value)
    existing = session.get(RSEAttribute, (row.id, key))
    if existing is not None:
        existing.value = converted
    else:
        session.add(RSEAttribute(rse_id=row.id, key=key, value=converted))
    session.flush()


def delete_attribute(session: Session, rse: str, key: str) -> None:
    row = get_rse(session, rse)
    attr = session.get(RSEAttribute, (row.id, key))
    if attr is None:
        raise RSEAttributeNotFound(f"RSE '{rse}' has no attribute '{key}'")
    session.delete(attr)


def list_attributes(session: Session, row: RSE) -> dict[str, Any]:
    return {a.key: a.value for a in session.scalars(
        select(RSEAttribute).where(RSEAttribute.rse_id == row.id).order_by(RSEAttribute.key))}


# --- protocols -----------------------------------------------------------------------

def add_protocol(session: Session, rse: str, data: dict[str, Any]) -> None:
    row = get_rse(session, rse)
    scheme = data.get("scheme")
    hostname = data.get("hostname") or "localhost"
    port = data.get("port")
    if not isinstance(scheme, str) or not scheme:
        raise InvalidObject(f"A protocol of RSE '{rse}' needs a scheme")
    if port is None:
        # Rucio's default (core/rse.py add_protocol): port 0, "the scheme's own port",
        # which PFNs then leave out.
        port = 0
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidObject(f"Invalid port {port!r} for the {scheme} protocol of '{rse}'")
    if not isinstance(hostname, str):
        raise InvalidObject(f"Invalid hostname for the {scheme} protocol of '{rse}'")
    impl = data.get("impl")
    if not isinstance(impl, str) or not impl:
        # Rucio's impl column is NOT NULL and its add_protocol turns the violation into
        # this InvalidObject; the CLI always sends its default implementation.
        raise InvalidObject("Missing values!")
    if session.get(RSEProtocol, (row.id, scheme, hostname, port)) is not None:
        raise Duplicate(f"Protocol {scheme}://{hostname}:{port} already exists on '{rse}'")
    protocol = RSEProtocol(rse_id=row.id, scheme=scheme, hostname=hostname, port=port,
                           prefix=data.get("prefix") or "", impl=impl,
                           extended_attributes=data.get("extended_attributes"))
    domains = data.get("domains") or {}
    if not isinstance(domains, dict):
        raise InvalidObject(f"'domains' of the {scheme} protocol of '{rse}' must be an object")
    for domain, operations in domains.items():
        if not isinstance(operations, dict):
            raise InvalidObject(f"Domain {domain!r} of the {scheme} protocol must be an object")
        for operation, priority in operations.items():
            column = _DOMAIN_FIELDS.get((domain, operation))
            if column is None:
                raise InvalidObject(f"Unknown protocol domain/operation {domain}/{operation}")
            if priority is not None and (not isinstance(priority, int)
                                         or isinstance(priority, bool) or priority < 0):
                raise InvalidObject(f"Priority of {domain}/{operation} must be an integer "
                                    f">= 0")
            # As in Rucio, 0 is a valid priority (the highest); only None disables.
            setattr(protocol, column, priority)
            if operation == "third_party_copy":
                protocol.third_party_copy_write = priority
    session.add(protocol)
    session.flush()


def protocols_of(session: Session, row: RSE) -> list[RSEProtocol]:
    return list(session.scalars(select(RSEProtocol).where(RSEProtocol.rse_id == row.id)
                                .order_by(RSEProtocol.scheme, RSEProtocol.hostname)))


def protocol_dict(p: RSEProtocol) -> dict[str, Any]:
    return {
        "hostname": p.hostname, "scheme": p.scheme, "port": p.port, "prefix": p.prefix,
        "impl": p.impl,
        "domains": {
            "lan": {"read": p.read_lan, "write": p.write_lan, "delete": p.delete_lan},
            "wan": {"read": p.read_wan, "write": p.write_wan, "delete": p.delete_wan,
                    "third_party_copy_read": p.third_party_copy_read,
                    "third_party_copy_write": p.third_party_copy_write},
        },
        "extended_attributes": p.extended_attributes,
    }


def delete_protocols(session: Session, rse: str, scheme: str, hostname: str | None = None,
                     port: int | None = None) -> None:
    row = get_rse(session, rse)
    query = select(RSEProtocol).where(RSEProtocol.rse_id == row.id,
                                      RSEProtocol.scheme == scheme)
    if hostname is not None:
        query = query.where(RSEProtocol.hostname == hostname)
    if port is not None:
        query = query.where(RSEProtocol.port == port)
    found = list(session.scalars(query))
    if not found:
        raise RSEProtocolNotSupported(f"RSE '{rse}' has no protocol {scheme} matching "
                                      f"{hostname or '*'}:{port or '*'}")
    for protocol in found:
        session.delete(protocol)


def pfn_prefix(protocol: RSEProtocol) -> str:
    """`scheme://host[:port]/prefix` without a trailing slash. As Rucio's protocols do,
    the port is written whenever it is not 0, even when it is the scheme's default:
    clients compare PFNs as strings."""
    prefix = (protocol.prefix or "").rstrip("/")
    port = "" if protocol.port == 0 else f":{protocol.port}"
    return f"{protocol.scheme}://{protocol.hostname}{port}{prefix}"


def pfn_for(protocol: RSEProtocol, path: str) -> str:
    return pfn_prefix(protocol) + (path if path.startswith("/") else "/" + path)


def deterministic_path(scope: str, name: str) -> str:
    """Rucio's `hash` lfn2pfn: <scope>/<md5[0:2]>/<md5[2:4]>/<name> (under the prefix)."""
    digest = hashlib.md5(f"{scope}:{name}".encode()).hexdigest()
    if scope.startswith(("user.", "group.")):
        # Rucio's convention: user.jdoe -> user/jdoe, so per-user trees stay apart.
        scope = scope.replace(".", "/")
    return f"{scope}/{digest[0:2]}/{digest[2:4]}/{name}"


# --- limits, usage, distances ----------------------------------------------------------


def set_limit(session: Session, rse: str, name: str, value: int) -> None:
    row = get_rse(session, rse)
    limit = session.get(RSELimit, (row.id, name))
    if limit is None:
        session.add(RSELimit(rse_id=row.id, name=name, value=value))
    else:
        limit.value = value


def delete_limits(session: Session, rse: str, name: str | None) -> None:
    """Remove the limit `name` of the RSE, or all its limits for None (Rucio's
    delete_rse_limits); a missing limit is no error."""
    row = get_rse(session, rse)
    query = delete(RSELimit).where(RSELimit.rse_id == row.id)
    if name is not None:
        query = query.where(RSELimit.name == name)
    session.execute(query)


def limits_of(session: Session, row: RSE) -> dict[str, int]:
    return {r.name: r.value for r in session.scalars(
        select(RSELimit).where(RSELimit.rse_id == row.id))}


def set_usage(session: Session, rse: str, source: str, used: int | None,
              free: int | None, files: int | None = None) -> None:
    row = get_rse(session, rse)
    usage = session.get(RSEUsage, (row.id, source))
    if usage is None:
        session.add(RSEUsage(rse_id=row.id, source=source, used=used, free=free, files=files))
    else:
        usage.used, usage.free, usage.files = used, free, files


def usage_of(session: Session, row: RSE) -> list[dict[str, Any]]:
    from stashflow.placement.replicas import catalog_usage

    used, files = catalog_usage(session, row.id)
    rows: list[dict[str, Any]] = [{
        "rse_id": row.id, "rse": row.rse, "source": "rucio", "used": used, "free": None,
        "total": used, "files": files, "updated_at": rfc1123(utcnow()),
    }]
    for usage in session.scalars(select(RSEUsage).where(RSEUsage.rse_id == row.id)
                                 .order_by(RSEUsage.source)):
        if usage.source == "rucio":
            continue
        total = None if usage.used is None or usage.free is None else usage.used + usage.free
        rows.append({"rse_id": row.id, "rse": row.rse, "source": usage.source,
                     "used": usage.used, "free": usage.free, "total": total,
                     "files": usage.files, "updated_at": rfc1123(usage.updated_at)})
    return rows


def _check_distance(source: str, destination: str, distance: Any) -> None:
    if not isinstance(distance, int) or isinstance(distance, bool) or distance < 0:
        raise InvalidObject(f"The distance from '{source}' to '{destination}' must be a "
                            f"non-negative integer")


def set_distance(session: Session, source: str, destination: str, distance: int) -> None:
    _check_distance(source, destination, distance)
    src, dst = get_rse(session, source), get_rse(session, destination)
    row = session.get(Distance, (src.id, dst.id))
    if row is None:
        session.add(Distance(src_rse_id=src.id, dest_rse_id=dst.id, distance=distance))
    else:
        row.distance = distance


def distances_from(session: Session, source: str, destination: str) -> list[dict[str, Any]]:
    src, dst = get_rse(session, source), get_rse(session, destination)
    row = session.get(Distance, (src.id, dst.id))
    if row is None:
        return []
    return [{"src_rse_id": src.id, "dest_rse_id": dst.id, "distance": row.distance,
             "created_at": rfc1123(row.created_at), "updated_at": rfc1123(row.updated_at)}]


def update_distance(session: Session, source: str, destination: str, distance: int,
                    bidirectional: bool = False) -> None:
    """Change existing distances (also destination -> source if `bidirectional`). As in
    Rucio, a distance that does not exist is not created: the CLI adds those first."""
    _check_distance(source, destination, distance)
    src, dst = get_rse(session, source), get_rse(session, destination)
    pairs = [(src.id, dst.id)] + ([(dst.id, src.id)] if bidirectional else [])
    for src_id, dst_id in pairs:
        session.execute(update(Distance).where(Distance.src_rse_id == src_id,
                                               Distance.dest_rse_id == dst_id)
                        .values(distance=distance, updated_at=utcnow())
                        .execution_options(synchronize_session="fetch"))


def delete_distance(session: Session, source: str, destination: str,
                    bidirectional: bool = False) -> None:
    src, dst = get_rse(session, source), get_rse(session, destination)
    pairs = [(src.id, dst.id)] + ([(dst.id, src.id)] if bidirectional else [])
    for src_id, dst_id in pairs:
        session.execute(delete(Distance).where(Distance.src_rse_id == src_id,
                                               Distance.dest_rse_id == dst_id))
