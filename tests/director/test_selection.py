"""Cache choice: CIDR site map, distances, trusted proxies, rendezvous hashing."""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from pathlib import Path

import pytest

from stashflow.cache.director.registry import Cache
from stashflow.cache.director.selection import (
    UNKNOWN,
    SiteMap,
    SiteMapError,
    client_address,
    rank,
)
from tests.director.helpers import DirectorProcess

SITES = """
distance_step_km = 100

[sites.madison]
networks = ["127.0.0.1/32", "10.1.0.0/16"]
coordinates = [43.07, -89.40]

[sites.lincoln]
networks = ["127.0.0.2/32", "10.2.0.0/16", "10.2.7.0/24"]
coordinates = [40.82, -96.70]

[sites.chicago]
networks = ["10.3.0.0/16", "fd00:3::/32"]
coordinates = [41.88, -87.63]

[sites.lab]
networks = ["10.2.7.128/25"]

[distances.lab]
madison = 5
"""


def test_site_map_lookup_and_distances() -> None:
    import tomllib

    sm = SiteMap.from_dict(tomllib.loads(SITES))
    ip = ipaddress.ip_address
    assert sm.site_of(ip("10.1.2.3")) == "madison"
    assert sm.site_of(ip("10.2.7.200")) == "lab"  # most specific network wins
    assert sm.site_of(ip("10.2.7.1")) == "lincoln"
    assert sm.site_of(ip("fd00:3::1")) == "chicago"
    assert sm.site_of(ip("::ffff:10.3.0.1")) == "chicago"  # v4-mapped
    assert sm.site_of(ip("192.0.2.1")) is None
    assert sm.distance("madison", "madison") == 0
    assert 180 < sm.distance("madison", "chicago") < 200  # ~196 km
    assert 650 < sm.distance("madison", "lincoln") < 750
    assert sm.distance("lab", "madison") == sm.distance("madison", "lab") == 5
    assert sm.distance("lab", "chicago") == UNKNOWN
    assert sm.distance(None, "madison") == UNKNOWN

    with pytest.raises(SiteMapError, match="default_site"):
        SiteMap.from_dict({"default_site": "nope"})
    with pytest.raises(SiteMapError, match="coordinates"):
        SiteMap.from_dict({"sites": {"a": {"coordinates": [100, 0]}}})
    with pytest.raises(SiteMapError, match=r"distances\.a\.b"):
        SiteMap.from_dict({"distances": {"a": {"b": -1}}})


def test_client_address_trusts_only_configured_proxies() -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    ip = ipaddress.ip_address
    assert client_address("192.0.2.9", "10.1.1.1", trusted) == ip("192.0.2.9")
    assert client_address("10.0.0.1", "192.0.2.9", trusted) == ip("192.0.2.9")
    # a chain of trusted proxies: the right-most untrusted hop is the client
    assert client_address("10.0.0.1", "203.0.113.5, 192.0.2.9, 10.9.9.9", trusted) == ip(
        "192.0.2.9"
    )
    # garbage stops the walk
    assert client_address("10.0.0.1", "bogus, 10.9.9.9", trusted) == ip("10.9.9.9")
    assert client_address(None, None, trusted) is None


def test_rank_orders_by_health_distance_then_hash() -> None:
    import tomllib

    sm = SiteMap.from_dict(tomllib.loads(SITES))
    near1 = Cache("n1", "http://n1:1", site="madison")
    near2 = Cache("n2", "http://n2:1", site="madison")
    chicago = Cache("c", "http://c:1", site="chicago")
    lincoln = Cache("l", "http://l:1", site="lincoln")
    unknown = Cache("u", "http://u:1", site=None)
    cands = [(c, "up") for c in (unknown, lincoln, chicago, near2, near1)]
    for path in (f"/ns/{i}" for i in range(50)):
        order = [r.cache.name for r in rank(cands, path, "madison", sm)]
        assert set(order[:2]) == {"n1", "n2"} and order[2:] == ["c", "l", "u"]
    # a full cache goes after every cache that is up, however near
    full = [(near1, "full"), (lincoln, "up")]
    assert [r.cache.name for r in rank(full, "/ns/x", "madison", sm)] == ["l", "n1"]
    # unknown client site: all equal, pure rendezvous hashing
    firsts = Counter(rank(cands, f"/ns/{i}", None, sm)[0].cache.name for i in range(500))
    assert set(firsts) == {"n1", "n2", "c", "l", "u"}
    assert min(firsts.values()) > 50


def _can_bind(addr: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def test_site_selection_by_cidr(tmp_path: Path) -> None:
    sites = tmp_path / "sites.toml"
    sites.write_text(SITES)
    with DirectorProcess(
        tmp_path,
        args=[
            "--namespace",
            "/ns=http://origin.example/ns",
            "--site-map",
            str(sites),
            "--trusted-proxy",
            "127.0.0.1/32",
            "--heartbeat-interval",
            "60s",
        ],
    ) as d:
        d.register("mad", "http://mad.example:8000", site="madison")
        d.register("chi", "http://chi.example:8000", site="chicago")
        d.register("lin", "http://lin.example:8000", site="lincoln")

        def order(**kw: object) -> list[str]:
            resp = d.get("/ns/data.bin", **kw)  # type: ignore[arg-type]
            assert resp.status == 307
            return [u.split("//")[1].split(".")[0] for u, _ in resp.links()]

        assert order() == ["mad", "chi", "lin"]  # 127.0.0.1 is in madison
        assert d.get("/ns/data.bin").headers["x-stashflow-client-site"] == "madison"
        # behind the trusted proxy (127.0.0.1), X-Forwarded-For names the client
        assert order(headers={"X-Forwarded-For": "10.3.0.7"}) == ["chi", "mad", "lin"]
        assert order(headers={"X-Forwarded-For": "10.2.1.1"}) == ["lin", "mad", "chi"]
        if _can_bind("127.0.0.2"):
            # a client really at 127.0.0.2 (lincoln), which is not a trusted proxy: its
            # X-Forwarded-For is ignored
            assert order(source="127.0.0.2") == ["lin", "mad", "chi"]
            assert order(source="127.0.0.2", headers={"X-Forwarded-For": "10.3.0.7"}) == [
                "lin",
                "mad",
                "chi",
            ]
        # the operator's view of the same choice
        loc = d.get("/api/v1.0/director/locate?path=/ns/data.bin&client=10.3.9.9").json()
        assert loc["client_site"] == "chicago"
        assert [c["name"] for c in loc["caches"]] == ["chi", "mad", "lin"]
        assert loc["caches"][0]["distance_km"] == 0
        # an overloaded nearest cache is tried last
        d.register("mad", "http://mad.example:8000", site="madison", load=0.99)
        assert order() == ["chi", "lin", "mad"]


def test_rendezvous_stability(tmp_path: Path) -> None:
    caches = {f"c{i}": f"http://c{i}.example:8000" for i in range(4)}
    paths = [f"/ns/dataset/file{i:04d}.root" for i in range(240)]
    args = ["--namespace", "/ns=http://origin.example/ns", "--heartbeat-interval", "60s"]

    def first_choices(d: DirectorProcess) -> dict[str, str]:
        out = {}
        for p in paths:
            loc = d.get(p).headers["location"]
            out[p] = loc.split("//")[1].split(".")[0]
        return out

    with DirectorProcess(tmp_path / "a", args=args) as d:
        for name, url in caches.items():
            d.register(name, url)
        before = first_choices(d)
        assert first_choices(d) == before  # same path -> same cache
        spread = Counter(before.values())
        assert set(spread) == set(caches) and min(spread.values()) >= 30
        # removing c2 moves only the objects c2 had, spread over the others
        d.post("/api/v1.0/director/unregisterCache", {"name": "c2"})
        after = first_choices(d)
        for p in paths:
            if before[p] != "c2":
                assert after[p] == before[p], p
            else:
                assert after[p] != "c2"
        assert len({after[p] for p in paths if before[p] == "c2"}) == 3

    # a new director process, caches registered in another order: the same choices
    with DirectorProcess(tmp_path / "b", args=args) as d2:
        for name in reversed(list(caches)):
            d2.register(name, caches[name])
        assert first_choices(d2) == before
