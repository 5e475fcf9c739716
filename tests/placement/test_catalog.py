"""The catalog core (no HTTP) on SQLite and PostgreSQL: accounts, tokens, scopes, DIDs and
the attachment DAG, replicas, RSEs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from stashflow.placement import accounts, auth, dids, replicas, rses, scopes
from stashflow.placement.clock import utcnow
from stashflow.placement.exceptions import (
    AccessDenied,
    CannotAuthenticate,
    DataIdentifierAlreadyExists,
    DataIdentifierNotFound,
    Duplicate,
    FileAlreadyExists,
    FileConsistencyMismatch,
    InvalidObject,
    UnsupportedOperation,
    UnsupportedStatus,
)
from stashflow.placement.models import (
    DID,
    DeletedDID,
    DIDType,
    Identity,
    Replica,
    Scope,
    Token,
)

Factory = sessionmaker[Session]


def setup_scope(session: Session, scope: str = "test", account: str = "root") -> None:
    scopes.add_scope(session, "root", scope, account)


def test_passwords_are_salted_and_verified(factory: Factory) -> None:
    first, second = accounts.hash_password("pw"), accounts.hash_password("pw")
    assert first != second and "pw" not in first
    assert accounts.verify_password("pw", first)
    assert not accounts.verify_password("wrong", first)
    with factory() as session:
        stored = session.get(Identity, ("ddmlab", accounts.IdentityType.USERPASS))
        assert stored is not None and stored.password_hash
        assert "secret" not in stored.password_hash


def test_tokens_expire_and_can_be_revoked(factory: Factory) -> None:
    with factory.begin() as session:
        issued = auth.login_userpass(session, "ddmlab", "secret", "root", "test")
        assert issued.token.startswith("root-ddmlab-test-")
        assert timedelta(minutes=59) < issued.expires_at - utcnow() <= timedelta(hours=1)
        assert auth.validate(session, issued.token).account == "root"
    with factory.begin() as session:
        session.execute(update(Token).values(expires_at=utcnow() - timedelta(seconds=1)))
    with pytest.raises(CannotAuthenticate), factory.begin() as session:
        auth.validate(session, issued.token)
    with factory.begin() as session:
        other = auth.login_userpass(session, "ddmlab", "secret", None)
        auth.revoke(session, auth.Caller("root", other.token), other.token)
    with pytest.raises(CannotAuthenticate), factory.begin() as session:
        auth.validate(session, other.token)


def test_wrong_password_or_account_cannot_log_in(factory: Factory) -> None:
    with factory.begin() as session:
        accounts.add_account(session, "alice", "USER")
        with pytest.raises(CannotAuthenticate):
            auth.login_userpass(session, "ddmlab", "nope", "root")
        with pytest.raises(CannotAuthenticate):
            auth.login_userpass(session, "ddmlab", "secret", "alice")
        with pytest.raises(CannotAuthenticate):
            auth.login_userpass(session, "nobody", "secret", "root")


def test_scope_ownership(factory: Factory) -> None:
    with factory.begin() as session:
        accounts.add_account(session, "alice", "USER")
        accounts.add_account(session, "bob", "USER")
        scopes.add_scope(session, "root", "user.alice", "alice")
        with pytest.raises(AccessDenied):
            scopes.add_scope(session, "bob", "user.bob2", "alice")
        with pytest.raises(Duplicate):
            scopes.add_scope(session, "root", "user.alice", "bob")
        with pytest.raises(AccessDenied):
            dids.add_collection(session, "bob", "user.alice", "ds", DIDType.DATASET)
        dids.add_collection(session, "alice", "user.alice", "ds", DIDType.DATASET)
        with pytest.raises(InvalidObject):
            scopes.add_scope(session, "root", "bad scope!", "alice")


def test_attachment_graph_is_a_dag(factory: Factory) -> None:
    with factory.begin() as session:
        setup_scope(session)
        rses.add_rse(session, "SITE_A", {})
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": f"f{i}", "bytes": 10, "adler32": "0000000a"}
            for i in range(3)])
        for name in ("ds1", "ds2"):
            dids.add_collection(session, "root", "test", name, DIDType.DATASET)
        for name in ("c1", "c2", "c3"):
            dids.add_collection(session, "root", "test", name, DIDType.CONTAINER)
        files = [{"scope": "test", "name": "f0"}, {"scope": "test", "name": "f1"}]
        dids.attach(session, "root", "test", "ds1", files)
        # A file may belong to several datasets: a DAG, not a tree.
        dids.attach(session, "root", "test", "ds2", [{"scope": "test", "name": "f1"}])
        dids.attach(session, "root", "test", "c1", [{"scope": "test", "name": "c2"}])
        dids.attach(session, "root", "test", "c2", [{"scope": "test", "name": "c3"},
                                                    {"scope": "test", "name": "ds1"}])
        dids.attach(session, "root", "test", "c3", [{"scope": "test", "name": "ds2"}])
    with factory.begin() as session:
        with pytest.raises(UnsupportedOperation, match="cycle"):
            dids.attach(session, "root", "test", "c3", [{"scope": "test", "name": "c1"}])
    with factory.begin() as session:
        with pytest.raises(UnsupportedOperation, match="cycle"):
            dids.attach(session, "root", "test", "c1", [{"scope": "test", "name": "c1"}])
    with factory.begin() as session:
        with pytest.raises(UnsupportedOperation, match="holds files only"):
            dids.attach(session, "root", "test", "ds1", [{"scope": "test", "name": "c3"}])
        with pytest.raises(FileAlreadyExists):
            dids.attach(session, "root", "test", "ds1", [{"scope": "test", "name": "f0"}])
    with factory() as session:
        names = [f.name for f in dids.iter_files(session, "test", "c1")]
        assert sorted(names) == ["f0", "f1"]  # f1 reached twice, listed once
        c1 = dids.get_did(session, "test", "c1")
        assert dids.did_dict(session, c1, dynamic=True)["bytes"] == 20
        assert dids.list_parents(session, "test", "f1") == [
            {"scope": "test", "name": "ds1", "type": "DATASET"},
            {"scope": "test", "name": "ds2", "type": "DATASET"}]


def test_a_refused_bulk_attachment_writes_nothing(factory: Factory) -> None:
    """Attaching to a dataset inserts optimistically in one statement; when any child is
    wrong, the whole batch is undone (even if the caller goes on and commits) and the
    error names the culprit."""
    with factory.begin() as session:
        setup_scope(session)
        rses.add_rse(session, "SITE_A", {})
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": f"f{i}", "bytes": 10 + i} for i in range(4)])
        dids.add_collection(session, "root", "test", "ds", DIDType.DATASET)
        dids.add_collection(session, "root", "test", "other", DIDType.DATASET)
        dids.attach(session, "root", "test", "ds", [{"scope": "test", "name": "f0"}])
    cases = [
        ([{"scope": "test", "name": "f1"}, {"scope": "test", "name": "ghost"}],
         DataIdentifierNotFound, "test:ghost"),
        ([{"scope": "test", "name": "f2"}, {"scope": "test", "name": "other"}],
         UnsupportedOperation, "holds files only"),
        ([{"scope": "test", "name": "f3"}, {"scope": "test", "name": "f0"}],
         FileAlreadyExists, "test:f0"),
    ]
    # All in one transaction that is committed: a refusal leaves it usable and takes back
    # whatever the attempt wrote.
    with factory.begin() as session:
        for children, error, message in cases:
            with pytest.raises(error, match=message):
                dids.attach(session, "root", "test", "ds", children)
    with factory() as session:
        assert [c["name"] for c in dids.list_content(session, "test", "ds")] == ["f0"]
        ds = dids.get_did(session, "test", "ds")
        assert (ds.bytes, ds.length) == (10, 1)
    with factory.begin() as session:
        dids.attach(session, "root", "test", "ds", [{"scope": "test", "name": "f3"},
                                                    {"scope": "test", "name": "f1"},
                                                    {"scope": "test", "name": "f3"}])
    with factory() as session:
        content = dids.list_content(session, "test", "ds")
        assert [(c["name"], c["bytes"], c["type"]) for c in content] == [
            ("f0", 10, "FILE"), ("f1", 11, "FILE"), ("f3", 13, "FILE")]
        ds = dids.get_did(session, "test", "ds")
        assert (ds.bytes, ds.length) == (34, 3)


def test_a_bulk_attachment_over_several_scopes_and_chunks(factory: Factory) -> None:
    """More files than one statement takes (dids.CHUNK), from two scopes: a refusal in the
    last chunk undoes the chunks before it; a valid request attaches all, sizes exact."""
    count = dids.CHUNK + 500
    files = [{"scope": "other" if i % 5 == 0 else "test", "name": f"f{i:05d}", "bytes": i}
             for i in range(count)]
    with factory.begin() as session:
        setup_scope(session)
        setup_scope(session, "other")
        rses.add_rse(session, "SITE_A", {})
        replicas.add_replicas(session, "root", "SITE_A", files)
        dids.add_collection(session, "root", "test", "ds", DIDType.DATASET)
    refs = [{"scope": f["scope"], "name": f["name"]} for f in files]
    with factory.begin() as session:  # committed after the refusal
        with pytest.raises(DataIdentifierNotFound, match="test:ghost"):
            dids.attach(session, "root", "test", "ds",
                        [*refs, {"scope": "test", "name": "ghost"}])
    with factory() as session:
        assert dids.list_content(session, "test", "ds") == []
        ds = dids.get_did(session, "test", "ds")
        assert (ds.bytes or 0, ds.length or 0) == (0, 0)
    with factory.begin() as session:
        dids.attach(session, "root", "test", "ds", refs)
    with factory() as session:
        content = dids.list_content(session, "test", "ds")
        assert sorted((c["scope"], c["name"]) for c in content) == sorted(
            (f["scope"], f["name"]) for f in files)
        ds = dids.get_did(session, "test", "ds")
        assert (ds.bytes, ds.length) == (sum(range(count)), count)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_attaching_reads_one_did_per_name_even_with_stale_statistics(
        factory: Factory) -> None:
    """The planner's statistics on DIDs date from before a bulk registration (here: taken
    with 3 files, then 3,000 registered): attaching 500 of them must still look each name
    up by the primary key, not read every DID of the scope."""
    with factory.begin() as session:
        setup_scope(session)
        rses.add_rse(session, "SITE_A", {})
        session.execute(text("ALTER TABLE dids SET (autovacuum_enabled = false)"))
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": f"seed{i}", "bytes": 1} for i in range(3)])
        dids.add_collection(session, "root", "test", "ds", DIDType.DATASET)
    with factory.begin() as session:
        session.execute(text("ANALYZE dids"))
    with factory.begin() as session:
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": f"f{i:05d}", "bytes": i} for i in range(3000)])
    names = [f"f{i:05d}" for i in range(1000, 1500)]
    # rows of dids read by this connection, not yet published to the statistics views
    counted = text("SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
                   "FROM pg_stat_xact_user_tables WHERE relname = 'dids'")
    with factory() as session:
        before = session.execute(counted).scalar_one()
        dids.attach(session, "root", "test", "ds", [{"scope": "test", "name": n} for n in names])
        read = session.execute(counted).scalar_one() - before
        session.rollback()
    assert read <= len(names) + 20


def test_closed_and_monotonic_collections(factory: Factory) -> None:
    with factory.begin() as session:
        setup_scope(session)
        rses.add_rse(session, "SITE_A", {})
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": "f0", "bytes": 1}, {"scope": "test", "name": "f1",
                                                         "bytes": 1}])
        dids.add_collection(session, "root", "test", "ds", DIDType.DATASET, monotonic=True)
        dids.attach(session, "root", "test", "ds", [{"scope": "test", "name": "f0"}])
        with pytest.raises(UnsupportedOperation, match="monotonic"):
            dids.detach(session, "root", "test", "ds", [{"scope": "test", "name": "f0"}])
        # Rucio's set_status knows only `open`: monotonic is fixed at creation.
        with pytest.raises(UnsupportedStatus):
            dids.set_status(session, "root", "test", "ds", {"monotonic": False})
        assert dids.get_did(session, "test", "ds").monotonic is True
        dids.set_status(session, "root", "test", "ds", {"open": False})
        with pytest.raises(UnsupportedOperation, match="closed"):
            dids.attach(session, "root", "test", "ds", [{"scope": "test", "name": "f1"}])
        # Closing a closed collection, or reopening without being an admin, is refused.
        with pytest.raises(UnsupportedOperation, match="cannot be changed"):
            dids.set_status(session, "root", "test", "ds", {"open": False})
        accounts.add_account(session, "bob", "USER")
        session.execute(update(Scope).where(Scope.scope == "test").values(account="bob"))
        with pytest.raises(AccessDenied):
            dids.set_status(session, "bob", "test", "ds", {"open": True})
        dids.set_status(session, "root", "test", "ds", {"open": True})
        assert dids.get_did(session, "test", "ds").is_open is True


def test_names_are_never_reused(factory: Factory) -> None:
    with factory.begin() as session:
        setup_scope(session)
        session.add(DeletedDID(scope="test", name="gone", did_type=DIDType.DATASET))
    with pytest.raises(DataIdentifierAlreadyExists, match="never reused"), \
            factory.begin() as session:
        dids.add_collection(session, "root", "test", "gone", DIDType.DATASET)


def test_replica_registration_is_all_or_nothing(factory: Factory) -> None:
    with factory.begin() as session:
        setup_scope(session)
        rses.add_rse(session, "SITE_A", {})
        rses.add_rse(session, "TAPE_ND", {"deterministic": False, "rse_type": "TAPE"})
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": "f0", "bytes": 5, "adler32": "00000005"}])
    with pytest.raises(FileConsistencyMismatch), factory.begin() as session:
        replicas.add_replicas(session, "root", "TAPE_ND", [
            {"scope": "test", "name": "new", "bytes": 1, "pfn": "root://h//a/new"},
            {"scope": "test", "name": "f0", "bytes": 6, "pfn": "root://h//a/f0"}])
    with pytest.raises(InvalidObject, match="needs a 'pfn'"), factory.begin() as session:
        replicas.add_replicas(session, "root", "TAPE_ND", [
            {"scope": "test", "name": "f0", "bytes": 5}])
    with pytest.raises(Duplicate), factory.begin() as session:
        replicas.add_replicas(session, "root", "SITE_A", [
            {"scope": "test", "name": "f0", "bytes": 5}])
    with factory() as session:
        assert session.get(DID, ("test", "new")) is None
        assert session.scalar(select(func.count()).select_from(Replica)) == 1
        replica = session.get(Replica, (rses.get_rse(session, "SITE_A").id, "test", "f0"))
        assert replica is not None and replica.tombstone is None and replica.lock_cnt == 0
        assert replica.path == rses.deterministic_path("test", "f0")


def test_deterministic_paths_follow_rucio_hash() -> None:
    # Observed on a real Rucio: file://localhost/data/SITE_A/test/83/44/file_0
    assert rses.deterministic_path("test", "file_0") == "test/83/44/file_0"
    assert rses.deterministic_path("user.jdoe", "x").startswith("user/jdoe/")


def test_rse_attributes_protocols_distances(factory: Factory) -> None:
    with factory.begin() as session:
        row = rses.add_rse(session, "SITE_A", {"city": "Chicago", "availability": 5})
        assert (row.availability_read, row.availability_write, row.availability_delete) == (
            True, False, True)
        rses.set_attribute(session, "SITE_A", "tier", "2")
        rses.set_attribute(session, "SITE_A", "istape", "False")
        # Setting an existing key overwrites it (Rucio merges the row).
        rses.set_attribute(session, "SITE_A", "tier", "3")
        assert rses.list_attributes(session, row) == {"SITE_A": True, "istape": False,
                                                      "tier": "3"}
        rses.add_protocol(session, "SITE_A", {
            "scheme": "https", "hostname": "dav.example.org", "port": 443, "prefix": "/d",
            "impl": "rucio.rse.protocols.webdav.Default",
            "domains": {"wan": {"read": 1, "write": 1, "delete": 1}}})
        with pytest.raises(Duplicate):
            rses.add_protocol(session, "SITE_A", {"scheme": "https",
                                                  "hostname": "dav.example.org",
                                                  "port": 443, "impl": "x"})
        rses.add_rse(session, "SITE_B", {})
        rses.set_distance(session, "SITE_A", "SITE_B", 3)
        assert rses.distances_from(session, "SITE_A", "SITE_B")[0]["distance"] == 3
        assert [r.rse for r in rses.resolve(session, "city=Chicago")] == ["SITE_A"]
        with pytest.raises(InvalidObject):
            rses.add_rse(session, "lower_case", {})
        with pytest.raises(InvalidObject):
            rses.add_rse(session, "SITE_C", {"unknown_column": 1})
