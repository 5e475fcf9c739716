"""Authorization and token behaviour of the REST server, driven by rucio.client.Client,
the rucio CLI and plain HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import requests
from rucio.common import exception as rucio_exc
from sqlalchemy import func, select, update

from stashflow.placement.clock import utcnow
from stashflow.placement.db import make_engine, make_sessionmaker
from stashflow.placement.models import Token

from .conftest import ROOT_PASSWORD, ROOT_USER, Server


def login(server: Server, username: str = ROOT_USER, password: str = ROOT_PASSWORD,
          account: str = "root") -> str:
    response = requests.get(f"{server.url}/auth/userpass", timeout=10, headers={
        "X-Rucio-Username": username, "X-Rucio-Password": password,
        "X-Rucio-Account": account})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["X-Rucio-Auth-Account"] == account
    assert response.headers["X-Rucio-Auth-Token-Expires"].endswith(" UTC")
    return response.headers["X-Rucio-Auth-Token"]


def envelope(response: requests.Response, status: int, name: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["ExceptionClass"] == name
    body = response.json()
    assert body["ExceptionClass"] == name
    assert response.headers["ExceptionMessage"] == body["ExceptionMessage"][:125]
    return str(body["ExceptionMessage"])


@pytest.fixture
def two_accounts(server: Server) -> Server:
    root = server.client()
    root.add_scope("root", "test")
    root.add_rse("SITE_A")
    root.add_replicas("SITE_A", [{"scope": "test", "name": "f1", "bytes": 1}])
    root.add_dataset("test", "ds")
    root.attach_dids("test", "ds", [{"scope": "test", "name": "f1"}])
    root.add_account("alice", "USER", "alice@example.org")
    root.add_identity("alice", "alice", "USERPASS", "alice@example.org", default=True,
                      password="alicepw")
    root.add_scope("alice", "user.alice")
    return server


def test_an_account_cannot_write_another_accounts_scope(two_accounts: Server) -> None:
    alice = two_accounts.client(account="alice", username="alice", password="alicepw")
    assert alice.whoami()["account"] == "alice"
    with pytest.raises(rucio_exc.AccessDenied):
        alice.add_dataset("test", "intruder")
    with pytest.raises(rucio_exc.AccessDenied):
        alice.attach_dids("test", "ds", [{"scope": "test", "name": "f1"}])
    with pytest.raises(rucio_exc.AccessDenied):
        alice.add_replicas("SITE_A", [{"scope": "test", "name": "f2", "bytes": 1}])
    with pytest.raises(rucio_exc.AccessDenied):
        alice.add_scope("root", "stolen")
    with pytest.raises(rucio_exc.AccessDenied):
        alice.add_rse("ALICE_RSE")
    with pytest.raises(rucio_exc.AccessDenied):
        alice.set_local_account_limit("alice", "SITE_A", -1)
    # Reading other scopes is allowed; her own scope is writable.
    assert sorted(alice.list_scopes()) == ["test", "user.alice"]
    alice.add_dataset("user.alice", "mine")
    root = two_accounts.client()
    with pytest.raises(rucio_exc.DataIdentifierNotFound):
        root.get_did("test", "intruder")
    with pytest.raises(rucio_exc.DataIdentifierNotFound):
        root.get_did("test", "f2")
    # The CLI reports the same refusal.
    cli = two_accounts.rucio("did", "add", "--type", "dataset", "test:cli_intruder",
                             account="alice", username="alice", password="alicepw",
                             check=False)
    assert cli.returncode != 0 and "can not write to scope test" in cli.stderr


def test_an_account_cannot_delete_another_accounts_rule(two_accounts: Server) -> None:
    root = two_accounts.client()
    [rule_id] = root.add_replication_rule([{"scope": "test", "name": "ds"}], 1, "SITE_A")
    alice = two_accounts.client(account="alice", username="alice", password="alicepw")
    with pytest.raises(rucio_exc.AccessDenied):
        alice.delete_replication_rule(rule_id)
    with pytest.raises(rucio_exc.AccessDenied):
        alice.update_replication_rule(rule_id, {"lifetime": 1})
    with pytest.raises(rucio_exc.AccessDenied):
        alice.add_replication_rule([{"scope": "test", "name": "ds"}], 1, "SITE_A",
                                   account="root")
    assert root.get_replication_rule(rule_id)["expires_at"] is None
    # Without quota (no limit row = zero) alice cannot place data either.
    with pytest.raises(rucio_exc.InsufficientAccountLimit):
        alice.add_replication_rule([{"scope": "test", "name": "ds"}], 1, "SITE_A")
    root.set_local_account_limit("alice", "SITE_A", -1)
    [own] = alice.add_replication_rule([{"scope": "test", "name": "ds"}], 1, "SITE_A")
    alice.delete_replication_rule(own)
    assert alice.get_replication_rule(own)["expires_at"] is not None


def test_expired_token_gets_401_and_the_client_logs_in_again(server: Server,
                                                           tmp_path: Path) -> None:
    client = server.client()
    client.add_scope("root", "test")
    token = client.auth_token
    engine = make_engine(server.db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            session.execute(update(Token).where(Token.token == token)
                            .values(expires_at=utcnow() - timedelta(seconds=5)))
        stale = requests.get(f"{server.url}/scopes/", timeout=10,
                             headers={"X-Rucio-Auth-Token": token})
        assert "expired" in envelope(stale, 401, "CannotAuthenticate")
        # A fresh client reads the stale token from its cache file, gets 401, logs in again.
        again = server.client()
        assert again.auth_token == token
        assert again.list_scopes() == ["test"]
        assert again.auth_token != token
        with make_sessionmaker(engine)() as session:
            assert session.scalar(select(func.count()).select_from(Token)) >= 2
    finally:
        engine.dispose()
    # The CLI, whose cache holds the same kind of stale token, recovers the same way.
    assert "test" in server.rucio("scope", "list").stdout


def test_token_rules(server: Server) -> None:
    missing = requests.get(f"{server.url}/scopes/", timeout=10)
    assert envelope(missing, 400, "ValueError") == "Token must be set."
    garbage = requests.get(f"{server.url}/scopes/", timeout=10,
                           headers={"X-Rucio-Auth-Token": "root-x-y-z"})
    envelope(garbage, 401, "CannotAuthenticate")
    wrong = requests.get(f"{server.url}/auth/userpass", timeout=10, headers={
        "X-Rucio-Username": ROOT_USER, "X-Rucio-Password": "wrong"})
    envelope(wrong, 401, "CannotAuthenticate")
    token = login(server)
    assert token.startswith("root-ddmlab-")
    ok = requests.get(f"{server.url}/accounts/whoami", timeout=10,
                      headers={"X-Rucio-Auth-Token": token})
    assert ok.status_code == 200 and ok.headers["Content-Type"] == "application/json"
    assert ok.json()["account"] == "root" and "T" in ok.json()["created_at"]
    revoked = requests.post(f"{server.url}/stashflow/v1/auth/revoke", timeout=10,
                            headers={"X-Rucio-Auth-Token": token})
    assert revoked.status_code == 200
    after = requests.get(f"{server.url}/accounts/whoami", timeout=10,
                         headers={"X-Rucio-Auth-Token": token})
    envelope(after, 401, "CannotAuthenticate")
    ping = requests.get(f"{server.url}/ping", timeout=10)
    assert ping.json() == {"version": "41.5.1"}
