"""A whole federation, every part real: the origin server (posix), an XRootD server and
SeaweedFS S3 as further origins, the director with a site map, two caches that register
with it (`--director --site`) and learn their namespaces from it, and `stashcp`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from stashflow.cache.client.errors import EXIT_AUTH, EXIT_OK
from stashflow.integration import tokens
from stashflow.integration.servers.seaweedfs import SeaweedFS
from stashflow.integration.servers.service import ServiceProcess
from stashflow.integration.servers.xrootd import XRootDServer
from tests.cache.harness import ROOT, CacheProcess, request
from tests.client.conftest import stashcp

MiB = 1 << 20
ISSUER = "https://issuer.federation.test"


@dataclass
class Fed:
    director: str
    origin_data: Path
    caches: dict[str, CacheProcess]
    key: Path

    def token(self, *scopes: str) -> str:
        return tokens.issue(self.key, ISSUER, scopes)

    def env(self, token: str | None = None) -> dict[str, str]:
        env = {"STASHFLOW_DIRECTOR": self.director}
        if token:
            env["BEARER_TOKEN"] = token
        return env


@pytest.fixture(scope="module")
def fed(
    tmp_path_factory: pytest.TempPathFactory,
    xrootd_server: XRootDServer,
    seaweedfs_server: SeaweedFS,
) -> Iterator[Fed]:
    base = tmp_path_factory.mktemp("fed")
    data = base / "origin"
    (data / "pub").mkdir(parents=True)
    (data / "prot").mkdir()
    (data / "pub" / "small.txt").write_bytes(b"public data\n")
    with open(data / "pub" / "big.bin", "wb") as f:  # 500 MiB, incompressible
        for _ in range(50):
            f.write(os.urandom(10 * MiB))
    (data / "prot" / "secret.bin").write_bytes(os.urandom(3 * MiB))
    keys = tokens.keygen(base / "issuer", kid="fed1", alg="ES256")
    jwks = base / "issuer" / "jwks.json"
    cache_token = base / "cache.token"
    cache_token.write_text(
        tokens.issue(keys.private_key, ISSUER, ["storage.read:/prot"], lifetime=3600)
    )

    # further origins: XRootD (root://) and S3
    xdir = xrootd_server.data_dir / "fed"
    xdir.mkdir(exist_ok=True)
    (xdir / "x.bin").write_bytes(os.urandom(2 * MiB + 5))
    st = xrootd_server.data_dir.stat()
    os.chown(xdir, st.st_uid, st.st_gid)
    seaweedfs_server.create_bucket("fedbucket")
    boto3.client(
        "s3",
        endpoint_url=seaweedfs_server.endpoint_url,
        aws_access_key_id=seaweedfs_server.access_key,
        aws_secret_access_key=seaweedfs_server.secret_key,
        region_name="us-east-1",
    ).put_object(Bucket="fedbucket", Key="p/s.bin", Body=b"from s3 " * 40000)

    services: list[ServiceProcess] = []
    caches: dict[str, CacheProcess] = {}
    try:
        origin_service = ServiceProcess("origin", [
            "--export", f"/pub=file://{data / 'pub'}", "--export", f"/prot=file://{data / 'prot'}",
            "--public-export", "/pub", "--issuer", ISSUER, "--jwks", str(jwks),
            "--access-log", "off",
        ], base)
        services.append(origin_service)
        origin = origin_service.start().url
        sites = base / "sites.toml"
        sites.write_text(
            '[sites.NEAR]\nnetworks = ["127.0.0.1/32"]\ncoordinates = [43.07, -89.40]\n'
            '[sites.FAR]\nnetworks = ["127.0.0.2/32"]\ncoordinates = [-33.9, 151.2]\n'
        )
        director_service = ServiceProcess("director", [
            "--namespace", f"/pub={origin}/pub", "--namespace", f"/prot={origin}/prot",
            "--namespace", f"/xrd={xrootd_server.root_url}/fed",
            "--namespace", "/s3=s3://fedbucket/p", "--protected", f"/prot={ISSUER}",
            "--site-map", str(sites), "--heartbeat-interval", "1s",
        ], base)
        services.append(director_service)
        director = director_service.start().url
        s3_env = {
            "STASHFLOW_S3_ENDPOINT": seaweedfs_server.endpoint_url,
            "AWS_ACCESS_KEY_ID": seaweedfs_server.access_key,
            "AWS_SECRET_ACCESS_KEY": seaweedfs_server.secret_key,
        }
        for site in ("FAR", "NEAR"):
            caches[site] = CacheProcess(
                base / f"cache-{site}",
                {},
                workers=1,
                env=s3_env,
                extra=[
                    "--director",
                    director,
                    "--site",
                    site,
                    "--issuer",
                    f"{ISSUER}={jwks}",
                    "--origin-token-file",
                    str(cache_token),
                ],
            ).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listed = json.loads(request(f"{director}/api/v1.0/director/caches").body)
            items = listed["caches"] if isinstance(listed, dict) else listed
            if sum(1 for c in items if c.get("state") == "up") == 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"caches did not register: {listed}")
        yield Fed(director, data, caches, keys.private_key)
    finally:
        for c in caches.values():
            c.stop()
        for service in services:
            service.stop()


def test_caches_learn_namespaces_from_the_director(fed: Fed) -> None:
    near = fed.caches["NEAR"]
    assert near.get("/pub/small.txt").body == b"public data\n"
    stats = near.admin("stats").json()
    assert set(stats["origins"]) == {"/pub", "/prot", "/xrd", "/s3"}


def test_stashcp_reads_from_the_nearest_cache(fed: Fed, tmp_path: Path) -> None:
    r = stashcp("--json", "stash:///pub/small.txt", str(tmp_path), env=fed.env())
    assert r.code == EXIT_OK, r.stderr
    assert r.json()["transfers"][0]["servers"] == [fed.caches["NEAR"].url]
    assert (tmp_path / "small.txt").read_bytes() == b"public data\n"


def test_origins_on_xrootd_and_s3(fed: Fed, tmp_path: Path, xrootd_server: XRootDServer) -> None:
    r = stashcp("osdf:///xrd/x.bin", "stash:///s3/s.bin", str(tmp_path), env=fed.env())
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "x.bin").read_bytes() == (
        xrootd_server.data_dir / "fed" / "x.bin"
    ).read_bytes()
    assert (tmp_path / "s.bin").read_bytes() == b"from s3 " * 40000


def test_cache_killed_mid_download_fails_over(fed: Fed, tmp_path: Path) -> None:
    dest = tmp_path / "big.bin"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stashflow.cache.client.stashcp",
            "--json",
            "--limit-rate",
            "100M",
            "stash:///pub/big.bin",
            str(dest),
        ],
        env={**os.environ, **fed.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    time.sleep(2)
    assert proc.poll() is None, "the download should still be running"
    fed.caches["NEAR"].kill9()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_OK, err.decode()
    expected = hashlib.sha256((fed.origin_data / "pub" / "big.bin").read_bytes()).hexdigest()
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected
    servers = json.loads(out)["transfers"][0]["servers"]
    assert fed.caches["FAR"].url in servers
    fed.caches["NEAR"].start()  # back for the other tests (it re-registers)


def test_protected_namespace(fed: Fed, tmp_path: Path) -> None:
    secret = (fed.origin_data / "prot" / "secret.bin").read_bytes()
    r = stashcp("stash:///prot/secret.bin", str(tmp_path / "none"), env=fed.env())
    assert r.code == EXIT_AUTH, r.stderr
    assert not (tmp_path / "none").exists()
    reader = fed.token("storage.read:/prot")
    r = stashcp("stash:///prot/secret.bin", str(tmp_path / "got"), env=fed.env(reader))
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "got").read_bytes() == secret
    # a cache refuses a token whose scope does not cover the path, and says why
    near = fed.caches["NEAR"]
    other = fed.token("storage.read:/prot/elsewhere")
    refused = near.get("/prot/secret.bin", {"Authorization": f"Bearer {other}"})
    assert refused.status == 403 and "scope" in refused.json()["error"]
    assert near.get("/prot/secret.bin").status == 401
    # writes: the read token is refused, a create token lands the file atomically
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(1 * MiB))
    r = stashcp(str(src), "stash:///prot/up.bin", env=fed.env(reader))
    assert r.code == EXIT_AUTH, r.stderr
    assert not (fed.origin_data / "prot" / "up.bin").exists()
    writer = fed.token("storage.create:/prot")
    r = stashcp(str(src), "stash:///prot/up.bin", env=fed.env(writer))
    assert r.code == EXIT_OK, r.stderr
    assert (fed.origin_data / "prot" / "up.bin").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (fed.origin_data / "prot").iterdir()) == ["secret.bin", "up.bin"]
