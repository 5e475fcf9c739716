"""Data identifiers: files, datasets, containers, the attachment graph and metadata.

The graph is a DAG: a file may sit in many datasets, a dataset in many containers, and an
attachment that would close a cycle is refused. Collection sizes are derived from the
graph when asked for, so they are exact at once instead of after an accounting daemon.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, func, insert, literal, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from stashflow.placement import naming
from stashflow.placement.clock import rfc1123, utcnow
from stashflow.placement.db import bulk_insert, each_name, keys_in, names_by_scope, names_in
from stashflow.placement.exceptions import (
    AccessDenied,
    DataIdentifierAlreadyExists,
    DataIdentifierNotFound,
    DuplicateContent,
    FileAlreadyExists,
    FileConsistencyMismatch,
    InvalidObject,
    InvalidValueForKey,
    UnsupportedOperation,
    UnsupportedStatus,
)
from stashflow.placement.models import (
    DID,
    DID_COLUMN_META,
    Attachment,
    DeletedDID,
    DIDAvailability,
    DIDType,
    Scope,
)
from stashflow.placement.scopes import check_owner, check_write, get_scope

# Rows per IN list or multi-row insert: few round trips, yet well below SQLite's limit
# of 32766 bound parameters per statement (a tuple IN uses two per row).
CHUNK = 2000


def parse_type(value: Any, allowed: Iterable[DIDType] = tuple(DIDType)) -> DIDType:
    try:
        did_type = DIDType[str(value).upper()]
    except KeyError:
        did_type = None
    if did_type is None or did_type not in tuple(allowed):
        raise InvalidObject(f"Invalid DID type {value!r}: expected one of "
                            f"{', '.join(t.value for t in allowed)}")
    return did_type


def get_did(session: Session, scope: str, name: str) -> DID:
    row = session.get(DID, (scope, name))
    if row is None:
        raise DataIdentifierNotFound(f"Data identifier '{scope}:{name}' not found")
    return row


def lock_for_writing(session: Session, caller: str, scope: str, name: str) -> DID:
    """The collection, row-locked for writing, once `caller` is known to own its scope
    (or to be an admin). One query reads both."""
    # FOR NO KEY UPDATE: excludes other writers of the collection but not the FOR KEY
    # SHARE locks that foreign-key checks take, which FOR UPDATE would block (deadlocks
    # between rule removal and attachment).
    found = session.execute(
        select(DID, Scope.account).join(Scope, Scope.scope == DID.scope)
        .where(DID.scope == scope, DID.name == name)
        .with_for_update(key_share=True, of=DID)
        .execution_options(populate_existing=True)).first()
    if found is None:
        raise DataIdentifierNotFound(f"Data identifier '{scope}:{name}' not found")
    check_owner(session, caller, scope, found.account)
    return found[0]


def lock_collections(session: Session, root: DID) -> None:
    """Row-lock a collection and every collection under it (PostgreSQL; SQLite serialises
    writers anyway). Rule creation and attachment both take these locks, so a rule never
    misses content attached while it is being created, nor the other way round."""
    if root.did_type == DIDType.FILE:
        return
    frontier = [(root.scope, root.name)]
    seen = set(frontier)
    while frontier:
        session.execute(select(DID.scope).where(keys_in(DID.scope, DID.name, frontier))
                        .with_for_update(key_share=True)).all()
        children = session.execute(
            select(Attachment.child_scope, Attachment.child_name).where(
                keys_in(Attachment.scope, Attachment.name, frontier),
                Attachment.child_type != DIDType.FILE)).all()
        frontier = [(s, n) for s, n in children if (s, n) not in seen]
        seen.update(frontier)


def _check_new_name(session: Session, scope: str, name: str) -> None:
    naming.did_name(name)
    if session.get(DID, (scope, name)) is not None:
        raise DataIdentifierAlreadyExists(f"Data identifier '{scope}:{name}' already exists")
    if session.get(DeletedDID, (scope, name)) is not None:
        raise DataIdentifierAlreadyExists(
            f"Data identifier '{scope}:{name}' was used before and names are never reused")


def add_collection(session: Session, caller: str, scope: str, name: str, did_type: DIDType,
                   monotonic: bool = False, meta: dict[str, Any] | None = None,
                   lifetime: int | None = None) -> DID:
    naming.scope(scope)
    check_write(session, caller, scope)
    _check_new_name(session, scope, name)
    if did_type == DIDType.FILE:
        raise InvalidObject("Files are created by registering replicas, not with add_did")
    row = DID(scope=scope, name=name, did_type=did_type, account=caller, is_open=True,
              monotonic=bool(monotonic), bytes=0, length=0)
    if lifetime is not None:
        row.expired_at = _expiry(lifetime)
    session.add(row)
    session.flush()
    for key, value in (meta or {}).items():
        set_metadata(session, caller, scope, name, key, value)
    return row


def _expiry(lifetime: Any) -> datetime:
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime < 0:
        raise InvalidObject(f"lifetime must be a non-negative number of seconds, not "
                            f"{lifetime!r}")
    return utcnow() + timedelta(seconds=lifetime)


# Light rows (no ORM instances) for bulk paths: building ORM objects would dominate.
_LIGHT = (DID.scope, DID.name, DID.did_type, DID.bytes, DID.adler32, DID.md5, DID.guid,
          DID.events, DID.lumiblocknr)


def fetch_dids(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """Rows with scope, name, did_type, bytes, adler32, md5, guid, events, lumiblocknr."""
    found: dict[tuple[str, str], Any] = {}
    for i in range(0, len(keys), CHUNK):
        for row in session.execute(select(*_LIGHT).where(
                keys_in(DID.scope, DID.name, keys[i:i + CHUNK]))):
            found[(row.scope, row.name)] = row
    return found


def ensure_files(session: Session, caller: str, items: list[dict[str, Any]]) -> int:
    """Create the missing file DIDs of `items` ({scope, name, bytes, adler32, md5, meta});
    known files must agree on size and checksums. Returns how many were created.
    One query per chunk and one multi-row insert: registration is a bulk operation."""
    keys = [(item["scope"], item["name"]) for item in items]
    known = fetch_dids(session, keys)
    new = [item for item in items if (item["scope"], item["name"]) not in known]
    for item in items:
        row = known.get((item["scope"], item["name"]))
        if row is not None:
            _check_consistent(row, item.get("bytes"), item.get("adler32"), item.get("md5"))
    if not new:
        return 0
    new_keys = [(item["scope"], item["name"]) for item in new]
    for scope in {key[0] for key in new_keys}:
        naming.scope(scope)
        get_scope(session, scope)
    for i in range(0, len(new_keys), CHUNK):
        reused = session.execute(select(DeletedDID.scope, DeletedDID.name).where(
            keys_in(DeletedDID.scope, DeletedDID.name, new_keys[i:i + CHUNK]))).first()
        if reused is not None:
            raise DataIdentifierAlreadyExists(
                f"Data identifier '{reused[0]}:{reused[1]}' was used before and names are "
                f"never reused")
    now = utcnow()
    rows = []
    for item in new:
        scope, name, size = item["scope"], item["name"], item.get("bytes")
        naming.did_name(name)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidObject(f"File '{scope}:{name}' needs a non-negative integer 'bytes'")
        _check_checksums(scope, name, item.get("adler32"), item.get("md5"))
        columns, free = _split_meta(scope, name, item.get("meta") or {})
        rows.append({**_FILE_DEFAULTS, **columns, "scope": scope, "name": name,
                     "account": caller, "bytes": size, "adler32": item.get("adler32"),
                     "md5": item.get("md5"), "meta": free or None, "created_at": now,
                     "updated_at": now})
    for i in range(0, len(rows), CHUNK):
        bulk_insert(session, DID.__table__, rows[i:i + CHUNK])
    return len(rows)


_FILE_DEFAULTS: dict[str, Any] = {
    "did_type": DIDType.FILE, "length": 1, "availability": DIDAvailability.AVAILABLE,
    "is_open": None, "monotonic": False, "hidden": False, "suppressed": False,
    "obsolete": False, "is_new": True, **{key: None for key in DID_COLUMN_META
                                          if key not in ("hidden", "obsolete")},
}


def _check_consistent(row: Any, size: Any, adler32: Any, md5: Any) -> None:
    label = f"'{row.scope}:{row.name}'"
    if row.did_type != DIDType.FILE:
        raise InvalidObject(f"{label} is a {row.did_type.value}, not a file")
    if size is not None and row.bytes is not None and size != row.bytes:
        raise FileConsistencyMismatch(f"{label} is registered with {row.bytes} bytes, not "
                                      f"{size}")
    if adler32 and row.adler32 and adler32 != row.adler32:
        raise FileConsistencyMismatch(f"{label} is registered with adler32 {row.adler32}, "
                                      f"not {adler32}")
    if md5 and row.md5 and md5 != row.md5:
        raise FileConsistencyMismatch(f"{label} is registered with md5 {row.md5}, not {md5}")


def _check_checksums(scope: str, name: str, adler32: Any, md5: Any) -> None:
    if adler32 is not None and (not isinstance(adler32, str) or len(adler32) != 8
                                or not _is_hex(adler32)):
        raise InvalidObject(f"Invalid adler32 {adler32!r} for '{scope}:{name}' (8 hex digits)")
    if md5 is not None and (not isinstance(md5, str) or len(md5) != 32 or not _is_hex(md5)):
        raise InvalidObject(f"Invalid md5 {md5!r} for '{scope}:{name}' (32 hex digits)")


def _is_hex(value: str) -> bool:
    try:
        int(value, 16)
    except ValueError:
        return False
    return True


# --- attachments ---------------------------------------------------------------------


def attach(session: Session, caller: str, scope: str, name: str,
           children: list[dict[str, Any]], rse: str | None = None,
           ignore_duplicate: bool = False) -> None:
    from stashflow.placement.replicas import add_replicas

    parent = lock_for_writing(session, caller, scope, name)
    if parent.did_type == DIDType.FILE:
        raise UnsupportedOperation(f"'{scope}:{name}' is a file; only datasets and "
                                   f"containers have content")
    if not parent.is_open:
        raise UnsupportedOperation(f"Data identifier '{scope}:{name}' is closed")
    if not isinstance(children, list) or not all(isinstance(c, dict) for c in children):
        raise InvalidObject("'dids' must be a list of {scope, name} objects")
    try:
        keys = list(dict.fromkeys((c["scope"], c["name"]) for c in children))
    except (KeyError, TypeError):  # a missing key; an unhashable value
        keys = [(None, None)]
    if not all(type(s) is str and type(n) is str for s, n in keys):
        raise InvalidObject("Every attached DID needs a 'scope' and a 'name'")
    if rse is not None:
        if parent.did_type != DIDType.DATASET:
            raise UnsupportedOperation("Only files, attached to datasets, can be registered "
                                       "on an RSE while attaching")
        add_replicas(session, caller, rse, children, ignore_availability=True)
    if (parent.did_type == DIDType.DATASET and not ignore_duplicate
            and _attach_files(session, parent, keys)):
        return
    rows = fetch_dids(session, keys)
    missing = [key for key in keys if key not in rows]
    if missing:
        raise DataIdentifierNotFound(f"Data identifier '{missing[0][0]}:{missing[0][1]}' not "
                                     f"found")
    for key in keys:
        _check_child(session, parent, rows[key])
    present: set[tuple[str, str]] = set()
    for i in range(0, len(keys), CHUNK):
        present.update((s, n) for s, n in session.execute(
            select(Attachment.child_scope, Attachment.child_name).where(
                Attachment.scope == scope, Attachment.name == name,
                keys_in(Attachment.child_scope, Attachment.child_name, keys[i:i + CHUNK]))))
    if present and not ignore_duplicate:
        key = next(k for k in keys if k in present)
        cls = FileAlreadyExists if rows[key].did_type == DIDType.FILE else DuplicateContent
        raise cls(f"'{key[0]}:{key[1]}' is already attached to '{scope}:{name}'")
    added = [rows[key] for key in keys if key not in present]
    now = utcnow()
    edges = [{"scope": scope, "name": name, "child_scope": row.scope, "child_name": row.name,
              "did_type": parent.did_type, "child_type": row.did_type, "bytes": row.bytes,
              "adler32": row.adler32, "md5": row.md5, "created_at": now} for row in added]
    for i in range(0, len(edges), CHUNK):
        bulk_insert(session, Attachment.__table__, edges[i:i + CHUNK])
    if parent.did_type == DIDType.DATASET:
        parent.bytes = (parent.bytes or 0) + sum(row.bytes or 0 for row in added)
        parent.length = (parent.length or 0) + len(added)
    _cover_new_content(session, parent, added)


class _Refused(Exception):
    """Rolls back the optimistic insert of `_attach_files`."""


def _attach_files(session: Session, parent: DID, keys: list[tuple[str, str]]) -> bool:
    """Attach files to a dataset the optimistic way: the database looks the children up
    and copies their size and checksums itself (INSERT ... SELECT FROM dids) instead of
    shipping every row to us and back. Only existing files can be selected, so if every
    key was inserted the request was valid, and the dataset's size and length are
    updated. Otherwise (a missing DID, a collection among the children, one already
    attached) the savepoint is rolled back and False tells the caller to run the checks
    that say precisely what was wrong. The statements are built once; each call binds
    its values, one statement per scope and chunk of names."""
    if session.get_bind().dialect.name == "postgresql":
        return _attach_counted(session, parent, keys)
    from stashflow.placement.rules import covering_rules

    # SQLite cannot insert inside a WITH: the new edges come back as rows, and the
    # dataset is updated from them.
    rules = covering_rules(session, parent)
    now = utcnow()
    inserted: list[Any] = []
    try:
        with session.begin_nested():
            for scope, chunk in _by_scope(keys):
                inserted.extend(session.execute(_returning_statement(),
                                                _bound(parent, scope, chunk, now)).all())
            if len(inserted) != len(keys):
                raise _Refused
    except (_Refused, IntegrityError):
        return False
    parent.bytes = (parent.bytes or 0) + sum(row.bytes or 0 for row in inserted)
    parent.length = (parent.length or 0) + len(inserted)
    _cover_new_content(session, parent, inserted, rules)
    return True


def _attach_counted(session: Session, parent: DID, keys: list[tuple[str, str]]) -> bool:
    """PostgreSQL: each statement inserts the edges, grows the dataset's size and length
    if every key was inserted, and tells whether rules cover the dataset: round trips
    saved against separate statements, and no rows shipped back unless rules must be
    extended."""
    now = utcnow()
    covered = False
    try:
        with session.begin_nested():
            for scope, chunk in _by_scope(keys):
                row = session.execute(_grow_statement(),
                                      _bound(parent, scope, chunk, now)).one()
                if row.n != len(chunk):
                    raise _Refused
                covered = row.covered
                set_committed_value(parent, "bytes", row.total)
                set_committed_value(parent, "length", row.length)
                set_committed_value(parent, "updated_at", now)
    except (_Refused, IntegrityError):
        session.expire(parent, ["bytes", "length", "updated_at"])
        return False
    if covered:
        rows = fetch_dids(session, keys)
        _cover_new_content(session, parent, [rows[key] for key in keys])
    return True


def _by_scope(keys: list[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """(scope, names) in chunks of at most CHUNK names."""
    for scope, names in names_by_scope(keys).items():
        for i in range(0, len(names), CHUNK):
            yield scope, names[i:i + CHUNK]


def _bound(parent: DID, scope: str, names: list[str], now: datetime) -> dict[str, Any]:
    return {"parent_scope": parent.scope, "parent_name": parent.name, "child_scope": scope,
            "names": names, "count": len(names), "now": now}


@functools.cache
def _edges_select(probe: bool = False) -> Any:
    """The edges from the dataset :parent_scope/:parent_name to the files :names of scope
    :child_scope, stamped :now. With `probe` (PostgreSQL), each name is looked up on its
    own in a lateral subquery that LIMIT keeps from being merged into a join: the planner
    then always takes the primary key, one probe per name. With `name = ANY(:names)` it
    read every DID of the scope instead whenever its statistics were older than a bulk
    registration (a new scope, or 10,000 files registered just before being attached):
    a cost that grew with the scope, not with the request."""

    def edges(files: Any) -> Any:
        return select(bindparam("parent_scope", type_=DID.scope.type),
                      bindparam("parent_name", type_=DID.name.type), files.scope, files.name,
                      literal(DIDType.DATASET, Attachment.did_type.type), files.did_type,
                      files.bytes, files.adler32, files.md5,
                      bindparam("now", type_=Attachment.created_at.type))

    if not probe:
        return edges(DID).where(DID.scope == bindparam("child_scope"),
                                names_in(DID.name, "names"), DID.did_type == DIDType.FILE)
    wanted = each_name("names")
    file = select(DID.scope, DID.name, DID.did_type, DID.bytes, DID.adler32, DID.md5).where(
        DID.scope == bindparam("child_scope"), DID.name == wanted.c.name,
        DID.did_type == DIDType.FILE).limit(1).lateral("file")
    return edges(file.c).select_from(wanted).join(file, true())


@functools.cache
def _returning_statement() -> Any:
    # the Core table: with parameters, an ORM insert would be run as a bulk insert
    edges = Attachment.__table__.c
    return insert(Attachment.__table__).from_select(_EDGE_COLUMNS, _edges_select()).returning(
        edges.child_scope.label("scope"), edges.child_name.label("name"),
        edges.child_type.label("did_type"), edges.bytes, edges.adler32, edges.md5)


@functools.cache
def _grow_statement() -> Any:
    added = (insert(Attachment).from_select(_EDGE_COLUMNS, _edges_select(probe=True))
             .returning(Attachment.bytes).cte("added"))
    totals = select(func.count().label("n"),
                    func.coalesce(func.sum(added.c.bytes), 0).label("bytes")).cte("totals")
    n, total = select(totals.c.n).scalar_subquery(), select(totals.c.bytes).scalar_subquery()
    grown = (update(DID)
             .where(DID.scope == bindparam("parent_scope"), DID.name == bindparam("parent_name"),
                    n == bindparam("count"))
             .values(bytes=func.coalesce(DID.bytes, 0) + total,
                     length=func.coalesce(DID.length, 0) + n,
                     updated_at=bindparam("now", type_=Attachment.created_at.type))
             .returning(DID.bytes, DID.length).cte("grown"))
    from stashflow.placement.rules import covered

    return select(totals.c.n, select(grown.c.bytes).scalar_subquery().label("total"),
                  select(grown.c.length).scalar_subquery().label("length"),
                  covered("parent_scope", "parent_name").label("covered")
                  ).select_from(totals)


_EDGE_COLUMNS = ["scope", "name", "child_scope", "child_name", "did_type", "child_type",
                 "bytes", "adler32", "md5", "created_at"]


def _cover_new_content(session: Session, parent: DID, added: list[Any],
                       rules: list[Any] | None = None) -> None:
    session.flush()
    if added:
        from stashflow.placement.rules import extend_for_attach

        # Rucio's judge-evaluator does this later from a queue; we do it in the same
        # transaction, so rules on the collection cover new content at once.
        extend_for_attach(session, parent, added, rules)


def _check_child(session: Session, parent: DID, child: Any) -> None:
    label = f"'{child.scope}:{child.name}'"
    if parent.did_type == DIDType.DATASET and child.did_type != DIDType.FILE:
        raise UnsupportedOperation(f"A dataset holds files only; {label} is a "
                                   f"{child.did_type.value.lower()}")
    if parent.did_type == DIDType.CONTAINER and child.did_type == DIDType.FILE:
        raise UnsupportedOperation(f"A container holds datasets and containers; {label} "
                                   f"is a file")
    if child.did_type == DIDType.CONTAINER:
        ancestors = ancestors_of(session, parent.scope, parent.name)
        if (child.scope, child.name) in ancestors | {(parent.scope, parent.name)}:
            raise UnsupportedOperation(
                f"Attaching {label} to '{parent.scope}:{parent.name}' would create a cycle")


def ancestors_of(session: Session, scope: str, name: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    frontier = [(scope, name)]
    while frontier:
        rows = session.execute(
            select(Attachment.scope, Attachment.name).where(
                keys_in(Attachment.child_scope, Attachment.child_name, frontier))
        ).all()
        frontier = [r for r in rows if r not in found]
        found.update(frontier)
    return found


def detach(session: Session, caller: str, scope: str, name: str,
           children: list[dict[str, Any]]) -> None:
    parent = lock_for_writing(session, caller, scope, name)
    if parent.monotonic:
        raise UnsupportedOperation(f"'{scope}:{name}' is monotonic: content cannot be removed")
    if not isinstance(children, list):
        raise InvalidObject("'dids' must be a list of {scope, name} objects")
    removed: list[DID] = []
    for child in children:
        if not isinstance(child, dict):
            raise InvalidObject("'dids' must be a list of {scope, name} objects")
        edge = session.get(Attachment, (scope, name, child.get("scope"), child.get("name")))
        if edge is None:
            raise DataIdentifierNotFound(
                f"'{child.get('scope')}:{child.get('name')}' is not attached to "
                f"'{scope}:{name}'")
        if parent.did_type == DIDType.DATASET:
            parent.bytes = (parent.bytes or 0) - (edge.bytes or 0)
            parent.length = (parent.length or 0) - 1
        removed.append(get_did(session, edge.child_scope, edge.child_name))
        session.delete(edge)
    session.flush()
    if removed:
        from stashflow.placement.rules import shrink_for_detach

        shrink_for_detach(session, parent, removed)


def list_content(session: Session, scope: str, name: str) -> list[dict[str, Any]]:
    get_did(session, scope, name)
    rows = session.scalars(select(Attachment).where(Attachment.scope == scope,
                                                    Attachment.name == name)
                           .order_by(Attachment.child_scope, Attachment.child_name))
    return [{"scope": r.child_scope, "name": r.child_name, "type": r.child_type.value,
             "bytes": r.bytes, "adler32": r.adler32, "md5": r.md5} for r in rows]


class FileRow(NamedTuple):
    """A file as listings and rules need it. A tuple: its fields are read 10,000s of times
    per request, at a fraction of the cost of a database row's attributes."""

    scope: str
    name: str
    did_type: DIDType
    bytes: int | None
    adler32: str | None
    md5: str | None
    guid: str | None = None
    events: int | None = None
    lumiblocknr: int | None = None


def iter_files(session: Session, scope: str, name: str, *, meta: bool = False,
               read: Callable[[str, str], Iterable[FileRow]] | None = None
               ) -> Iterator[Any]:
    """Every file under a DID (itself if it is a file), each once, depth-first, as
    `FileRow`s. They are read from the attachments alone, which keep a copy of each file's
    size and checksums (fixed once registered): no lookup of every file in `dids`. With
    `meta`, also guid, events and lumiblocknr, which only the DIDs hold. `read(scope,
    name)`, if given, reads the files of a dataset instead, for a caller that wants more
    of each file in the same query."""
    root = get_did(session, scope, name)
    if root.did_type == DIDType.FILE:
        yield root
        return
    seen: set[tuple[str, str]] = set()
    # Datasets hold only files and containers only collections (see _check_child), so
    # each collection is read with one query.
    stack = [(scope, name, root.did_type)]
    while stack:
        parent_scope, parent_name, kind = stack.pop()
        where = {"parent_scope": parent_scope, "parent_name": parent_name}
        if kind == DIDType.DATASET:
            rows = (read(parent_scope, parent_name) if read is not None
                    else (FileRow(*row) for row in session.execute(_files_statement(meta),
                                                                    where)))
            for row in rows:
                key = (row.scope, row.name)
                if key not in seen:
                    seen.add(key)
                    yield row
            continue
        children = session.execute(_collections_statement(), where).all()
        fresh = [(s, n, t) for s, n, t in children if (s, n) not in seen]
        seen.update((s, n) for s, n, _t in fresh)
        stack.extend(reversed(fresh))


def children_of_parent(query: Any) -> Any:
    """`query` (which reads `contents`) narrowed to the children of the collection bound
    at execution as :parent_scope/:parent_name, in the order of the primary key."""
    return query.where(Attachment.scope == bindparam("parent_scope"),
                       Attachment.name == bindparam("parent_name")).order_by(
        Attachment.child_scope, Attachment.child_name)


@functools.cache
def _files_statement(meta: bool) -> Any:
    if meta:
        return children_of_parent(select(*_LIGHT).join(
            Attachment, and_(Attachment.child_scope == DID.scope,
                             Attachment.child_name == DID.name)))
    return children_of_parent(select(
        Attachment.child_scope.label("scope"), Attachment.child_name.label("name"),
        Attachment.child_type.label("did_type"), Attachment.bytes, Attachment.adler32,
        Attachment.md5))


@functools.cache
def _collections_statement() -> Any:
    return children_of_parent(select(Attachment.child_scope, Attachment.child_name,
                                      Attachment.child_type))


def datasets_of(session: Session, scope: str, name: str) -> list[DID]:
    """The datasets at or under a DID (Rucio's grouping unit)."""
    root = get_did(session, scope, name)
    if root.did_type == DIDType.DATASET:
        return [root]
    if root.did_type == DIDType.FILE:
        return []
    found: list[DID] = []
    seen: set[tuple[str, str]] = set()
    stack = [(scope, name)]
    while stack:
        current = stack.pop()
        for child in session.scalars(select(Attachment).where(
                Attachment.scope == current[0], Attachment.name == current[1])
                .order_by(Attachment.child_scope, Attachment.child_name)):
            key = (child.child_scope, child.child_name)
            if key in seen:
                continue
            seen.add(key)
            if child.child_type == DIDType.DATASET:
                found.append(get_did(session, *key))
            elif child.child_type == DIDType.CONTAINER:
                stack.append(key)
    return found


def totals(session: Session, row: DID) -> tuple[int, int]:
    """(bytes, files) under a DID, each file counted once."""
    if row.did_type == DIDType.FILE:
        return row.bytes or 0, 1
    if row.did_type == DIDType.DATASET:
        total = session.execute(
            select(func.coalesce(func.sum(Attachment.bytes), 0), func.count())
            .where(Attachment.scope == row.scope, Attachment.name == row.name)).one()
        return int(total[0]), int(total[1])
    size = count = 0
    for file in iter_files(session, row.scope, row.name):
        size += file.bytes or 0
        count += 1
    return size, count


def list_parents(session: Session, scope: str, name: str) -> list[dict[str, Any]]:
    get_did(session, scope, name)
    rows = session.scalars(select(Attachment).where(Attachment.child_scope == scope,
                                                    Attachment.child_name == name)
                           .order_by(Attachment.scope, Attachment.name))
    return [{"scope": r.scope, "name": r.name, "type": r.did_type.value} for r in rows]


# --- status and metadata ---------------------------------------------------------------


def set_status(session: Session, caller: str, scope: str, name: str,
               statuses: dict[str, Any]) -> None:
    """Rucio's set_status: `open` is the only status (monotonic is chosen at creation and
    never changes). Closing a closed collection or opening an open one is refused, and
    only an admin may reopen, as Rucio's permission policy intends."""
    row = get_did(session, scope, name)
    check_write(session, caller, scope)
    for key in statuses:
        if key != "open":
            raise UnsupportedStatus(f"The status {key} is not a valid data identifier "
                                    f"status.")
    if "open" not in statuses:
        return
    value = statuses["open"]
    if not isinstance(value, bool):
        raise InvalidObject("'open' must be true or false")
    if value:
        from stashflow.placement.accounts import is_admin

        if not is_admin(session, caller):
            raise AccessDenied(f"Account {caller} can not reopen the data identifier "
                               f"'{scope}:{name}'")
    if row.did_type == DIDType.FILE or bool(row.is_open) == value:
        raise UnsupportedOperation(f"The status of the data identifier '{scope}:{name}' "
                                   f"cannot be changed")
    if not value:
        row.closed_at = utcnow()
    row.is_open = value


_INT_COLUMNS = {"events", "run_number", "task_id", "panda_id", "lumiblocknr"}
_BOOL_COLUMNS = {"hidden", "obsolete"}
_DATE_COLUMNS = {"eol_at", "expired_at"}
_PROTECTED = {"scope", "name", "did_type", "account", "bytes", "length", "md5", "adler32",
              "is_open", "monotonic", "availability", "created_at", "updated_at", "guid"}


def _split_meta(scope: str, name: str,
                meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metadata split into fixed DID columns (converted) and free JSON keys."""
    if not isinstance(meta, dict):
        raise InvalidObject(f"The metadata of '{scope}:{name}' must be an object")
    columns: dict[str, Any] = {}
    free: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not key or len(key) > 255:
            raise InvalidObject("Metadata keys must be non-empty strings of at most 255 "
                                "characters")
        if key == "guid":
            columns[key] = None if value is None else str(value)
        elif key in DID_COLUMN_META:
            columns[key] = _convert(key, value)
        elif key in _PROTECTED:
            raise InvalidValueForKey(f"The metadata key '{key}' of '{scope}:{name}' is "
                                     f"managed by the catalog and cannot be set")
        else:
            if value is not None and not isinstance(value, str | int | float | bool):
                raise InvalidValueForKey(f"Metadata '{key}' must be a string, number or "
                                         f"boolean")
            free[key] = value
    return columns, free


def _store_meta(row: DID, key: str, value: Any) -> None:
    columns, free = _split_meta(row.scope, row.name, {key: value})
    for column, converted in columns.items():
        setattr(row, column, converted)
    if free:
        row.meta = {**(row.meta or {}), **free}


def _convert(key: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if key in _INT_COLUMNS:
            return int(value)
        if key in _BOOL_COLUMNS:
            if isinstance(value, str):
                return value.lower() in ("true", "1")
            return bool(value)
        if key in _DATE_COLUMNS:
            if isinstance(value, int | float):
                return utcnow() + timedelta(seconds=value)
            return datetime.fromisoformat(str(value).replace(" UTC", ""))
    except (TypeError, ValueError):
        raise InvalidValueForKey(f"Invalid value {value!r} for metadata '{key}'") from None
    return str(value)


def set_metadata(session: Session, caller: str, scope: str, name: str, key: str,
                 value: Any) -> None:
    row = get_did(session, scope, name)
    check_write(session, caller, scope)
    if key == "lifetime":
        row.expired_at = None if value is None else _expiry(value)
        return
    _store_meta(row, key, value)


def delete_metadata(session: Session, caller: str, scope: str, name: str, key: str) -> None:
    row = get_did(session, scope, name)
    check_write(session, caller, scope)
    if row.meta and key in row.meta:
        meta = dict(row.meta)
        del meta[key]
        row.meta = meta
    elif key in DID_COLUMN_META:
        setattr(row, key, None)
    else:
        raise InvalidValueForKey(f"'{scope}:{name}' has no metadata '{key}'")


def column_meta(session: Session, row: DID) -> dict[str, Any]:
    size, length = (row.bytes, row.length)
    if row.did_type != DIDType.FILE:
        size, length = totals(session, row)
    out: dict[str, Any] = {
        "scope": row.scope, "name": row.name, "account": row.account,
        "did_type": row.did_type.value, "is_open": row.is_open, "monotonic": row.monotonic,
        "hidden": row.hidden, "obsolete": row.obsolete, "complete": row.complete,
        "is_new": row.is_new, "availability": row.availability.value if row.availability
        else None, "suppressed": row.suppressed, "bytes": size, "length": length,
        "md5": row.md5, "adler32": row.adler32, "closed_at": rfc1123(row.closed_at),
        "created_at": rfc1123(row.created_at), "updated_at": rfc1123(row.updated_at),
        "accessed_at": None, "purge_replicas": True,
    }
    for key in DID_COLUMN_META:
        value = getattr(row, key)
        out[key] = rfc1123(value) if isinstance(value, datetime) else value
    return out


def get_metadata(session: Session, scope: str, name: str, plugin: str) -> dict[str, Any]:
    row = get_did(session, scope, name)
    plugin = (plugin or "DID_COLUMN").upper()
    if plugin == "DID_COLUMN":
        return column_meta(session, row)
    if plugin == "JSON":
        return dict(row.meta or {})
    if plugin == "ALL":
        return {**column_meta(session, row), **(row.meta or {})}
    raise InvalidObject(f"Unknown metadata plugin {plugin!r}: use DID_COLUMN, JSON or ALL")


def did_dict(session: Session, row: DID, dynamic: bool = False) -> dict[str, Any]:
    if row.did_type == DIDType.FILE:
        return {"scope": row.scope, "name": row.name, "type": row.did_type.value,
                "account": row.account, "bytes": row.bytes, "length": 1, "md5": row.md5,
                "adler32": row.adler32}
    size, length = totals(session, row) if dynamic else (row.bytes, row.length)
    return {"scope": row.scope, "name": row.name, "type": row.did_type.value,
            "account": row.account, "open": row.is_open, "monotonic": row.monotonic,
            "expired_at": rfc1123(row.expired_at), "length": length, "bytes": size}


# --- search ----------------------------------------------------------------------------

_OPERATORS = {"gt", "lt", "gte", "lte", "ne"}
_TYPES = {
    "all": (DIDType.FILE, DIDType.DATASET, DIDType.CONTAINER),
    "collection": (DIDType.DATASET, DIDType.CONTAINER),
    "dataset": (DIDType.DATASET,), "container": (DIDType.CONTAINER,), "file": (DIDType.FILE,),
}
_COLUMN_FILTER_KEYS = set(DID_COLUMN_META) | {"bytes", "length", "account", "md5", "adler32",
                                              "is_open", "monotonic", "created_at",
                                              "updated_at", "created_after", "created_before"}


def _types(value: Any) -> tuple[DIDType, ...]:
    kinds = _TYPES.get(str(value).lower())
    if kinds is None:
        raise InvalidObject(f"Invalid DID type filter {value!r}: use all, collection, "
                            f"dataset, container or file")
    return kinds


def search(session: Session, scope: str, filters: list[dict[str, Any]], did_type: str,
           long: bool) -> list[Any]:
    get_scope(session, scope)
    groups = filters or [{}]
    matched: dict[tuple[str, str], DID] = {}
    for group in groups:
        for row in _search_group(session, scope, dict(group), did_type):
            matched[(row.scope, row.name)] = row
    out: list[Any] = []
    for key in sorted(matched):
        row = matched[key]
        if long:
            size, length = totals(session, row)
            out.append({"scope": row.scope, "name": row.name,
                        "did_type": row.did_type.value, "bytes": size, "length": length})
        else:
            out.append(row.name)
    return out


def _search_group(session: Session, scope: str, group: dict[str, Any],
                  did_type: str) -> list[DID]:
    kinds = _types(group.pop("type", did_type))
    pattern = str(group.pop("name", "*"))
    plugins = {"column" if k.split(".")[0] in _COLUMN_FILTER_KEYS else "json" for k in group}
    if len(plugins) > 1:
        raise InvalidObject("Filter keys used do not all belong to the same metadata plugin")
    query = select(DID).where(DID.scope == scope, DID.did_type.in_(kinds),
                              DID.suppressed.is_(False))
    if pattern != "*":
        like = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(DID.name.like(like.replace("*", "%"), escape="\\"))
    query = query.order_by(DID.name)
    conditions = [_condition(key, value) for key, value in group.items()]
    results = []
    for row in session.scalars(query):
        if all(_holds(session, row, *condition) for condition in conditions):
            results.append(row)
    return results


def _condition(key: str, value: Any) -> tuple[str, str, Any]:
    if not isinstance(key, str):
        raise InvalidObject("Filter keys must be strings")
    field, _, operator = key.partition(".")
    if operator and operator not in _OPERATORS:
        raise InvalidObject(f"Unknown filter operator '.{operator}' in {key!r}")
    if not isinstance(value, str | int | float | bool) and value is not None:
        raise InvalidObject(f"Filter values must be strings or numbers, not "
                            f"{type(value).__name__}")
    if field == "created_after":
        field, operator = "created_at", "gte"
    elif field == "created_before":
        field, operator = "created_at", "lte"
    return field, operator or "eq", value


def _value_of(session: Session, row: DID, field: str) -> Any:
    if field in ("bytes", "length") and row.did_type != DIDType.FILE:
        size, length = totals(session, row)
        return size if field == "bytes" else length
    if field in _COLUMN_FILTER_KEYS:
        return getattr(row, field, None)
    return (row.meta or {}).get(field)


def _holds(session: Session, row: DID, field: str, operator: str, wanted: Any) -> bool:
    stored = _value_of(session, row, field)
    if stored is None:
        return operator == "ne" and wanted is not None
    if isinstance(stored, datetime):
        try:
            wanted = datetime.fromisoformat(str(wanted).replace(" UTC", "").replace("Z", ""))
        except ValueError:
            raise InvalidObject(f"Invalid date {wanted!r} for filter '{field}'") from None
        return _compare(stored.replace(tzinfo=None), operator, wanted.replace(tzinfo=None))
    if isinstance(stored, bool):
        return _compare(stored, operator, str(wanted).lower() in ("true", "1"))
    left, right = _numbers(stored, wanted)
    if left is not None and right is not None:
        return _compare(left, operator, right)
    if operator in ("eq", "ne") and isinstance(wanted, str) and "*" in wanted:
        import fnmatch

        hit = fnmatch.fnmatchcase(str(stored), wanted.replace("[", "[[]"))
        return hit if operator == "eq" else not hit
    return _compare(str(stored), operator, str(wanted))


def _numbers(a: Any, b: Any) -> tuple[float | None, float | None]:
    try:
        return float(a), float(b)
    except (TypeError, ValueError):
        return None, None


def _compare(a: Any, operator: str, b: Any) -> bool:
    try:
        return bool({"eq": a == b, "ne": a != b, "gt": a > b, "lt": a < b, "gte": a >= b,
                     "lte": a <= b}[operator])
    except TypeError:
        return False
