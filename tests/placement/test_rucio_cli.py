"""The unmodified `rucio` CLI (new command structure) and rucio.client.Client from
rucio-clients 41.x against a real `stashflow placement serve`, on SQLite and PostgreSQL.
Outputs are checked, not just exit codes."""

from __future__ import annotations

import re

from .conftest import Server

DOMAINS = ('{"wan": {"read": 1, "write": 1, "delete": 1, "third_party_copy_read": 1, '
           '"third_party_copy_write": 1}, "lan": {"read": 1, "write": 1, "delete": 1}}')
RULE_ID = re.compile(r"^[0-9a-f]{32}$", re.M)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def table_rows(text: str) -> list[list[str]]:
    """Cells of a tabulate 'psql'/'simple' table, header and rule lines dropped."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or set(line.strip()) <= set("+-|= "):
            continue
        rows.append([c.strip() for c in line.strip().strip("|").split("|")]
                    if "|" in line else line.split())
    return rows[1:]


def test_data_manager_scenario(server: Server) -> None:
    rucio = server.rucio
    assert rucio("ping").stdout.strip() == "41.5.1"
    whoami = rucio("whoami").stdout
    assert re.search(r"^account\s*:\s*root$", whoami, re.M)
    assert re.search(r"^account_type\s*:\s*SERVICE$", whoami, re.M)

    # scopes
    assert "Added new scope to root: test" in rucio("scope", "add", "--account", "root",
                                                    "test").stdout
    assert ["test", "root"] in table_rows(rucio("scope", "list").stdout)
    assert "test" in rucio("scope", "list", "--account", "root").stdout

    # RSEs, attributes, protocols
    for name in ("SITE_A", "SITE_B", "SITE_C"):
        rucio("rse", "add", name)
    assert lines(rucio("rse", "list").stdout) == ["SITE_A", "SITE_B", "SITE_C"]
    for name, tier in (("SITE_A", "1"), ("SITE_B", "2"), ("SITE_C", "2")):
        rucio("rse", "attribute", "set", name, "--key", "tier", "--value", tier)
    attributes = rucio("rse", "attribute", "list", "SITE_B").stdout
    assert "SITE_B: True" in attributes and "tier: 2" in attributes
    assert "Deleted RSE attribute for SITE_C: tier" in rucio(
        "rse", "attribute", "unset", "SITE_C", "--attribute", "tier").stdout
    assert "tier" not in rucio("rse", "attribute", "list", "SITE_C").stdout
    for name in ("SITE_A", "SITE_B", "SITE_C"):
        rucio("rse", "protocol", "add", name, "--hostname", "localhost", "--scheme", "file",
              "--prefix", f"/data/{name}", "--domain-json", DOMAINS)
    rucio("rse", "protocol", "remove", "SITE_C", "--scheme", "file")
    shown = rucio("rse", "show", "SITE_A").stdout
    assert "deterministic: True" in shown and "lfn2pfn_algorithm: hash" in shown
    assert "prefix: /data/SITE_A" in shown and "tier: 1" in shown
    assert "prefix: /data/SITE_C" not in rucio("rse", "show", "SITE_C").stdout

    # expressions
    assert lines(rucio("rse", "list", "--rses", "tier=1|tier=2").stdout) == [
        "SITE_A", "SITE_B"]
    assert lines(rucio("rse", "list", "--rses", "*\\tier=2").stdout) == ["SITE_A", "SITE_C"]
    bad = rucio("rse", "list", "--rses", "tier=1&(SITE_B", check=False)
    assert bad.returncode != 0
    assert "at position 7" in bad.stderr and "never closed" in bad.stderr

    # account limits
    out = rucio("account", "limit", "set", "root", "--rse", "SITE_B", "--bytes", "10GB").stdout
    assert "Set account limit for account root on RSE SITE_B: 10.000 GB" in out
    assert ["SITE_B", "0.000 B", "10.000 GB", "10.000 GB"] in table_rows(
        rucio("account", "limit", "list", "root").stdout)

    # replicas registered through the Python client
    client = server.client()
    assert client.add_replicas("SITE_A", [
        {"scope": "test", "name": f"file_{i}", "bytes": 1000 + i, "adler32": "0cc737eb"}
        for i in range(4)])

    # collections and content
    assert "Added test:ds1" in rucio("did", "add", "--type", "dataset", "test:ds1").stdout
    rucio("did", "add", "--type", "container", "test:cont1")
    rucio("did", "content", "add", "--to-did", "test:ds1",
          *[f"test:file_{i}" for i in range(4)])
    rucio("did", "content", "add", "--to-did", "test:cont1", "test:ds1")
    content = table_rows(rucio("did", "content", "list", "test:ds1").stdout)
    assert content == [[f"test:file_{i}", "FILE"] for i in range(4)]
    assert table_rows(rucio("did", "content", "list", "test:cont1").stdout) == [
        ["test:ds1", "DATASET"]]

    # listing with filters
    assert table_rows(rucio("did", "list", "test:*").stdout) == [
        ["test:cont1", "CONTAINER"], ["test:ds1", "DATASET"]]
    assert table_rows(rucio("did", "list", "test:*", "--filter", "type=all,bytes>1001")
                      .stdout) == [["test:cont1", "CONTAINER"], ["test:ds1", "DATASET"],
                                   ["test:file_2", "FILE"], ["test:file_3", "FILE"]]
    assert table_rows(rucio("did", "list", "test:*", "--filter", "type=dataset").stdout) == [
        ["test:ds1", "DATASET"]]
    assert lines(rucio("did", "list", "--short", "test:file_*", "--filter", "type=file")
                 .stdout) == [f"test:file_{i}" for i in range(4)]

    # show and metadata
    show = rucio("did", "show", "test:ds1").stdout
    assert re.search(r"^bytes:\s+4006$", show, re.M)
    assert re.search(r"^length:\s+4$", show, re.M) and re.search(r"^open:\s+True$", show, re.M)
    rucio("did", "metadata", "set", "test:ds1", "--key", "project", "--value", "data18")
    rucio("did", "metadata", "set", "test:ds1", "--key", "color", "--value", "blue")
    meta = rucio("did", "metadata", "list", "test:ds1").stdout
    assert re.search(r"^project:\s+data18$", meta, re.M)
    assert re.search(r"^did_type:\s+DATASET$", meta, re.M)
    assert re.search(r"^color:\s+blue$", rucio("did", "metadata", "list", "test:ds1",
                                                "--plugin", "JSON").stdout, re.M)
    assert table_rows(rucio("did", "list", "test:*", "--filter", "project=data18").stdout) == [
        ["test:ds1", "DATASET"]]
    assert table_rows(rucio("did", "list", "test:*", "--filter", "color=red").stdout) == []

    # replicas
    replica_rows = table_rows(rucio("replica", "list", "file", "test:ds1").stdout)
    assert replica_rows[0] == ["test", "file_0", "1.000 kB", "0cc737eb",
                               "SITE_A: file://localhost/data/SITE_A/test/83/44/file_0"]
    assert len(replica_rows) == 4
    dataset = rucio("replica", "list", "dataset", "test:ds1").stdout
    assert ["SITE_A", "4", "4"] in table_rows(dataset)

    # rules
    added = rucio("rule", "add", "test:ds1", "--copies", "1", "--rses", "tier=2").stdout
    [replicating] = RULE_ID.findall(added)
    [ok_rule] = RULE_ID.findall(rucio("rule", "add", "test:ds1", "--copies", "1",
                                      "--rses", "SITE_A").stdout)
    listed = rucio("rule", "list", "--did", "test:ds1").stdout
    assert re.search(rf"^{replicating}\s+root\s+test:ds1\s+REPLICATING\[0/4/0\]\s+tier=2\s+1\s+"
                     r"4\.006 kB", listed, re.M), listed
    assert re.search(rf"^{ok_rule}\s+root\s+test:ds1\s+OK\[4/0/0\]\s+SITE_A\s+1", listed, re.M)
    assert replicating in rucio("rule", "list", "--account", "root").stdout
    show = rucio("rule", "show", ok_rule).stdout
    assert re.search(r"^State:\s+OK$", show, re.M)
    assert re.search(r"^Locks OK/REPLICATING/STUCK:\s+4/0/0$", show, re.M)
    assert re.search(r"^Expires at:\s+None$", show, re.M)
    duplicate = rucio("rule", "add", "test:ds1", "--copies", "1", "--rses", "tier=2",
                      check=False)
    assert duplicate.returncode != 0 and "duplicate rule" in duplicate.stderr.lower()
    rucio("rule", "remove", ok_rule)
    # Soft deletion, as in Rucio: the rule is still shown, now expiring within the hour.
    show = rucio("rule", "show", ok_rule).stdout
    assert re.search(r"^Expires at:\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", show, re.M)
    assert "This replication rule is OK" in rucio("rule", "show", ok_rule, "--examine").stdout

    # distances
    out = rucio("rse", "distance", "set", "SITE_A", "SITE_B", "--distance", "3").stdout
    assert "SITE_A" in out and "SITE_B" in out
    assert "distance=3" in rucio("rse", "distance", "show", "SITE_A", "SITE_B").stdout
    assert client.get_distance("SITE_A", "SITE_B")[0]["distance"] == 3


def test_python_client_calls(server: Server) -> None:
    client = server.client()
    client.add_scope("root", "data")
    client.add_rse("DISK_1")
    client.add_protocol("DISK_1", {"scheme": "https", "hostname": "dav.example.org",
                                   "port": 8443, "prefix": "/store", "impl": "x",
                                   "domains": {"wan": {"read": 1, "write": 1, "delete": 1}}})
    client.add_replicas("DISK_1", [{"scope": "data", "name": f"run/{i}.root", "bytes": 7,
                                    "md5": "0" * 32} for i in range(3)])
    client.add_dataset("data", "run/ds", statuses={"monotonic": True}, meta={"events": 5})
    client.attach_dids("data", "run/ds", [{"scope": "data", "name": f"run/{i}.root"}
                                          for i in range(3)])
    did = client.get_did("data", "run/ds", dynamic_depth="DATASET")
    assert (did["bytes"], did["length"], did["monotonic"]) == (21, 3, True)
    assert client.get_metadata("data", "run/ds")["events"] == 5
    files = list(client.list_files("data", "run/ds"))
    assert [f["name"] for f in files] == [f"run/{i}.root" for i in range(3)]
    found = list(client.list_replicas([{"scope": "data", "name": "run/ds"}],
                                      schemes=["https"], sort="random"))
    assert sorted(found[0]["rses"]["DISK_1"])[0].startswith(
        "https://dav.example.org:8443/store/data/")
    client.close("data", "run/ds")
    assert client.get_did("data", "run/ds")["open"] is False
    [rule_id] = client.add_replication_rule([{"scope": "data", "name": "run/ds"}], 1,
                                            "DISK_1", lifetime=600, comment="hello")
    rule = client.get_replication_rule(rule_id)
    assert rule["state"] == "OK" and rule["comments"] == "hello"
    assert rule["expires_at"] is not None and rule["created_at"].year >= 2024  # datetime
    locks = list(client.list_replica_locks(rule_id))
    assert len(locks) == 3 and {lock["state"] for lock in locks} == {"OK"}
    client.update_replication_rule(rule_id, {"locked": True})
    assert client.get_replication_rule(rule_id)["locked"] is True
    listed = list(client.list_replication_rules({"scope": "data"}))
    assert [r["id"] for r in listed] == [rule_id]
    usage = list(client.get_local_account_usage("root"))
    assert usage[0]["rse"] == "DISK_1" and usage[0]["bytes"] == 21


def test_remaining_client_calls(server: Server) -> None:
    client = server.client()
    client.add_scope("root", "x")
    client.add_rse("DISK_1")
    client.add_protocol("DISK_1", {"scheme": "root", "hostname": "xrd", "port": 1094,
                                   "prefix": "/p", "impl": "x",
                                   "domains": {"wan": {"read": 1}}})
    assert client.get_protocols("DISK_1", scheme="root")[0]["hostname"] == "xrd"
    assert client.get_protocols("DISK_1")["protocols"][0]["scheme"] == "root"
    client.add_replicas("DISK_1", [{"scope": "x", "name": f"f{i}", "bytes": 1}
                                   for i in range(4)])
    client.add_dids([{"scope": "x", "name": "d1", "type": "DATASET"},
                     {"scope": "x", "name": "d2", "type": "DATASET"},
                     {"scope": "x", "name": "c", "type": "CONTAINER"}])
    client.attach_dids_to_dids([
        {"scope": "x", "name": "d1", "dids": [{"scope": "x", "name": "f0"},
                                              {"scope": "x", "name": "f1"}]},
        {"scope": "x", "name": "d2", "dids": [{"scope": "x", "name": "f1"}]},
        {"scope": "x", "name": "c", "dids": [{"scope": "x", "name": "d1"}]}])
    parents = sorted(p["name"] for p in client.list_parent_dids("x", "f1"))
    assert parents == ["d1", "d2"]
    assert sorted(client.list_dids("x", [{"name": "d*"}], did_type="dataset")) == ["d1", "d2"]
    client.set_metadata_bulk("x", "d1", {"project": "p1", "colour": "green"})
    meta = client.get_metadata("x", "d1", plugin="ALL")
    assert (meta["project"], meta["colour"]) == ("p1", "green")
    client.detach_dids("x", "d1", [{"scope": "x", "name": "f0"}])
    assert [c["name"] for c in client.list_content("x", "d1")] == ["f1"]
    client.update_replicas_states("DISK_1", [{"scope": "x", "name": "f2", "state": "U"}])
    [line] = client.list_replicas([{"scope": "x", "name": "f2"}], all_states=True)
    assert line["states"] == {"DISK_1": "UNAVAILABLE"}
    [line] = client.list_replicas([{"scope": "x", "name": "f2"}])
    assert line["rses"] == {}
    client.delete_replicas("DISK_1", [{"scope": "x", "name": "f3"}])
    [line] = client.list_replicas([{"scope": "x", "name": "f3"}], all_states=True)
    assert line["states"] == {}
    client.set_local_account_limit("root", "DISK_1", 100)
    assert client.get_local_account_limits("root") == {"DISK_1": 100}
    client.delete_local_account_limit("root", "DISK_1")
    assert client.get_local_account_limits("root") == {}


def test_overwriting_distances_and_attributes(server: Server) -> None:
    """`rse distance set` on an existing distance goes through update_distance (which
    sends `bidirectional`), `rse distance unset --bidirectional` through DELETE
    `?bidirectional=True`, and `rse attribute set` on an existing key overwrites it, as
    Rucio does."""
    rucio, client = server.rucio, server.client()
    for name in ("SITE_A", "SITE_B", "SITE_C"):
        rucio("rse", "add", name)

    def distance(source: str, dest: str) -> int | None:
        found = client.get_distance(source, dest)
        return int(found[0]["distance"]) if found else None

    rucio("rse", "distance", "set", "SITE_A", "SITE_B", "--distance", "3")
    out = rucio("rse", "distance", "set", "SITE_A", "SITE_B", "--distance", "5").stdout
    assert "Set distance from SITE_A -> SITE_B to 5" in out
    assert "distance=5" in rucio("rse", "distance", "show", "SITE_A", "SITE_B").stdout
    assert distance("SITE_B", "SITE_A") is None
    # Only A -> B exists: the CLI adds B -> A and updates A -> B.
    rucio("rse", "distance", "set", "SITE_A", "SITE_B", "--distance", "7", "--bidirectional")
    assert (distance("SITE_A", "SITE_B"), distance("SITE_B", "SITE_A")) == (7, 7)
    # Both exist: one update_distance(..., bidirectional=True).
    out = rucio("rse", "distance", "set", "SITE_B", "SITE_A", "--distance", "9",
                "--bidirectional").stdout
    assert "Set distances between SITE_B <-> SITE_A to 9" in out
    assert (distance("SITE_A", "SITE_B"), distance("SITE_B", "SITE_A")) == (9, 9)
    # update_distance does not create a distance that does not exist, as in Rucio.
    assert client.update_distance("SITE_A", "SITE_C", {"distance": 4}) is True
    assert distance("SITE_A", "SITE_C") is None
    client.add_distance("SITE_A", "SITE_C", {"distance": 4}, bidirectional=True)
    assert client.delete_distance("SITE_A", "SITE_C") is True  # one direction only
    assert (distance("SITE_A", "SITE_C"), distance("SITE_C", "SITE_A")) == (None, 4)
    out = rucio("rse", "distance", "unset", "SITE_A", "SITE_B", "--bidirectional").stdout
    assert "Deleted distances between SITE_A <-> SITE_B" in out
    assert (distance("SITE_A", "SITE_B"), distance("SITE_B", "SITE_A")) == (None, None)

    rucio("rse", "attribute", "set", "SITE_A", "--key", "tier", "--value", "1")
    out = rucio("rse", "attribute", "set", "SITE_A", "--key", "tier", "--value", "2").stdout
    assert "Added new RSE attribute for SITE_A: tier-2" in out
    attributes = rucio("rse", "attribute", "list", "SITE_A").stdout
    assert "tier: 2" in attributes and "tier: 1" not in attributes
    assert client.list_rse_attributes("SITE_A")["tier"] == "2"


def test_status_knows_only_open(server: Server) -> None:
    import pytest
    from rucio.common.exception import UnsupportedOperation, UnsupportedStatus

    client = server.client()
    client.add_scope("root", "x")
    client.add_dataset("x", "ds", statuses={"monotonic": True})
    with pytest.raises(UnsupportedStatus):
        client.set_status("x", "ds", monotonic=False)
    assert client.get_did("x", "ds")["monotonic"] is True
    assert client.set_status("x", "ds", open=False) is True
    with pytest.raises(UnsupportedOperation):
        client.set_status("x", "ds", open=False)
    assert client.get_did("x", "ds")["open"] is False


def test_rule_update_rse_limits_and_account_attributes(server: Server) -> None:
    """`rucio rule update --stuck --cancel-requests / --boost-rule / --child-rule-id`,
    `rucio rse limit unset` (delete_rse_limits) and account attributes, with an admin
    other than root made through the API."""
    import pytest
    from rucio.common.exception import (
        AccessDenied,
        AccountNotFound,
        Duplicate,
        InputValidationError,
        UnsupportedOperation,
    )

    rucio, client = server.rucio, server.client()
    client.add_scope("root", "x")
    for name in ("SITE_A", "SITE_B", "SITE_C"):
        client.add_rse(name)
    client.add_replicas("SITE_A", [{"scope": "x", "name": f"f{i}", "bytes": 1}
                                   for i in range(2)])
    client.add_dataset("x", "ds")
    client.attach_dids("x", "ds", [{"scope": "x", "name": f"f{i}"} for i in range(2)])
    did = [{"scope": "x", "name": "ds"}]
    [parent] = client.add_replication_rule(did, 1, "SITE_A")
    [child] = client.add_replication_rule(did, 1, "SITE_B")
    [stuck] = client.add_replication_rule(did, 1, "SITE_C")

    out = rucio("rule", "update", stuck, "--stuck", "--cancel-requests").stdout
    assert "Updated Rule" in out
    shown = client.get_replication_rule(stuck)
    assert (shown["state"], shown["locks_stuck_cnt"], shown["locks_replicating_cnt"]) == (
        "STUCK", 2, 0)
    states = {line["name"]: line["states"].get("SITE_C") for line in client.list_replicas(
        [{"scope": "x", "name": "ds"}], all_states=True)}
    assert states == {"f0": "UNAVAILABLE", "f1": "UNAVAILABLE"}
    rucio("rule", "update", stuck, "--boost-rule")
    assert client.get_replication_rule(stuck)["state"] == "STUCK"

    rucio("rule", "update", parent, "--child-rule-id", child)
    assert client.get_replication_rule(parent)["child_rule_id"] == child
    with pytest.raises(UnsupportedOperation):
        client.delete_replication_rule(parent)
    with pytest.raises(InputValidationError):
        client.update_replication_rule(parent, {"child_rule_id": parent})
    rucio("rule", "update", parent, "--child-rule-id", "None")
    assert client.get_replication_rule(parent)["child_rule_id"] is None

    client.set_rse_limits("SITE_A", "MinFreeSpace", 100)
    client.set_rse_limits("SITE_A", "MaxSpaceAvailable", 1000)
    rucio("rse", "limit", "unset", "SITE_A", "--limit", "MinFreeSpace")
    assert client.get_rse_limits("SITE_A") == {"MaxSpaceAvailable": 1000}
    assert client.delete_rse_limits("SITE_A", "NotThere") is True

    client.add_account("bob", "USER", "bob@example.org")
    client.add_identity("bob", "bob", "USERPASS", "bob@example.org", default=True,
                        password="bobpw")
    bob = server.client(account="bob", username="bob", password="bobpw")
    with pytest.raises(AccessDenied):
        bob.add_rse("SITE_BOB")
    with pytest.raises(AccessDenied):
        bob.add_account_attribute("bob", "admin", "True")
    assert client.add_account_attribute("bob", "country", "ch") is True
    with pytest.raises(Duplicate):
        client.add_account_attribute("bob", "country", "de")
    with pytest.raises(AccountNotFound):
        client.add_account_attribute("nobody", "admin", "True")
    rucio("account", "attribute", "set", "bob", "--key", "admin", "--value", "True")
    [attributes] = list(client.list_account_attributes("bob"))
    assert attributes == [{"key": "admin", "value": True}, {"key": "country", "value": "ch"}]
    listed = rucio("account", "attribute", "list", "bob").stdout
    assert "admin" in listed and "country" in listed and "ch" in listed
    # bob is an admin now: he may add RSEs and move other accounts' rules.
    assert bob.add_rse("SITE_BOB") is True
    assert bob.set_rse_limits("SITE_BOB", "MinFreeSpace", 1) is True
    bob.update_replication_rule(parent, {"comment": "checked by bob"})
    assert client.get_replication_rule(parent)["comments"] == "checked by bob"
    rucio("account", "attribute", "unset", "bob", "--key", "admin")
    with pytest.raises(AccountNotFound):
        client.delete_account_attribute("bob", "admin")
    with pytest.raises(AccessDenied):
        bob.add_rse("SITE_BOB2")
    [attributes] = list(client.list_account_attributes("bob"))
    assert attributes == [{"key": "country", "value": "ch"}]
