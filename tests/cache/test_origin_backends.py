"""The cache in front of each kind of origin it supports, all real servers:
XRootD over root:// and over HTTP (XrdHttp), and S3 (SeaweedFS)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3

from stashflow.integration.servers.seaweedfs import SeaweedFS
from stashflow.integration.servers.xrootd import XRootDServer
from tests.cache.harness import CacheProcess

MiB = 1 << 20


def _check(c: CacheProcess, ns: str, big: bytes, small: bytes) -> None:
    r = c.get(f"{ns}/big.bin")
    assert r.status == 200 and r.body == big
    assert r.headers["x-stashflow-cache"] == "miss"
    c.wait_cached(f"{ns}/big.bin")
    assert c.get(f"{ns}/big.bin").headers["x-stashflow-cache"] == "hit"
    part = c.get(f"{ns}/big.bin", {"Range": "bytes=2097100-2097199"})
    assert part.status == 206 and part.body == big[2097100:2097200]
    assert c.get(f"{ns}/small.txt").body == small
    assert c.get(f"{ns}/missing").status == 404
    digest = c.get(f"{ns}/big.bin", {"Want-Digest": "adler32"}, method="HEAD")
    import zlib

    assert digest.headers["digest"] == f"adler32={zlib.adler32(big):08x}"


def test_cache_in_front_of_xrootd(tmp_path: Path, xrootd_server: XRootDServer) -> None:
    sub = xrootd_server.data_dir / "cachetest"
    sub.mkdir(exist_ok=True)
    big, small = os.urandom(5 * MiB + 7), b"small object\n"
    (sub / "big.bin").write_bytes(big)
    (sub / "small.txt").write_bytes(small)
    os.chown(sub, *_owner(xrootd_server.data_dir))
    origins = {
        "/root": f"{xrootd_server.root_url}/cachetest",
        "/http": f"{xrootd_server.http_url}/cachetest",
    }
    with CacheProcess(tmp_path / "c", origins, workers=2) as c:
        _check(c, "/root", big, small)
        _check(c, "/http", big, small)


def test_cache_in_front_of_s3(tmp_path: Path, seaweedfs_server: SeaweedFS) -> None:
    seaweedfs_server.create_bucket("cacheorigin")
    s3 = boto3.client("s3", endpoint_url=seaweedfs_server.endpoint_url,
                      aws_access_key_id=seaweedfs_server.access_key,
                      aws_secret_access_key=seaweedfs_server.secret_key,
                      region_name="us-east-1")
    big, small = os.urandom(5 * MiB + 7), b"small object\n"
    s3.put_object(Bucket="cacheorigin", Key="pre/big.bin", Body=big)
    s3.put_object(Bucket="cacheorigin", Key="pre/small.txt", Body=small)
    env = {"STASHFLOW_S3_ENDPOINT": seaweedfs_server.endpoint_url,
           "AWS_ACCESS_KEY_ID": seaweedfs_server.access_key,
           "AWS_SECRET_ACCESS_KEY": seaweedfs_server.secret_key}
    with CacheProcess(tmp_path / "c", {"/s3": "s3://cacheorigin/pre"}, env=env) as c:
        _check(c, "/s3", big, small)


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid
