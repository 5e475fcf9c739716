"""Bad input gets a clean 4xx with Rucio's error envelope and writes nothing; and the wire
details the rucio client depends on (content types, empty streams, dates)."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import requests
from rucio.common import exception as rucio_exc
from sqlalchemy import func, inspect, select, table

from stashflow.placement.db import make_engine

from .conftest import Server
from .test_rest_auth import envelope, login


class Http:
    def __init__(self, server: Server) -> None:
        self.url = server.url
        self.headers = {"X-Rucio-Auth-Token": login(server)}

    def __call__(self, method: str, path: str, body: Any = None,
                 raw: bytes | str | None = None) -> requests.Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        # Like the rucio client: JSON text without a Content-Type header.
        return requests.request(method, self.url + path, data=data, headers=self.headers,
                                timeout=30)

    def stats(self) -> dict[str, Any]:
        response = self("GET", "/stashflow/v1/stats")
        assert response.status_code == 200
        return dict(response.json())


def row_counts(server: Server) -> dict[str, int]:
    """Rows of every table of the catalog's schema, read from the database itself, so that
    a refused write to any table (RSEs, accounts, scopes, limits, protocols, ...) shows."""
    engine = make_engine(server.db_url)
    try:
        with engine.connect() as conn:
            names = inspect(conn).get_table_names()
            assert len(names) > 20
            return {name: int(conn.scalar(select(func.count()).select_from(table(name))) or 0)
                    for name in names}
    finally:
        engine.dispose()


@pytest.fixture
def http(server: Server) -> Http:
    client = server.client()
    client.add_scope("root", "test")
    client.add_rse("SITE_A")
    client.add_replicas("SITE_A", [{"scope": "test", "name": "f1", "bytes": 10}])
    client.add_dataset("test", "ds")
    client.attach_dids("test", "ds", [{"scope": "test", "name": "f1"}])
    return Http(server)


RULE = {"dids": [{"scope": "test", "name": "ds"}], "copies": 1, "rse_expression": "SITE_A"}


def test_bad_input_is_refused_cleanly_and_writes_nothing(http: Http, server: Server,
                                                         tmp_path: Any) -> None:
    # Logged in before counting: a login writes a token, which is not what is checked.
    client = server.client()
    before, rows_before = http.stats(), row_counts(server)
    # malformed JSON, wrong JSON shapes
    envelope(http("POST", "/rules/", raw="{not json"), 400, "ValueError")
    envelope(http("POST", "/rules/", raw=b"\xff\xfe"), 400, "ValueError")
    envelope(http("POST", "/rules/", raw="[1, 2]"), 400, "ValueError")
    envelope(http("POST", "/replicas", raw='{"rse": "SITE_A", "files": [1]}'), 400,
             "InvalidObject")
    envelope(http("POST", "/rules/", {**RULE, "copies": "2"}), 400, "InvalidObject")
    envelope(http("POST", "/rules/", {"copies": 1}), 400, "KeyError")
    # unknown fields
    message = envelope(http("POST", "/rules/", {**RULE, "run_this": "rm -rf /"}), 400,
                       "InvalidObject")
    assert "run_this" in message
    envelope(http("POST", "/dids/test/newds", {"type": "DATASET", "colour": "red"}), 400,
             "InvalidObject")
    # names violating the patterns
    envelope(http("POST", "/dids/test/" + quote_plus("bad name"), {"type": "DATASET"}), 400,
             "InvalidObject")
    envelope(http("POST", "/dids/test/" + quote_plus("-leading"), {"type": "DATASET"}), 400,
             "InvalidObject")
    envelope(http("POST", "/rses/lower_case", {}), 400, "InvalidObject")
    envelope(http("POST", "/accounts/root/scopes/" + quote("bad!scope")), 400,
             "InvalidObject")
    envelope(http("POST", "/accounts/Upper", {"type": "USER"}), 400, "InvalidObject")
    envelope(http("POST", "/dids/test/ds2", {"type": "FILE"}), 400, "InvalidObject")
    # a 1 MB DID name, in the URL and in a body
    huge = "a" * 1_000_000
    message = envelope(http("POST", f"/dids/test/{huge}", {"type": "DATASET"}), 400,
                       "InvalidObject")
    assert "1000000 characters" in message and len(message) < 500
    envelope(http("POST", "/replicas", {"rse": "SITE_A", "files": [
        {"scope": "test", "name": huge, "bytes": 1}]}), 400, "InvalidObject")
    envelope(http("GET", f"/dids/test/{huge}"), 404, "DataIdentifierNotFound")
    # expressions with unbalanced parentheses
    message = envelope(http("GET", "/rses/?expression=" + quote("SITE_A&(SITE_A")), 400,
                       "InvalidRSEExpression")
    assert "position 7" in message
    envelope(http("POST", "/rules/", {**RULE, "rse_expression": "(SITE_A))"}), 409,
             "InvalidRSEExpression")
    # `filters` carrying code is never evaluated
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    for filters in (code, "[{'name': (lambda: 1)()}]", "[{'a': 1}] + [{'b': 2}]", "x" * 20_000,
                    "[" * 1000 + "]" * 1000):
        response = http("GET", "/dids/test/dids/search?filters=" + quote_plus(filters))
        envelope(response, 400, "InvalidObject")
    assert not os.path.exists(marker)
    envelope(http("GET", "/dids/test/dids/search?filters=" + quote_plus(
        "[{'name': '*', 'bytes.like': 3}]")), 400, "InvalidObject")
    envelope(http("GET", "/dids/test/dids/search?filters=" + quote_plus(
        "[{'bytes.gt': 1, 'colour': 'red'}]")), 400, "InvalidObject")
    # wrong types inside otherwise valid requests
    envelope(http("POST", "/rses/SITE_B", {"deterministic": "yes"}), 400, "InvalidObject")
    envelope(http("POST", "/accounts/root/limits/local/SITE_A", {"bytes": "lots"}), 400,
             "InvalidObject")
    envelope(http("POST", "/rses/SITE_A/protocols/https", {"port": "x"}), 400,
             "InvalidObject")
    # refused writes to the other tables
    envelope(http("PUT", "/rses/SITE_A/limits", {"name": "MinFreeSpace", "value": "1"}), 400,
             "InvalidObject")
    envelope(http("DELETE", "/rses/SITE_A/limits", {}), 400, "KeyError")
    envelope(http("DELETE", "/rses/SITE_A/limits", {"name": 1}), 400, "InvalidObject")
    envelope(http("POST", "/accounts/root/attr/" + quote("bad key!"), {"value": "1"}), 400,
             "InvalidObject")
    envelope(http("POST", "/accounts/root/attr/k", {"value": True}), 400, "InvalidObject")
    envelope(http("POST", "/accounts/nobody/attr/k", {"value": "1"}), 404,
             "AccountNotFound")
    envelope(http("POST", "/rses/SITE_A/attr/tier", {"colour": "1"}), 400, "InvalidObject")
    envelope(http("POST", "/accounts/root/limits/local/NO_SUCH_RSE", {"bytes": 1}), 404,
             "RSENotFound")
    envelope(http("POST", "/accounts/nobody/scopes/newscope"), 404, "AccountNotFound")
    envelope(http("POST", "/rses/SITE_A/distances/NO_SUCH_RSE", {"distance": 1}), 404,
             "RSENotFound")
    assert http.stats() == before
    assert row_counts(server) == rows_before
    # The rucio client surfaces the same refusals as its own exceptions.
    with pytest.raises(rucio_exc.InvalidObject):
        client.add_dataset("test", huge)
    with pytest.raises(rucio_exc.InvalidRSEExpression):
        list(client.list_rses("SITE_A|(SITE_A"))
    with pytest.raises(rucio_exc.InvalidRSEExpression):
        client.add_replication_rule([{"scope": "test", "name": "ds"}], 1, "SITE_A&(")
    with pytest.raises(rucio_exc.DataIdentifierNotFound):
        client.get_did("test", "nothing")
    with pytest.raises(rucio_exc.RuleNotFound):
        client.get_replication_rule("0" * 32)
    assert http.stats() == before
    assert row_counts(server) == rows_before


def test_wire_details(http: Http, server: Server) -> None:
    empty = http("GET", "/rules/?scope=test")
    assert (empty.status_code, empty.text) == (200, "")
    assert empty.headers["Content-Type"] == "application/x-json-stream"
    http("POST", "/rules/", RULE)
    listing = http("GET", "/rules/?scope=test")
    assert listing.headers["Content-Type"] == "application/x-json-stream"
    [line] = listing.text.splitlines()
    rule = json.loads(line)
    assert rule["created_at"].endswith(" UTC") and rule["state"] == "OK"
    created = http("POST", "/rules/", {**RULE, "copies": 1, "rse_expression": "SITE_A|SITE_A"})
    assert created.status_code == 201 and len(json.loads(created.text)[0]) == 32
    single = http("GET", "/dids/test/ds")
    assert single.headers["Content-Type"] == "application/json"
    assert single.json()["type"] == "DATASET"
    # DELETE with a body, no Content-Type (as the client sends it)
    detached = http("DELETE", "/dids/test/ds/dids", {"dids": [{"scope": "test",
                                                               "name": "f1"}]})
    assert detached.status_code == 200
    assert http("GET", "/dids/test/ds/dids").text == ""
    assert http("GET", "/scopes/owner").json() == [{"scope": "test", "account": "root"}]
    not_found = http("GET", "/no/such/path")
    envelope(not_found, 404, "NotFound")
    openapi = requests.get(f"{server.url}/stashflow/v1/openapi.json", timeout=10)
    assert openapi.status_code == 200 and "/stashflow/v1/stats" in openapi.json()["paths"]


def test_extensions_and_global_limits(http: Http, server: Server) -> None:
    client = server.client()
    client.add_rse("SITE_B")
    client.add_rse_attribute("SITE_B", "tier", "2")
    client.add_account("bob", "USER", "bob@example.org")
    client.set_account_limit("bob", "tier=2", 5000, "global")
    client.set_account_limit("bob", "SITE_B", -1, "local")
    assert client.get_global_account_limits("bob") == {
        "tier=2": {"resolved_rses": ["SITE_B"], "limit": 5000}}
    assert client.get_local_account_limits("bob") == {"SITE_B": float("inf")}
    [usage] = list(client.get_global_account_usage("bob"))
    assert (usage["rse_expression"], usage["bytes"], usage["bytes_remaining"]) == (
        "tier=2", 0, 5000)
    # Bulk extension: register and attach in one transaction.
    created = http("POST", "/stashflow/v1/datasets/test/ds/replicas", {
        "rse": "SITE_B", "files": [{"scope": "test", "name": f"bulk{i}", "bytes": 5}
                                   for i in range(3)]})
    assert created.status_code == 201 and created.json() == {"registered": 3}
    assert [c["name"] for c in client.list_content("test", "ds")] == [
        "bulk0", "bulk1", "bulk2", "f1"]
    before = http.stats()
    # A failure half-way (bulk1 exists already on SITE_B) leaves nothing behind.
    failed = http("POST", "/stashflow/v1/datasets/test/ds/replicas", {
        "rse": "SITE_B", "files": [{"scope": "test", "name": "bulk9", "bytes": 5},
                                   {"scope": "test", "name": "bulk1", "bytes": 5}]})
    envelope(failed, 409, "Duplicate")
    assert http.stats() == before
    assert before["replicas"] == {"AVAILABLE": 4} and before["dids"]["FILE"] == 4
