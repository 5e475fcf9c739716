"""The server process itself: several workers on one port, the in-process judge-cleaner
and judge-repairer, clean shutdown."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from rucio.common import exception as rucio_exc

from .conftest import bootstrapped_home, start_server, stop_server


def test_workers_share_the_port_and_stop_cleanly(db_url: str, tmp_path: Path) -> None:
    srv = start_server(db_url, bootstrapped_home(db_url, tmp_path), "--workers", "2")
    try:
        client = srv.client()
        client.add_scope("root", "test")
        # Each request may land on either worker; all see the same catalog.
        for _ in range(10):
            assert client.list_scopes() == ["test"]
            assert requests.get(f"{srv.url}/ping", timeout=10).json() == {"version": "41.5.1"}
    finally:
        assert stop_server(srv) == 0


def test_cleaner_removes_expired_rules(db_url: str, tmp_path: Path) -> None:
    srv = start_server(db_url, bootstrapped_home(db_url, tmp_path), "--cleaner-interval",
                       "0.3")
    try:
        client = srv.client()
        client.add_scope("root", "test")
        client.add_rse("SITE_A")
        client.add_replicas("SITE_A", [{"scope": "test", "name": "f", "bytes": 1}])
        [short] = client.add_replication_rule([{"scope": "test", "name": "f"}], 1, "SITE_A",
                                              lifetime=1)
        [locked] = client.add_replication_rule([{"scope": "test", "name": "f"}], 1,
                                               "SITE_A|SITE_A", lifetime=1, locked=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.get_replication_rule(short)
            except rucio_exc.RuleNotFound:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the judge-cleaner did not remove the expired rule within 20 s")
        # Locked rules are protected from expiry.
        assert client.get_replication_rule(locked)["locked"] is True
        [lock] = list(client.list_replica_locks(locked))
        assert lock["state"] == "OK"
    finally:
        assert stop_server(srv) == 0


def test_repairer_repairs_stuck_rules(db_url: str, tmp_path: Path) -> None:
    srv = start_server(db_url, bootstrapped_home(db_url, tmp_path), "--repairer-interval",
                       "0.3")
    try:
        client = srv.client()
        client.add_scope("root", "test")
        client.add_rse("SITE_A")
        client.add_rse("SITE_B")
        client.add_replicas("SITE_A", [{"scope": "test", "name": f"f{i}", "bytes": 1}
                                       for i in range(2)])
        client.add_dataset("test", "ds")
        client.attach_dids("test", "ds", [{"scope": "test", "name": "f0"}])
        [rule_id] = client.add_replication_rule([{"scope": "test", "name": "ds"}], 1,
                                                "SITE_B")
        client.update_rse("SITE_B", {"availability_write": False})
        client.attach_dids("test", "ds", [{"scope": "test", "name": "f1"}])
        # The repairer runs meanwhile but cannot place f1 on an RSE closed for writing.
        rule = client.get_replication_rule(rule_id)
        assert rule["state"] == "STUCK" and "not writable" in rule["error"]
        client.update_rse("SITE_B", {"availability_write": True})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rule = client.get_replication_rule(rule_id)
            if rule["state"] != "STUCK":
                break
            time.sleep(0.2)
        else:
            pytest.fail("the judge-repairer did not repair the stuck rule within 20 s")
        assert rule["state"] == "REPLICATING" and rule["error"] is None
        assert rule["locks_replicating_cnt"] == 2
        locks = {(lock["name"], lock["rse"]) for lock in client.list_replica_locks(rule_id)}
        assert locks == {("f0", "SITE_B"), ("f1", "SITE_B")}
    finally:
        assert stop_server(srv) == 0


def test_identity_with_several_accounts_must_choose(db_url: str, tmp_path: Path) -> None:
    srv = start_server(db_url, bootstrapped_home(db_url, tmp_path))
    try:
        root = srv.client()
        root.add_account("team", "GROUP", "team@example.org")
        root.add_account("alice", "USER", "alice@example.org")
        root.add_identity("alice", "shared", "USERPASS", "a@example.org", password="pw")
        root.add_identity("team", "shared", "USERPASS", "a@example.org", password="pw")
        response = requests.get(f"{srv.url}/auth/userpass", timeout=10, headers={
            "X-Rucio-Username": "shared", "X-Rucio-Password": "pw"})
        assert response.status_code == 206 and response.json() == ["alice", "team"]
        chosen = requests.get(f"{srv.url}/auth/userpass", timeout=10, headers={
            "X-Rucio-Username": "shared", "X-Rucio-Password": "pw", "X-Rucio-Account": "team"})
        assert chosen.status_code == 200
        assert chosen.headers["X-Rucio-Auth-Token"].startswith("team-shared-")
    finally:
        stop_server(srv)


@pytest.mark.parametrize("backend", ["postgresql"])  # SQLite has no connections to lose
def test_connections_lost_under_the_server_are_replaced(db_url: str, tmp_path: Path) -> None:
    """PostgreSQL restarted or a connection killed by an operator: the pooled connections
    are dead, and the next requests reconnect instead of failing (the server does not ping
    before every request; a transaction that fails on a dead connection is run again)."""
    from .conftest import _pg_admin

    srv = start_server(db_url, bootstrapped_home(db_url, tmp_path), "--workers", "2")
    try:
        client = srv.client()
        client.add_scope("root", "test")
        database = db_url.rsplit("/", 1)[1]
        for round_ in range(3):
            with _pg_admin() as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchone()
            assert killed is not None and killed[0] >= 1
            for _ in range(4):  # each worker's pool is hit at least once
                assert client.list_scopes() == ["test"]
            client.add_dataset("test", f"after_{round_}")
        assert {d for d in client.list_dids("test", {"name": "after_*"})} == {
            "after_0", "after_1", "after_2"}
    finally:
        assert stop_server(srv) == 0
