"""`list_replicas` over collections: each file once, each of its replicas once and in RSE
order, whatever the way it was reached (several datasets, a container, by name), on SQLite
and PostgreSQL. A dataset's files and replicas are read in one joined query and files
named directly by a lookup: these tests hold both paths to the same answer."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from stashflow.placement import dids, replicas, rses, scopes
from stashflow.placement.models import DIDType

Factory = sessionmaker[Session]
PFN_N = "https://tape.example.org:443/archive/f4"


def _protocol(host: str, lan: bool = False) -> dict[str, Any]:
    domains: dict[str, Any] = {"wan": {"read": 1}}
    if lan:
        domains["lan"] = {"read": 1}
    return {"scheme": "root", "hostname": host, "port": 1094, "prefix": "/store",
            "impl": "x", "domains": domains}


@pytest.fixture
def catalog(factory: Factory) -> Factory:
    """f0 on A, B and C; f1 on A; f2 UNAVAILABLE on B; f3 without replicas; f4 on the
    non-deterministic N. Datasets d1 = f0..f3, d2 = f0, f4; container c = d1, d2."""
    with factory.begin() as s:
        scopes.add_scope(s, "root", "t", "root")
        for name in ("A", "B", "C"):
            rses.add_rse(s, name, {})
            rses.add_protocol(s, name, _protocol(f"{name.lower()}.example.org",
                                                 lan=name == "C"))
        rses.add_rse(s, "N", {"deterministic": False})
        rses.add_protocol(s, "N", _protocol("n.example.org"))
        replicas.add_replicas(s, "root", "A", [
            {"scope": "t", "name": n, "bytes": 7, "adler32": "0000000a"}
            for n in ("f0", "f1", "f3")])
        replicas.add_replicas(s, "root", "B", [{"scope": "t", "name": "f0", "bytes": 7},
                                               {"scope": "t", "name": "f2", "bytes": 7,
                                                "state": "U"}])
        replicas.add_replicas(s, "root", "C", [{"scope": "t", "name": "f0", "bytes": 7}])
        replicas.add_replicas(s, "root", "N", [{"scope": "t", "name": "f4", "bytes": 7,
                                                "pfn": PFN_N}])
        replicas.delete_replicas(s, "root", "A", [{"scope": "t", "name": "f3"}])
        for name in ("d1", "d2"):
            dids.add_collection(s, "root", "t", name, DIDType.DATASET)
        dids.add_collection(s, "root", "t", "c", DIDType.CONTAINER)
        dids.attach(s, "root", "t", "d1", [{"scope": "t", "name": f"f{i}"} for i in range(4)])
        dids.attach(s, "root", "t", "d2", [{"scope": "t", "name": n} for n in ("f0", "f4")])
        dids.attach(s, "root", "t", "c", [{"scope": "t", "name": n} for n in ("d1", "d2")])
    return factory


def listed(factory: Factory, *names: str, **options: Any) -> dict[str, dict[str, Any]]:
    with factory() as s:
        lines = replicas.list_replicas(s, [{"scope": "t", "name": n} for n in names],
                                       **options)
    found = {line["name"]: line for line in lines}
    assert len(found) == len(lines), "a file was listed twice"
    return found


def rse_order(factory: Factory, *names: str) -> list[str]:
    with factory() as s:
        ids = {name: rses.get_rse(s, name).id for name in names}
    return sorted(names, key=ids.__getitem__)


def test_a_container_lists_each_file_and_replica_once(catalog: Factory) -> None:
    found = listed(catalog, "c")
    assert list(found) == ["f0", "f1", "f2", "f3", "f4"]  # depth first, by name
    f0 = found["f0"]
    order = rse_order(catalog, "A", "B", "C")
    # three replicas, not six: f0 is in both datasets
    assert list(f0["states"]) == order and set(f0["states"].values()) == {"AVAILABLE"}
    assert list(f0["rses"]) == order
    assert [entry["rse"] for entry in f0["pfns"].values()] == order
    assert [entry["priority"] for entry in f0["pfns"].values()] == [1, 2, 3]
    assert f0["rses"]["A"] == ["root://a.example.org:1094/store/"
                               + rses.deterministic_path("t", "f0")]
    assert (f0["bytes"], f0["adler32"], f0["md5"]) == (7, "0000000a", None)
    assert found["f2"]["states"] == {} and found["f2"]["pfns"] == {}
    assert found["f3"]["rses"] == {} and found["f3"]["states"] == {}
    assert found["f4"]["rses"] == {"N": [PFN_N]}
    # what a sample of replicas (nrandom) is drawn from holds no replica twice
    with catalog() as s:
        gathered = replicas.gather_replicas(s, [{"scope": "t", "name": "c"}])
    abc = sorted(rse_id for rse_id, site in gathered.sites.items() if site.name in "ABC")
    assert [rse_id for rse_id, _path, _state in gathered.replicas[("t", "f0")]] == abc
    for _ in range(20):
        assert len(listed(catalog, "c", nrandom=3)["f0"]["pfns"]) == 3


def test_all_states_lists_unavailable_replicas(catalog: Factory) -> None:
    found = listed(catalog, "d1", all_states=True)
    assert found["f2"]["states"] == {"B": "UNAVAILABLE"}
    assert len(found["f0"]["states"]) == 3


def test_files_named_directly_and_through_a_dataset(catalog: Factory) -> None:
    for names in (("f1", "d1"), ("d1", "f1")):
        assert listed(catalog, *names)["f1"]["states"] == {"A": "AVAILABLE"}
    everywhere = dict.fromkeys(rse_order(catalog, "A", "B", "C"), "AVAILABLE")
    assert listed(catalog, "f0", "f4", "d2")["f0"]["states"] == everywhere
    assert set(listed(catalog, "f0", "d2")) == {"f0", "f4"}
    assert listed(catalog, "f4")["f4"]["rses"] == {"N": [PFN_N]}


def test_lan_first_and_rse_expression(catalog: Factory) -> None:
    f0 = listed(catalog, "d2", domain="all")["f0"]
    assert next(iter(f0["pfns"].values()))["domain"] == "lan"  # C is the only LAN reader
    assert next(iter(f0["pfns"].values()))["rse"] == "C"
    only_b = listed(catalog, "c", rse_expression="B")
    assert {name: line["states"] for name, line in only_b.items() if line["states"]} == {
        "f0": {"B": "AVAILABLE"}}


def test_file_listing_with_metadata(catalog: Factory) -> None:
    with catalog.begin() as s:
        dids.set_metadata(s, "root", "t", "f1", "events", 12)
    with catalog() as s:
        files = {f.name: f for f in dids.iter_files(s, "t", "c", meta=True)}
        light = {f.name: f for f in dids.iter_files(s, "t", "c")}
    assert list(files) == list(light) == ["f0", "f1", "f2", "f3", "f4"]
    assert files["f1"].events == 12 and light["f1"].events is None
    assert (light["f1"].bytes, light["f1"].adler32) == (7, "0000000a")
