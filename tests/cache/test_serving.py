"""The cache as a user sees it: a real `stashflow cache serve` process in front of a
posix origin, driven over HTTP."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from tests.cache.harness import CacheProcess, request

MiB = 1 << 20


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("origin")
    rnd = os.urandom
    (root / "small.txt").write_bytes(b"hello stashflow\n")
    (root / "big.bin").write_bytes(rnd(5 * MiB + 123))
    (root / "sub").mkdir()
    (root / "sub" / "large.bin").write_bytes(rnd(40 * MiB))
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def cache(origin: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("cache")
    with CacheProcess(d / "c", {"/ns": f"file://{origin}"}, workers=2) as c:
        yield c


def test_miss_then_hit_serves_identical_bytes(cache: CacheProcess, origin: Path) -> None:
    first = cache.get("/ns/big.bin")
    assert first.status == 200
    assert first.headers["x-stashflow-cache"] == "miss"
    assert first.body == (origin / "big.bin").read_bytes()
    assert int(first.headers["content-length"]) == len(first.body)
    cache.wait_cached("/ns/big.bin")
    second = cache.get("/ns/big.bin")
    assert second.headers["x-stashflow-cache"] == "hit"
    assert second.body == first.body
    assert second.headers["etag"] == first.headers["etag"]
    assert "last-modified" in second.headers


def test_small_object_is_inline_and_hit(cache: CacheProcess) -> None:
    assert cache.get("/ns/small.txt").body == b"hello stashflow\n"
    cache.wait_cached("/ns/small.txt")
    again = cache.get("/ns/small.txt")
    assert again.headers["x-stashflow-cache"] == "hit"
    objs = {o["path"]: o for o in cache.admin("objects?prefix=/ns/small").json()["objects"]}
    assert objs["/ns/small.txt"]["inline"] is True


def test_empty_object(cache: CacheProcess) -> None:
    r = cache.get("/ns/empty")
    assert r.status == 200 and r.body == b""


def test_head_has_length_and_no_body(cache: CacheProcess, origin: Path) -> None:
    r = cache.get("/ns/sub/large.bin", method="HEAD")
    assert r.status == 200
    assert int(r.headers["content-length"]) == 40 * MiB
    assert r.body == b""


def test_single_range(cache: CacheProcess, origin: Path) -> None:
    data = (origin / "big.bin").read_bytes()
    r = cache.get("/ns/big.bin", {"Range": "bytes=1048570-1048590"})
    assert r.status == 206
    assert r.body == data[1048570:1048591]
    assert r.headers["content-range"] == f"bytes 1048570-1048590/{len(data)}"
    tail = cache.get("/ns/big.bin", {"Range": "bytes=-100"})
    assert tail.body == data[-100:]
    opened = cache.get("/ns/big.bin", {"Range": "bytes=5242000-"})
    assert opened.body == data[5242000:]


def test_multiple_ranges_multipart(cache: CacheProcess, origin: Path) -> None:
    data = (origin / "big.bin").read_bytes()
    r = cache.get("/ns/big.bin", {"Range": "bytes=0-9,3000000-3000009,-5"})
    assert r.status == 206
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/byteranges; boundary=")
    boundary = ctype.split("boundary=")[1].encode()
    parts = [p for p in r.body.split(b"--" + boundary) if p.strip(b"\r\n-")]
    assert len(parts) == 3
    bodies = [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts]
    assert bodies == [data[0:10], data[3000000:3000010], data[-5:]]
    assert b"Content-Range: bytes 3000000-3000009/" in parts[1]
    assert int(r.headers["content-length"]) == len(r.body)


def test_multirange_on_inline_object(cache: CacheProcess) -> None:
    r = cache.get("/ns/small.txt", {"Range": "bytes=0-4,6-14"})
    assert r.status == 206 and b"hello" in r.body and b"stashflow" in r.body


def test_unsatisfiable_and_malformed_ranges(cache: CacheProcess) -> None:
    r = cache.get("/ns/big.bin", {"Range": "bytes=999999999-"})
    assert r.status == 416
    assert r.headers["content-range"].startswith("bytes */")
    for bad in (
        "bytes=abc",
        "items=0-1",
        "bytes=5-1",
        "bytes=-",
        "bytes=" + ",".join(["0-1"] * 100),
    ):
        resp = cache.get("/ns/big.bin", {"Range": bad})
        assert resp.status == 400, bad
        assert "error" in resp.json()


def test_conditional_get(cache: CacheProcess) -> None:
    r = cache.get("/ns/big.bin", method="HEAD")
    etag, lm = r.headers["etag"], r.headers["last-modified"]
    assert cache.get("/ns/big.bin", {"If-None-Match": etag}).status == 304
    assert cache.get("/ns/big.bin", {"If-Modified-Since": lm}).status == 304
    assert cache.get("/ns/big.bin", {"If-None-Match": '"other"'}).status == 200
    # If-Range with a stale validator: the whole object, not the range
    stale = cache.get("/ns/big.bin", {"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status == 200
    # If-Match: only the version named; anything else is 412, never another version
    assert cache.get("/ns/big.bin", {"If-Match": etag}, method="HEAD").status == 200
    refused = cache.get("/ns/big.bin", {"If-Match": '"old"'})
    assert refused.status == 412 and refused.headers["etag"] == etag
    assert refused.headers["last-modified"] == lm
    assert cache.get("/ns/big.bin", {"If-Match": f"W/{etag}"}).status == 412


@pytest.mark.parametrize("algorithm", ["adler32", "md5", "sha-256", "crc32c"])
def test_want_digest(cache: CacheProcess, origin: Path, algorithm: str) -> None:
    data = (origin / "sub" / "large.bin").read_bytes()
    r = cache.get("/ns/sub/large.bin", {"Want-Digest": algorithm}, method="HEAD")
    name, _, value = r.headers["digest"].partition("=")
    assert name == algorithm
    if algorithm == "adler32":
        assert value == f"{zlib.adler32(data):08x}"
    elif algorithm == "md5":
        assert value == base64.b64encode(hashlib.md5(data).digest()).decode()
    elif algorithm == "sha-256":
        assert value == base64.b64encode(hashlib.sha256(data).digest()).decode()
    else:
        import crc32c

        assert value == base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


def test_want_digest_preference_and_unknown(cache: CacheProcess) -> None:
    r = cache.get("/ns/small.txt", {"Want-Digest": "sha-512, md5;q=0.3, adler32;q=0.9"})
    assert r.headers["digest"].startswith("adler32=")
    r = cache.get("/ns/small.txt", {"Want-Digest": "sha-512"})
    assert "digest" not in r.headers


def test_missing_object_404_is_json(cache: CacheProcess) -> None:
    r = cache.get("/ns/does/not/exist")
    assert r.status == 404
    body = r.json()
    assert "not found" in body["error"] and body["path"] == "/ns/does/not/exist"


def test_unknown_namespace_and_bad_paths(cache: CacheProcess, origin: Path) -> None:
    assert cache.get("/other/file").status == 404
    for path in (
        "/ns/../etc/passwd",
        "/ns//big.bin",
        "/ns/./big.bin",
        "/ns/%2e%2e/big.bin",
        "/ns/a%00b",
        "/ns/" + "x" * 300,
        "/ns/sub/",
    ):
        out = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--path-as-is",
                cache.url + path,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout == "400", path


def test_partial_read_fetches_only_what_is_needed(tmp_path: Path, origin: Path) -> None:
    big = tmp_path / "o" / "huge.bin"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(400 * MiB)  # sparse: 400 MiB of zeros
    with CacheProcess(
        tmp_path / "c", {"/ns": f"file://{big.parent}"}, extra=["--block-size", "1MiB"]
    ) as c:
        r = c.get("/ns/huge.bin", {"Range": "bytes=104857600-108855295"})  # ~1% (3.8 MiB)
        assert r.status == 206 and len(r.body) == 3997696
        time.sleep(0.5)  # read-ahead finishes in the background
        fetched = c.origin_bytes()
        # the requested 4 blocks plus at most the read-ahead (4 blocks)
        assert 4 * MiB <= fetched <= 8 * MiB, fetched
        m = c.metrics()
        assert m['stashflow_cache_origin_bytes_total{kind="demand",origin="/ns"}'] == 4 * MiB


def test_concurrent_cold_readers_share_one_fetch(tmp_path: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    data = os.urandom(64 * MiB)
    (src / "shared.bin").write_bytes(data)
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{src}"}, workers=2) as c:
        results: list[bytes] = []

        def fetch() -> None:
            results.append(request(c.url + "/ns/shared.bin").body)

        threads = [threading.Thread(target=fetch) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 16 and all(r == data for r in results)
        assert c.origin_bytes() <= 1.05 * len(data)


def test_revalidation_picks_up_origin_changes(tmp_path: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    (src / "f.bin").write_bytes(b"A" * (2 * MiB))
    (src / "s.txt").write_bytes(b"version 1")
    with CacheProcess(
        tmp_path / "c", {"/ns": f"file://{src}"}, extra=["--revalidate-ttl", "1s"]
    ) as c:
        assert c.get("/ns/f.bin").body == b"A" * (2 * MiB)
        assert c.get("/ns/s.txt").body == b"version 1"
        (src / "f.bin").write_bytes(b"B" * (3 * MiB))
        (src / "s.txt").write_bytes(b"version 2!")
        os.utime(src / "s.txt", (time.time() + 5, time.time() + 5))
        time.sleep(1.2)
        assert c.get("/ns/f.bin").body == b"B" * (3 * MiB)
        assert c.get("/ns/s.txt").body == b"version 2!"
        # same size, only the modification time tells: still never served stale
        (src / "f.bin").write_bytes(b"C" * (3 * MiB))
        os.utime(src / "f.bin", (time.time() + 10, time.time() + 10))
        assert c.get("/ns/f.bin").body == b"B" * (3 * MiB)  # within the TTL
        time.sleep(1.2)
        r = c.get("/ns/f.bin")
        assert r.body == b"C" * (3 * MiB) and r.headers["x-stashflow-cache"] == "miss"


def test_revalidation_sees_an_etag_change_alone(tmp_path: Path) -> None:
    from tests.cache.harness import MisbehavingOrigin

    src = tmp_path / "o"
    src.mkdir()
    (src / "f.bin").write_bytes(b"A" * MiB)
    stamp = int(time.time()) - 100  # whole seconds: the change below stays inside one
    os.utime(src / "f.bin", (stamp, stamp))
    with (
        MisbehavingOrigin(src) as origin,
        CacheProcess(tmp_path / "c", {"/ns": f"{origin.url}/ok"},
                     extra=["--revalidate-ttl", "1s"]) as c,
    ):
        assert c.get("/ns/f.bin").body == b"A" * MiB
        # same size, and Last-Modified has one-second resolution: only the ETag (which
        # this origin makes from the nanosecond mtime) changes
        (src / "f.bin").write_bytes(b"Z" * MiB)
        os.utime(src / "f.bin", ns=(stamp * 10**9 + 1000, stamp * 10**9 + 1000))
        time.sleep(1.2)
        assert c.get("/ns/f.bin").body == b"Z" * MiB


def test_negative_answers_are_cached_briefly(tmp_path: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{src}"}) as c:
        assert c.get("/ns/later.txt").status == 404
        (src / "later.txt").write_bytes(b"now here")
        assert c.get("/ns/later.txt").status == 404  # within the negative TTL
    with CacheProcess(tmp_path / "d", {"/ns": f"file://{src}"},
                      env={"STASHFLOW_CACHE_NEGATIVE_TTL": "1s"}) as c:
        assert c.get("/ns/later2.txt").status == 404
        (src / "later2.txt").write_bytes(b"here too")
        assert c.get("/ns/later2.txt").status == 404
        time.sleep(1.3)  # and only briefly
        assert c.get("/ns/later2.txt").body == b"here too"


def test_config_file_and_env_override(tmp_path: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    (src / "x").write_bytes(b"x" * 10)
    port_cfg = tmp_path / "cache.toml"
    port_cfg.write_text(
        f'[cache]\ndir = "{tmp_path / "c"}"\nsize = "64MiB"\npolicy = "lru"\n'
        f'[cache.origins]\n"/ns" = "file://{src}"\n'
    )
    c = CacheProcess(
        tmp_path / "unused",
        {},
        env={"STASHFLOW_CACHE_POLICY": "lfuda"},
        extra=["--config", str(port_cfg)],
    )
    c.size = "32MiB"  # the flag wins over the file
    with c:
        stats = c.admin("stats").json()
        assert stats["size_bytes"] == 32 * MiB
        assert stats["policy"] == "lfuda"  # the environment wins over the file
        assert c.get("/ns/x").body == b"x" * 10


def test_origins_from_the_environment_and_the_admin_url_variable(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x").write_bytes(d.name.encode() * 10)
    env = {
        "STASHFLOW_CACHE_ORIGINS": f"/one=file://{a}, /two=file://{b}",
        # the admin commands' variable, set in the same shell: not a server setting
        "STASHFLOW_CACHE_URL": "http://127.0.0.1:1",
    }
    with CacheProcess(tmp_path / "c", {}, env=env) as c:
        assert c.get("/one/x").body == b"a" * 10
        assert c.get("/two/x").body == b"b" * 10


def test_bad_configuration_is_one_clear_line(tmp_path: Path) -> None:
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stashflow.integration.cli",
            "cache",
            "serve",
            "--dir",
            str(tmp_path),
            "--size",
            "lots",
            "--origin",
            "/ns=file:///tmp",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "invalid size 'lots'" in out.stderr


def test_ranged_get_with_want_digest_takes_the_origins_checksum_and_fetches_only_the_range(
    tmp_path: Path,
) -> None:
    from tests.origin.harness import OriginProcess

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(48 << 20)
    (src / "big.bin").write_bytes(data)
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    with (
        OriginProcess(["--export", f"/ns=file://{src}", "--public"], tmp_path) as our_origin,
        CacheProcess(tmp_path / "c", {"/ns": f"{our_origin.url}/ns"}) as c,
    ):
        r = c.get("/ns/big.bin", {"Range": "bytes=0-4095", "Want-Digest": "sha-256"})
        assert r.status == 206 and r.body == data[:4096]
        # the origin computes sha-256 server-side: the ranged GET carries it at once
        assert r.headers["digest"] == f"sha-256={sha}"
        # a HEAD gets the checksum remembered from the origin's answer
        head = c.get("/ns/big.bin", {"Want-Digest": "sha-256"}, method="HEAD")
        assert head.headers["digest"] == f"sha-256={sha}"
    # a posix origin has no server-side checksum: a ranged GET gets no Digest, and no
    # computation in the background pulls in the rest of the object
    with CacheProcess(tmp_path / "d", {"/ns": f"file://{src}"}) as c:
        r = c.get("/ns/big.bin", {"Range": "bytes=0-4095", "Want-Digest": "adler32"})
        assert r.status == 206 and r.body == data[:4096] and "digest" not in r.headers
        time.sleep(1.5)
        objects = {o["path"]: o for o in c.admin("objects").json()["objects"]}
        # the first block, a window and read-ahead at most, not the 48 MiB
        assert objects["/ns/big.bin"]["cached_bytes"] <= 24 << 20
        assert c.metrics()["stashflow_cache_origin_bytes_total"] <= 24 << 20
        # a HEAD waits for the computation
        head = c.get("/ns/big.bin", {"Want-Digest": "adler32"}, method="HEAD")
        assert head.headers["digest"] == f"adler32={zlib.adler32(data):08x}"
