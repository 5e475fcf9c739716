"""An unmodified Pelican client (pelicanfs) reads through our director: discovery
over TLS (self-signed CA trusted through SSL_CERT_FILE), 307 + Link +
X-Pelican-Namespace, then real cache processes in front of a posix origin."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cache.harness import CacheProcess
from tests.conftest import require_real
from tests.director.helpers import TLS, DirectorProcess

CLIENT = r"""
import hashlib, json, sys
from pelicanfs.core import PelicanFileSystem

federation, port = sys.argv[1], sys.argv[2]
fs = PelicanFileSystem(federation)
out = {}
data = fs.cat_file("/data/big.bin")
out["big"] = hashlib.sha256(data).hexdigest()
out["big_len"] = len(data)
with fs.open("/data/big.bin", "rb") as f:
    f.seek(1_000_003)
    out["part"] = hashlib.sha256(f.read(70_000)).hexdigest()
out["small"] = fs.cat_file(f"pelican://127.0.0.1:{port}/data/dir/small.txt").decode()
out["range"] = fs.cat_file("/data/big.bin", start=10, end=20).hex()
try:
    fs.cat_file("/data/missing.bin")
    out["missing"] = "read"
except FileNotFoundError:
    out["missing"] = "FileNotFoundError"
out["director"] = fs.director_url
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def pelicanfs_available() -> None:
    if importlib.util.find_spec("pelicanfs") is None:
        require_real("pelicanfs", "pip install 'pelicanfs>=1.5' (the Pelican fsspec client)")


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    (root / "dir").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "dir" / "small.txt").write_text("hello from the posix origin\n")
    return root


@pytest.fixture
def caches(tmp_path: Path, origin: Path) -> Iterator[list[CacheProcess]]:
    started: list[CacheProcess] = []
    try:
        for name in ("near", "far"):
            (tmp_path / name).mkdir()
            started.append(
                CacheProcess(tmp_path / name / "cache", {"/data": f"file://{origin}"}).start()
            )
        yield started
    finally:
        for c in started:
            c.stop()


def _run_client(director: DirectorProcess, tls: TLS) -> dict[str, object]:
    env = {**os.environ, "SSL_CERT_FILE": str(tls.ca), "REQUESTS_CA_BUNDLE": str(tls.ca)}
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, f"pelican://127.0.0.1:{director.port}", str(director.port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_pelicanfs_reads_through_director_and_caches(
    pelicanfs_available: None,
    tmp_path: Path,
    tls: TLS,
    origin: Path,
    caches: list[CacheProcess],
) -> None:
    near, far = caches
    sites = tmp_path / "sites.toml"
    sites.write_text(
        '[sites.here]\nnetworks = ["127.0.0.0/8"]\ncoordinates = [43.07, -89.40]\n'
        '[sites.away]\nnetworks = ["192.0.2.0/24"]\ncoordinates = [40.82, -96.70]\n'
    )
    big = (origin / "big.bin").read_bytes()
    with DirectorProcess(
        tmp_path / "director",
        tls=tls,
        args=[
            "--namespace",
            f"/data=file://{origin}",
            "--cache",
            f"{near.url}@here",
            "--cache",
            f"{far.url}@away",
            "--site-map",
            str(sites),
            "--heartbeat-interval",
            "1s",
        ],
    ) as director:
        out = _run_client(director, tls)
        assert out["director"] == director.url + "/"
        assert out["big_len"] == len(big)
        assert out["big"] == hashlib.sha256(big).hexdigest()
        assert out["part"] == hashlib.sha256(big[1_000_003:1_070_003]).hexdigest()
        assert out["range"] == big[10:20].hex()
        assert out["small"] == "hello from the posix origin\n"
        assert out["missing"] == "FileNotFoundError"
        # the bytes came through the nearest cache, which pulled them from the origin
        assert near.origin_bytes() >= len(big)
        assert far.origin_bytes() == 0
        redirects = director.metrics()
        assert redirects[f'stashflow_director_cache_redirects_total{{cache="{near.url}"}}'] >= 1

        # the near cache dies: the client moves on to the next Link entry (and the
        # director stops offering the dead cache once its probe fails)
        near.stop()
        out = _run_client(director, tls)
        assert out["big"] == hashlib.sha256(big).hexdigest()
        assert out["small"] == "hello from the posix origin\n"
        assert far.origin_bytes() >= len(big)


LISTING_CLIENT = r"""
import json, sys
from pelicanfs.core import PelicanFileSystem

fs = PelicanFileSystem(sys.argv[1])
out = {}
out["ls"] = sorted(fs.ls("/data/dir", detail=False))
out["info"] = [i["name"] for i in fs.ls("/data/dir", detail=True)]
out["isdir"] = fs.isdir("/data/dir")
out["find"] = sorted(fs.find("/data/dir"))
out["cached"] = fs.cat_file("/data/dir/small.txt").decode()
direct = PelicanFileSystem(sys.argv[1], direct_reads=True)
out["direct"] = direct.cat_file("/data/dir/small.txt").decode()
print(json.dumps(out))
"""


@pytest.fixture
def http_origin(tmp_path: Path, origin: Path) -> Iterator[str]:
    """`stashflow origin serve` exporting the posix directory over HTTP/WebDAV."""
    if importlib.util.find_spec("stashflow.cache.origin.cli") is None:
        require_real("stashflow origin", "the origin server is not installed")
    from stashflow.integration.servers.service import ServiceProcess

    with ServiceProcess("origin", ["--export", f"/data=file://{origin}", "--public"],
                        tmp_path) as service:
        yield service.url


def test_pelicanfs_lists_through_collections_url(
    pelicanfs_available: None,
    tmp_path: Path,
    tls: TLS,
    http_origin: str,
    origin: Path,
) -> None:
    """Listings: PROPFIND at the director -> collections-url (our origin's WebDAV);
    reads through a cache that fetches from the same origin over HTTP; direct reads
    through /api/v1.0/director/origin/."""
    (tmp_path / "c").mkdir()
    (origin / "dir" / "sub").mkdir(exist_ok=True)
    (origin / "dir" / "sub" / "deep.txt").write_text("deeper\n")
    cache = CacheProcess(tmp_path / "c" / "cache", {"/data": f"{http_origin}/data"}).start()
    try:
        with DirectorProcess(
            tmp_path / "director",
            tls=tls,
            args=[
                "--namespace",
                f"/data={http_origin}/data",
                "--cache",
                cache.url,
            ],
        ) as director:
            env = {**os.environ, "SSL_CERT_FILE": str(tls.ca)}
            proc = subprocess.run(
                [sys.executable, "-c", LISTING_CLIENT, f"pelican://127.0.0.1:{director.port}"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            # collections are listed with the trailing '/' of their WebDAV href
            assert [p.rstrip("/") for p in out["ls"]] == ["/data/dir/small.txt", "/data/dir/sub"]
            assert sorted(p.rstrip("/") for p in out["info"]) == [
                "/data/dir/small.txt",
                "/data/dir/sub",
            ]
            # find walks into collections (it needs their getcontentlength)
            assert out["find"] == ["/data/dir/small.txt", "/data/dir/sub/deep.txt"]
            assert out["isdir"] is True
            assert out["cached"] == out["direct"] == "hello from the posix origin\n"
            m = director.metrics()
            assert m['stashflow_director_redirects_total{kind="listing",namespace="/data"}'] >= 1
            assert m['stashflow_director_redirects_total{kind="origin",namespace="/data"}'] >= 1
            assert cache.origin_bytes() > 0
    finally:
        cache.stop()
