"""File replicas: registration, states, listing with PFNs, dataset replica summaries."""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, and_, func, select, type_coerce
from sqlalchemy.orm import Session

from stashflow.placement.accounts import is_admin
from stashflow.placement.clock import rfc1123, utcnow
from stashflow.placement.db import bulk_insert, keys_in
from stashflow.placement.dids import (
    CHUNK,
    FileRow,
    children_of_parent,
    ensure_files,
    fetch_dids,
    get_did,
    iter_files,
    list_parents,
)
from stashflow.placement.exceptions import (
    AccessDenied,
    Duplicate,
    InvalidObject,
    ReplicaNotFound,
    RSEWriteBlocked,
    UnsupportedOperation,
)
from stashflow.placement.models import (
    REPLICA_STATE_CODES,
    RSE,
    Attachment,
    DIDType,
    Replica,
    ReplicaState,
    RSEProtocol,
)
from stashflow.placement.rses import deterministic_path, get_rse, pfn_prefix, resolve
from stashflow.placement.scopes import check_write


def parse_state(value: Any) -> ReplicaState:
    if isinstance(value, str):
        if value in REPLICA_STATE_CODES:
            return REPLICA_STATE_CODES[value]
        if value.upper() in ReplicaState.__members__:
            return ReplicaState[value.upper()]
    raise InvalidObject(f"Invalid replica state {value!r}")


def add_replicas(session: Session, caller: str, rse: str, files: list[dict[str, Any]],
                 ignore_availability: bool = True) -> int:
    """Register replicas (creating missing file DIDs); all or nothing."""
    row = get_rse(session, rse)
    if not ignore_availability and not row.availability_write:
        raise RSEWriteBlocked(f"RSE '{rse}' is not available for writing")
    if not isinstance(files, list) or not files:
        raise InvalidObject("'files' must be a non-empty list of file objects")
    checked_scopes: set[str] = set()
    for item in files:
        if not isinstance(item, dict):
            raise InvalidObject("Every entry of 'files' must be an object")
        scope, name = item.get("scope"), item.get("name")
        if not isinstance(scope, str) or not isinstance(name, str):
            raise InvalidObject("Every file needs a 'scope' and a 'name'")
        if scope not in checked_scopes:
            check_write(session, caller, scope)
            checked_scopes.add(scope)
    keys = [(f["scope"], f["name"]) for f in files]
    if len(set(keys)) != len(keys):
        raise Duplicate("The same file appears twice in one replica registration")
    existing = _existing(session, row.id, keys)
    if existing:
        scope, name = sorted(existing)[0]
        raise Duplicate(f"Replica of '{scope}:{name}' already exists on RSE '{rse}'")
    ensure_files(session, caller, files)
    sizes = {key: did.bytes for key, did in fetch_dids(session, keys).items()}
    now = utcnow()
    rows = []
    for item in files:
        scope, name = item["scope"], item["name"]
        if row.deterministic:
            path = deterministic_path(scope, name)
        else:
            pfn = item.get("pfn")
            if not isinstance(pfn, str) or "://" not in pfn:
                raise InvalidObject(f"RSE '{rse}' is non-deterministic: the replica of "
                                    f"'{scope}:{name}' needs a 'pfn'")
            path = pfn
        rows.append({"rse_id": row.id, "scope": scope, "name": name,
                     "bytes": sizes[(scope, name)], "md5": item.get("md5"),
                     "adler32": item.get("adler32"), "path": path,
                     "state": parse_state(item.get("state", "A")), "lock_cnt": 0,
                     "tombstone": _tombstone(item.get("tombstone")), "accessed_at": None,
                     "created_at": now, "updated_at": now})
    for i in range(0, len(rows), CHUNK):
        bulk_insert(session, Replica.__table__, rows[i:i + CHUNK])
    return len(files)


def _tombstone(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.strptime(str(value), "%a, %d %b %Y %H:%M:%S UTC")
    except ValueError:
        try:
            return datetime.fromisoformat(str(value))
        except ValueError:
            raise InvalidObject(f"Invalid tombstone {value!r}") from None


def _existing(session: Session, rse_id: str, keys: list[tuple[str, str]]) -> set[Any]:
    found: set[Any] = set()
    for i in range(0, len(keys), CHUNK):
        found.update(session.execute(
            select(Replica.scope, Replica.name).where(
                Replica.rse_id == rse_id,
                keys_in(Replica.scope, Replica.name, keys[i:i + CHUNK]))).all())
    return found


def _named_replicas(session: Session, rse: str, files: Any, writer: str | None = None
                    ) -> Iterator[tuple[dict[str, Any], Replica]]:
    """Each entry of `files` ({scope, name, ...}) with its replica on `rse`; a missing
    replica is an error, and so is a scope `writer` (if given) may not write."""
    row = get_rse(session, rse)
    if not isinstance(files, list):
        raise InvalidObject("'files' must be a list")
    for item in files:
        if not isinstance(item, dict):
            raise InvalidObject("Every entry of 'files' must be an object")
        if writer is not None:
            check_write(session, writer, str(item.get("scope")))
        replica = session.get(Replica, (row.id, item.get("scope"), item.get("name")))
        if replica is None:
            raise ReplicaNotFound(f"No replica of '{item.get('scope')}:{item.get('name')}' "
                                  f"on RSE '{rse}'")
        yield item, replica


def update_states(session: Session, caller: str, rse: str, files: list[dict[str, Any]]) -> None:
    """Set replica states, and move what depends on them as Rucio does: AVAILABLE makes the
    locks on the replica OK (rules and transfer requests follow), UNAVAILABLE makes them
    STUCK. A file entry may carry Rucio's `error_message`, `broken_rule_id` and
    `broken_message` for the latter."""
    # Imported here: rules imports this module.
    from stashflow.placement.rules import replicas_available, replicas_unavailable

    row = get_rse(session, rse)
    available: list[tuple[str, str]] = []
    unavailable: dict[tuple[str, str], dict[str, Any]] = {}
    for item, replica in _named_replicas(session, rse, files, writer=caller):
        state = parse_state(item.get("state"))
        replica.state = state
        key = (replica.scope, replica.name)
        if state == ReplicaState.AVAILABLE:
            available.append(key)
        elif state == ReplicaState.UNAVAILABLE:
            unavailable[key] = item
    replicas_available(session, row.id, available)
    replicas_unavailable(session, row.id, unavailable, row.rse)


def delete_replicas(session: Session, caller: str, rse: str, files: list[dict[str, Any]]) -> None:
    if not is_admin(session, caller):
        raise AccessDenied(f"Account {caller} can not delete replicas on '{rse}'")
    for _item, replica in _named_replicas(session, rse, files):
        if replica.lock_cnt > 0:
            raise UnsupportedOperation(f"The replica of '{replica.scope}:{replica.name}' on "
                                       f"'{rse}' is locked by {replica.lock_cnt} rule(s)")
        session.delete(replica)


def catalog_usage(session: Session, rse_id: str) -> tuple[int, int]:
    used, files = session.execute(
        select(func.coalesce(func.sum(Replica.bytes), 0), func.count())
        .where(Replica.rse_id == rse_id)).one()
    return int(used), int(files)


def _read_priority(protocol: RSEProtocol, domain: str) -> int | None:
    return protocol.read_lan if domain == "lan" else protocol.read_wan


@dataclass
class _Site:
    """What a listing needs of one RSE, computed once per request."""

    name: str
    # (domain, pfn prefix, the PFN's entry without its priority) by preference, for the
    # requested domains and schemes
    readers: list[tuple[str, str, dict[str, Any]]]


def _sites(session: Session, domains: list[str], schemes: list[str] | None,
           allowed: set[str] | None) -> dict[str, _Site]:
    protocols: dict[str, list[RSEProtocol]] = defaultdict(list)
    for protocol in session.scalars(select(RSEProtocol)):
        protocols[protocol.rse_id].append(protocol)
    sites = {}
    for rse in session.scalars(select(RSE).where(RSE.deleted.is_(False))):
        if allowed is not None and rse.id not in allowed:
            continue
        info = {"rse_id": rse.id, "rse": rse.rse, "type": rse.rse_type.value,
                "volatile": rse.volatile}
        readers: list[tuple[str, str, dict[str, Any]]] = []
        for current in domains:
            # Only None disables an operation: 0 is the highest priority (rsemanager's
            # _get_possible_protocols).
            ranked = [(rank, p) for p in protocols[rse.id]
                      if (rank := _read_priority(p, current)) is not None
                      and (not schemes or p.scheme in schemes)]
            usable = [p for _rank, p in sorted(ranked, key=lambda pair: pair[0])]
            readers.extend((current, pfn_prefix(p), {**info, "domain": current})
                           for p in usable)
        sites[rse.id] = _Site(rse.rse, readers)
    return sites


@dataclass
class Listing:
    """What `POST /replicas/list` answers, read from the catalog in one transaction and
    turned into lines afterwards (`lines()`), so the server can stream the lines while
    the client is already parsing the first ones."""

    files: list[Any]
    # per file: (rse_id, path, state value)
    replicas: dict[tuple[str, str], list[tuple[str, str | None, str]]]
    sites: dict[str, _Site]
    domains: list[str]
    sort: str | None
    nrandom: int | None
    parents: dict[tuple[str, str], list[str]] | None

    def lines(self) -> Iterator[dict[str, Any]]:
        # Run once per file of listings of 10,000s of files: kept to plain loops.
        shuffle = self.sort == "random"
        lan_first = not shuffle and len(self.domains) > 1
        sites, replicas, nrandom, parents = self.sites, self.replicas, self.nrandom, self.parents
        no_replicas: list[tuple[str, str | None, str]] = []
        for file in self.files:
            key = (file.scope, file.name)
            found = replicas.get(key, no_replicas)
            if shuffle and len(found) > 1:
                found = random.sample(found, len(found))
            if nrandom:
                found = random.sample(found, min(nrandom, len(found)))
            # (domain, pfn, site name, entry) in order of preference
            candidates: list[tuple[str, str, str, dict[str, Any]]] = []
            rse_pfns: dict[str, list[str]] = {}
            states: dict[str, str] = {}
            for rse_id, path, state in found:
                site = sites[rse_id]
                rse_pfns[site.name] = []
                states[site.name] = state
                if path and "://" in path:  # non-deterministic: the stored PFN itself
                    if site.readers:
                        current, _prefix, entry = site.readers[0]
                        candidates.append((current, path, site.name, entry))
                    continue
                relative = path or ""
                relative = relative if relative.startswith("/") else "/" + relative
                for current, prefix, entry in site.readers:
                    candidates.append((current, prefix + relative, site.name, entry))
            if lan_first:
                candidates.sort(key=lambda c: c[0] != "lan")
            pfns: dict[str, Any] = {}
            for _current, pfn, name, entry in candidates:
                if pfn not in pfns:
                    pfns[pfn] = {**entry, "priority": len(pfns) + 1, "client_extract": False}
                    rse_pfns[name].append(pfn)
            line: dict[str, Any] = {
                "scope": file.scope, "name": file.name, "bytes": file.bytes, "md5": file.md5,
                "adler32": file.adler32, "pfns": pfns, "rses": rse_pfns, "states": states,
            }
            if parents is not None:
                line["parents"] = parents[key]
            yield line


def gather_replicas(session: Session, dids: list[dict[str, Any]], *,
                    schemes: list[str] | None = None, all_states: bool = False,
                    rse_expression: str | None = None, sort: str | None = None,
                    domain: str | None = None, resolve_parents: bool = False,
                    nrandom: int | None = None) -> Listing:
    """Everything `list_replicas` needs from the catalog: the files under `dids` (each
    once), their replicas on the RSEs allowed, and how each RSE is read."""
    if not isinstance(dids, list) or not all(isinstance(d, dict) for d in dids):
        raise InvalidObject("'dids' must be a list of {scope, name} objects")
    allowed = {r.id for r in resolve(session, rse_expression)} if rse_expression else None
    domains = ["lan", "wan"] if domain == "all" else [domain or "wan"]
    sites = _sites(session, domains, schemes, allowed)
    # per file: (rse_id, path, state); the state as stored, not converted row by row
    replicas: dict[tuple[str, str], list[tuple[str, str | None, str]]] = defaultdict(list)
    covered: set[tuple[str, str]] = set()

    def read(scope: str, name: str) -> Iterator[FileRow]:
        """A dataset's files with their replicas, in one query: one row per replica, the
        rows of a file one after the other (a file without replicas: one row of nulls)."""
        key: tuple[str, str] | None = None
        fresh = False
        for (file_scope, file_name, size, adler32, md5, rse_id, path,
             state) in session.execute(_dataset_replicas(all_states),
                                       {"parent_scope": scope, "parent_name": name}):
            if (file_scope, file_name) != key:
                key = (file_scope, file_name)
                # a file met before, in another dataset, has its replicas already
                fresh = key not in covered
                covered.add(key)
                yield FileRow(file_scope, file_name, DIDType.FILE, size, adler32, md5)
            if fresh and rse_id in sites:
                replicas[key].append((rse_id, path, state))

    files: list[Any] = []
    seen: set[tuple[str, str]] = set()
    for did in dids:
        for file in iter_files(session, str(did.get("scope")), str(did.get("name")),
                               read=read):
            if (file.scope, file.name) not in seen:
                seen.add((file.scope, file.name))
                files.append(file)
    keys = [(f.scope, f.name) for f in files]
    # files asked for by name, not through a dataset
    loose = [key for key in keys if key not in covered]
    for i in range(0, len(loose), CHUNK):
        query = select(Replica.scope, Replica.name, Replica.rse_id, Replica.path,
                       type_coerce(Replica.state, String)).where(
            keys_in(Replica.scope, Replica.name, loose[i:i + CHUNK]))
        if not all_states:
            query = query.where(Replica.state == ReplicaState.AVAILABLE)
        for scope, name, rse_id, path, state in session.execute(query):
            if rse_id in sites:
                replicas[(scope, name)].append((rse_id, path, state))
    for found in replicas.values():
        if len(found) > 1:
            found.sort()  # by RSE id: the same order at every call
    parents = None
    if resolve_parents:
        parents = {key: [f"{p['scope']}:{p['name']}" for p in list_parents(session, *key)]
                   for key in keys}
    return Listing(files, replicas, sites, domains, sort, nrandom, parents)


@functools.cache
def _dataset_replicas(all_states: bool) -> Any:
    """The files of the dataset :parent_scope/:parent_name, each with its replicas (in
    any state, or AVAILABLE ones): (scope, name, bytes, adler32, md5, rse_id, path,
    state), in the order of the files."""
    joined = and_(Replica.scope == Attachment.child_scope,
                  Replica.name == Attachment.child_name)
    if not all_states:
        joined = and_(joined, Replica.state == ReplicaState.AVAILABLE)
    # in the order of the attachments' primary key (no sort); a file's replicas are put
    # in RSE order afterwards
    return children_of_parent(
        select(Attachment.child_scope.label("scope"), Attachment.child_name.label("name"),
               Attachment.bytes, Attachment.adler32, Attachment.md5, Replica.rse_id,
               Replica.path, type_coerce(Replica.state, String).label("state"))
        .select_from(Attachment).outerjoin(Replica, joined))


def list_replicas(session: Session, dids: list[dict[str, Any]], **options: Any
                  ) -> list[dict[str, Any]]:
    """One line per file (collections expanded) with PFNs, RSEs and states, in the shape
    of Rucio's `POST /replicas/list`; priorities are 1-based, LAN before WAN. The options
    are those of `gather_replicas`."""
    return list(gather_replicas(session, dids, **options).lines())


def dataset_replicas(session: Session, scope: str, name: str) -> list[dict[str, Any]]:
    """Per RSE, how much of a dataset is there. Computed from the file replicas, so it is
    exact at once (Rucio's non-deep answer waits for an accounting daemon)."""
    root = get_did(session, scope, name)
    datasets = [root] if root.did_type == DIDType.DATASET else []
    if root.did_type == DIDType.CONTAINER:
        from stashflow.placement.dids import datasets_of

        datasets = datasets_of(session, scope, name)
    rses = {r.id: r for r in session.scalars(select(RSE).where(RSE.deleted.is_(False)))}
    out = []
    for dataset in datasets:
        files = list(iter_files(session, dataset.scope, dataset.name))
        total_bytes = sum(f.bytes or 0 for f in files)
        per_rse: dict[str, list[Replica]] = defaultdict(list)
        keys = [(f.scope, f.name) for f in files]
        for i in range(0, len(keys), CHUNK):
            for replica in session.scalars(select(Replica).where(
                    keys_in(Replica.scope, Replica.name, keys[i:i + CHUNK]))):
                per_rse[replica.rse_id].append(replica)
        for rse_id in sorted(per_rse, key=lambda i: rses[i].rse if i in rses else i):
            if rse_id not in rses:
                continue
            replicas = per_rse[rse_id]
            available = [r for r in replicas if r.state == ReplicaState.AVAILABLE]
            out.append({
                "scope": dataset.scope, "name": dataset.name, "rse": rses[rse_id].rse,
                "rse_id": rse_id, "bytes": total_bytes, "length": len(files),
                "available_bytes": sum(r.bytes for r in available),
                "available_length": len(available),
                "state": "AVAILABLE" if len(available) == len(files) else "UNAVAILABLE",
                "created_at": rfc1123(min(r.created_at for r in replicas)),
                "updated_at": rfc1123(max(r.updated_at for r in replicas)),
                "accessed_at": rfc1123(max((r.accessed_at for r in replicas
                                            if r.accessed_at), default=None)),
            })
    return out
