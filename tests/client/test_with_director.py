"""`stashcp` in a whole federation: the real director (`stashflow director serve`)
in front of two real caches and the real origin server."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stashflow.cache.client.discovery import location_from_headers
from stashflow.cache.client.errors import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from stashflow.integration.servers.service import ServiceProcess
from tests.cache.harness import CacheProcess
from tests.client.conftest import MiB, Origin, access_log, stashcp, stashcp_killing
from tests.conftest import require_real


@dataclass
class Federation:
    director: str
    origin: Origin
    caches: list[CacheProcess]

    def candidates(self, path: str) -> list[str]:
        """The director's answer, read without following it (as Pelican clients do)."""
        u = urllib.parse.urlsplit(self.director)
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 307, resp.status
            return location_from_headers(dict(resp.getheaders())).urls
        finally:
            conn.close()


@pytest.fixture(scope="module")
def federation(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    if importlib.util.find_spec("stashflow.cache.director.cli") is None:
        require_real("director", "stashflow.cache.director is not in this tree")
    base = tmp_path_factory.mktemp("federation")
    (origin.data / "big").mkdir(exist_ok=True)
    (origin.data / "big" / "large.bin").write_bytes(os.urandom(32 * MiB + 3))
    caches = [
        CacheProcess(base / f"cache{i}", {"/ns": origin.url + "/ns"}).start() for i in range(2)
    ]
    args = ["--namespace", f"/ns={origin.url}/ns"]
    # a namespace whose only origin clients cannot reach over HTTP (uploads cannot go there)
    args += ["--namespace", f"/rootonly=root://127.0.0.1:1/{base}"]
    for c in caches:
        args += ["--cache", c.url]
    try:
        with ServiceProcess("director", args, base) as director:
            fed = Federation(director.url, origin, caches)
            deadline = time.monotonic() + 20
            while len(fed.candidates("/ns/tree/a.txt")) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)  # until the director has seen both caches alive
            yield fed
    finally:
        for c in caches:
            c.stop()


def test_download_listing_and_upload_through_the_director(
    federation: Federation, tmp_path: Path
) -> None:
    env = {"STASHFLOW_DIRECTOR": federation.director}
    r = stashcp("--json", "stash:///ns/tree/sub/b.bin", str(tmp_path), env=env)
    assert r.code == EXIT_OK, r.stderr
    data = (federation.origin.data / "tree" / "sub" / "b.bin").read_bytes()
    assert (tmp_path / "b.bin").read_bytes() == data
    first = federation.candidates("/ns/tree/sub/b.bin")[0]
    assert r.json()["transfers"][0]["servers"] == [first.split("/ns/")[0]]
    # -r: the listing comes from the namespace's collections-url
    r = stashcp("-r", "osdf:///ns/tree", str(tmp_path / "t"), env=env)
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "t" / "sub" / "deeper" / "c.dat").exists()
    r = stashcp("stash:///ns/tree/absent", str(tmp_path), env=env)
    assert r.code == EXIT_NOT_FOUND
    r = stashcp("stash:///elsewhere/x", str(tmp_path), env=env)
    assert r.code == EXIT_NOT_FOUND and "namespace" in r.stderr
    # uploads go to the origin the director names
    src = tmp_path / "o.bin"
    src.write_bytes(os.urandom(100_000))
    token = federation.origin.token("storage.create:/ns/up")
    r = stashcp(str(src), "stash:///ns/up/dir-upload.bin", env={**env, "BEARER_TOKEN": token})
    assert r.code == EXIT_OK, r.stderr
    assert (federation.origin.data / "up" / "dir-upload.bin").read_bytes() == src.read_bytes()


def test_many_files_through_the_director_take_one_get_each_at_its_cache(
    federation: Federation, tmp_path: Path
) -> None:
    """Several objects with only a director: the first pass (cache/client/bulk.py)
    follows the director's redirect for each, so every object is one whole GET at the
    cache the director chose for it (the transfer engine's GETs are ranged and follow
    HEAD probes), verified. Runs before the test that kills a cache."""
    many = federation.origin.data / "many"
    many.mkdir(exist_ok=True)
    names = [f"m{i:02d}.dat" for i in range(20)]
    for n in names:
        (many / n).write_bytes(os.urandom(2000 + len(n) * 7))
    before = {c.url: len(access_log(c)) for c in federation.caches}
    r = stashcp("--json", *[f"stash:///ns/many/{n}" for n in names], str(tmp_path),
                env={"STASHFLOW_DIRECTOR": federation.director})  # fmt: skip
    assert r.code == EXIT_OK, r.stderr
    for n in names:
        assert (tmp_path / n).read_bytes() == (many / n).read_bytes()
    served = sorted(
        (c.url, e.get("method"), e.get("path"), e.get("range"))
        for c in federation.caches
        for e in access_log(c)[before[c.url]:]
    )
    fetched = sorted(
        (t["servers"][0], "GET", f"/ns/many/{Path(t['dest']).name}", None)
        for t in r.json()["transfers"]
    )
    assert served == fetched
    assert all(t["checksum"].startswith("crc32c:") for t in r.json()["transfers"])


def test_preferred_cache_killed_mid_download(federation: Federation, tmp_path: Path) -> None:
    """The director's first choice dies while serving a large file: the download
    completes from the other cache, byte-identical."""
    path = "/ns/big/large.bin"
    order = [u.split("/ns/")[0] for u in federation.candidates(path)]
    victim = next(c for c in federation.caches if c.url == order[0])
    run = stashcp_killing(
        victim, lambda: len([e for e in access_log(victim) if e["path"] == path]) >= 3,
        "--json", "--director", federation.director, "--limit-rate", "12MiB",
        "--chunk-size", "2MiB", "--chunks", "2", f"stash://{path}", str(tmp_path / "l.bin"),
    )  # fmt: skip
    assert run.code == EXIT_OK, run.stderr
    stdout = run.stdout
    expected = (federation.origin.data / "big" / "large.bin").read_bytes()
    assert (tmp_path / "l.bin").read_bytes() == expected
    t = json.loads(stdout)["transfers"][0]
    assert set(t["servers"]) == set(order[:2])


def test_upload_to_a_namespace_without_http_origin_is_a_configuration_error(
    federation: Federation, tmp_path: Path
) -> None:
    """Not "not found" (10): the namespace exists, the federation is not set up to
    take uploads into it; the user must configure an origin (2)."""
    src = tmp_path / "x.bin"
    src.write_bytes(b"data")
    env = {"STASHFLOW_DIRECTOR": federation.director}
    r = stashcp(str(src), "stash:///rootonly/x.bin", env=env)
    assert r.code == EXIT_USAGE, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "--origin" in r.stderr and "stash:///rootonly/x.bin" in r.stderr


def test_fsspec_reads_through_the_director(federation: Federation) -> None:
    """The `stash` filesystem with only a director: reads go through the director's
    caches (the access logs show it), listings through the collections URL."""
    import fsspec

    from stashflow.cache.client.fsspec_impl import StashFileSystem

    fs = fsspec.filesystem("stash", director=federation.director, skip_instance_cache=True)
    assert isinstance(fs, StashFileSystem)
    try:
        data = (federation.origin.data / "tree" / "sub" / "b.bin").read_bytes()
        with fs.open("stash:///ns/tree/sub/b.bin", "rb", block_size=64 * 1024) as f:
            f.seek(100_000)
            assert f.read(5000) == data[100_000:105_000]
        assert fs.cat_file("/ns/tree/sub/b.bin", start=10, end=20) == data[10:20]
        assert fs.info("/ns/tree/sub/b.bin")["size"] == len(data)
        assert fs.ls("/ns/tree/sub", detail=False) == ["/ns/tree/sub/b.bin", "/ns/tree/sub/deeper"]
        served = {
            c.url for c in federation.caches
            if any(e["path"] == "/ns/tree/sub/b.bin" for e in access_log(c))
        }  # fmt: skip
        first = federation.candidates("/ns/tree/sub/b.bin")[0].split("/ns/")[0]
        assert first in served
    finally:
        fs.close()
