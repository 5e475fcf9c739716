"""The Pelican protocol as a real director process answers it: discovery over TLS,
307 redirects with `Link` and `X-Pelican-Namespace`, origin redirects, listings,
errors, and the operator API."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from multidict import CIMultiDict

from tests.director.helpers import TLS, DirectorProcess, request

ORIGIN = "https://origin.example:8443"
CACHE_A = "http://cache-a.example:8000"
CACHE_B = "https://cache-b.example:8443"
SERVED = ["/pub", "/pub/sub", "/prot"]


@pytest.fixture(scope="module")
def director(tmp_path_factory: pytest.TempPathFactory, tls: TLS) -> Iterator[DirectorProcess]:
    d = DirectorProcess(
        Path(tmp_path_factory.mktemp("director")),
        args=[
            "--namespace",
            f"/pub={ORIGIN}/pub",
            "--namespace",
            "/pub/sub=file:///srv/sub",
            "--namespace",
            f"/prot={ORIGIN}/prot,https://origin2.example/prot",
            "--namespace",
            "/lonely=https://lonely.example:8443/lonely",
            "--protected",
            "/prot",
            "--issuer",
            "https://issuer.example",
            "--heartbeat-interval",
            "120s",
        ],
        tls=tls,
    )
    with d:
        for name, url in (("cache-a", CACHE_A), ("cache-b", CACHE_B)):
            resp = d.register(name, url, namespaces=SERVED)
            assert resp.status == 200, resp.body
        yield d


def test_discovery_over_tls(director: DirectorProcess) -> None:
    resp = director.get("/.well-known/pelican-configuration")
    assert resp.status == 200
    doc = resp.json()
    assert doc == {
        "director_endpoint": director.url,
        "namespace_registration_endpoint": director.url,
        "jwks_uri": director.url + "/.well-known/issuer.jwks",
    }
    jwks = director.get("/.well-known/issuer.jwks")
    assert jwks.status == 200 and jwks.json() == {"keys": []}
    # a client that does not trust our CA refuses the certificate
    with pytest.raises(ssl.SSLCertVerificationError):
        request(
            director.url + "/.well-known/pelican-configuration",
            ssl_context=ssl.create_default_context(),
        )


LINK_RE = re.compile(r'^<([^>]+)>; rel="duplicate"; pri=(\d+); depth=(\d+)$')


def test_redirect_headers_are_exact(director: DirectorProcess) -> None:
    resp = director.get("/pub/run%201/file.root")
    assert resp.status == 307
    items = resp.headers["link"].split(", ")
    assert len(items) == 2
    parsed = [LINK_RE.match(item) for item in items]
    assert all(parsed), resp.headers["link"]
    urls = [m.group(1) for m in parsed if m]
    assert [m.group(2) for m in parsed if m] == ["1", "2"]
    assert {m.group(3) for m in parsed if m} == {"1"}
    assert sorted(urls) == sorted(
        [f"{CACHE_A}/pub/run%201/file.root", f"{CACHE_B}/pub/run%201/file.root"]
    )
    assert resp.headers["location"] == urls[0]
    assert resp.headers["x-pelican-namespace"] == (
        f"namespace=/pub, require-token=false, collections-url={ORIGIN}"
    )
    assert "x-pelican-authorization" not in resp.headers
    assert resp.json()["candidates"] == urls

    head = director.get("/pub/run%201/file.root", method="HEAD")
    assert head.status == 307 and head.body == b""
    assert head.headers["location"] == urls[0]
    assert head.headers["link"] == resp.headers["link"]

    # the explicit Pelican form answers the same
    explicit = director.get("/api/v1.0/director/object/pub/run%201/file.root")
    assert explicit.status == 307 and explicit.headers["link"] == resp.headers["link"]


def test_pelicanfs_parses_our_answer(director: DirectorProcess) -> None:
    from pelicanfs import dir_header_parser as parser  # a test dependency: never skipped
    resp = director.get("/pub/a/b.txt")
    parsed = parser.parse_director_response(CIMultiDict(resp.headers))
    assert parsed.object_servers == [u for u, _ in resp.links()]
    assert parsed.location == parsed.object_servers[0]
    assert parsed.x_pel_ns_hdr is not None
    assert parsed.x_pel_ns_hdr.namespace == "/pub"
    assert parsed.x_pel_ns_hdr.collections_url == ORIGIN
    assert parsed.x_pel_ns_hdr.require_token is False


def test_longest_prefix_on_segment_boundaries(director: DirectorProcess) -> None:
    nested = director.get("/pub/sub/x.dat")
    assert nested.status == 307
    # a file:// origin has no listing endpoint for clients: no collections-url
    assert nested.headers["x-pelican-namespace"] == "namespace=/pub/sub, require-token=false"
    assert {p["depth"] for _, p in nested.links()} == {"2"}
    sibling = director.get("/pub/subway/x.dat")
    assert sibling.headers["x-pelican-namespace"].startswith("namespace=/pub, ")
    assert director.get("/pubx/a").status == 404


def test_protected_namespace(director: DirectorProcess) -> None:
    resp = director.get("/prot/secret.bin")
    assert resp.status == 307
    assert resp.headers["x-pelican-namespace"] == (
        f"namespace=/prot, require-token=true, collections-url={ORIGIN}"
    )
    assert resp.headers["x-pelican-authorization"] == "issuer=https://issuer.example"
    gen = resp.headers["x-pelican-token-generation"].split(", ")
    assert "issuer=https://issuer.example" in gen
    # origin.example cannot be asked for its issuers' base paths: scopes are absolute
    assert "base-path=/" in gen


def test_origin_endpoint(director: DirectorProcess) -> None:
    resp = director.get("/api/v1.0/director/origin/prot/dir/f.txt?authz=abc")
    assert resp.status == 307
    assert resp.headers["location"] == f"{ORIGIN}/prot/dir/f.txt?authz=abc"
    assert [u for u, _ in resp.links()] == [
        f"{ORIGIN}/prot/dir/f.txt",
        "https://origin2.example/prot/dir/f.txt",
    ]
    assert resp.headers["x-pelican-namespace"].startswith("namespace=/prot, require-token=true")
    # a namespace whose only origin clients cannot reach
    none = director.get("/api/v1.0/director/origin/pub/sub/f")
    assert none.status == 404
    assert "no origin clients can reach" in none.json()["error"]
    # writes on the object path go to the origin too
    put = director.get("/pub/new.txt", method="PUT", data=b"x")
    assert put.status == 307 and put.headers["location"] == f"{ORIGIN}/pub/new.txt"


def test_query_is_kept_on_location_only(director: DirectorProcess) -> None:
    resp = director.get("/pub/f?authz=tok")
    assert resp.headers["location"].endswith("/pub/f?authz=tok")
    assert all("authz" not in u for u, _ in resp.links())


def test_propfind_points_at_the_listing_endpoint(director: DirectorProcess) -> None:
    resp = director.get("/pub/dir/", method="PROPFIND", headers={"Depth": "1"})
    assert resp.status == 307
    assert resp.headers["location"] == f"{ORIGIN}/pub/dir/"
    assert resp.links() == [
        (f"{ORIGIN}/pub/dir/", {"rel": '"duplicate"', "pri": "1", "depth": "1"})
    ]
    assert resp.headers["x-pelican-namespace"] == (
        f"namespace=/pub, require-token=false, collections-url={ORIGIN}"
    )
    from pelicanfs import dir_header_parser as parser  # a test dependency: never skipped
    assert parser.get_collections_url(CIMultiDict(resp.headers)) == ORIGIN
    # no listing endpoint: 404 that says so
    nolist = director.get("/pub/sub/dir/", method="PROPFIND")
    assert nolist.status == 404 and "listing" in nolist.json()["error"]


def test_unknown_namespace_and_bad_paths(director: DirectorProcess) -> None:
    resp = director.get("/nowhere/file")
    assert resp.status == 404
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == {
        "error": "no namespace serves /nowhere/file",
        "status": 404,
        "path": "/nowhere/file",
    }
    bad = director.get("/pub/a%00b")
    assert bad.status == 400 and bad.json()["status"] == 400
    assert director.get("/pub/a//b").status == 400
    assert director.get("/api/v1.0/director/nothing").status == 404
    assert director.get("/pub/x", method="PATCH").status == 405


def test_fallback_to_origin_when_no_cache_serves(director: DirectorProcess) -> None:
    resp = director.get("/lonely/f.txt")
    assert resp.status == 307
    assert resp.headers["location"] == "https://lonely.example:8443/lonely/f.txt"
    assert resp.headers["x-stashflow-fallback"] == "origin"
    assert "no cache is alive" in resp.headers["x-stashflow-fallback-reason"]
    assert director.metrics()['stashflow_director_no_cache_total{namespace="/lonely"}'] >= 1


def test_operator_api_and_metrics(director: DirectorProcess) -> None:
    spaces = {
        n["prefix"]: n for n in director.get("/api/v1.0/director/namespaces").json()["namespaces"]
    }
    assert set(spaces) == {"/pub", "/pub/sub", "/prot", "/lonely"}
    assert spaces["/prot"]["require_token"] is True
    assert spaces["/prot"]["issuer"] == "https://issuer.example"
    assert spaces["/pub"]["collections_url"] == ORIGIN
    assert spaces["/pub"]["caches"] == ["cache-a", "cache-b"]
    assert spaces["/lonely"]["caches"] == []
    caches = director.caches()
    assert caches["cache-a"]["state"] == "up"
    assert caches["cache-a"]["url"] == CACHE_A
    assert caches["cache-a"]["heartbeats"] >= 1
    assert caches["cache-a"]["free_bytes"] == 10**12
    assert caches["cache-a"]["last_heartbeat"] > 0

    before = director.metrics()
    for _ in range(3):
        director.get("/pub/metered.txt")
    after = director.metrics()
    key = 'stashflow_director_redirects_total{kind="cache",namespace="/pub"}'
    assert after[key] - before.get(key, 0) == 3
    cache_total = sum(
        v for k, v in after.items() if k.startswith("stashflow_director_cache_redirects_total{")
    )
    assert cache_total >= 3
    assert after['stashflow_director_caches{state="up"}'] == 2
    assert after['stashflow_director_heartbeats_total{cache="cache-a"}'] >= 1

    locate = director.get("/api/v1.0/director/locate?path=/pub/metered.txt").json()
    assert locate["namespace"] == "/pub"
    assert locate["caches"][0]["name"] in ("cache-a", "cache-b")
