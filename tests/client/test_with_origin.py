"""`stashcp` and the fsspec filesystem with the real origin server (`stashflow origin
serve`): recursive listings (PROPFIND), globs, uploads with WLCG tokens, and a cache
in front of the origin with the origin as the last fallback."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stashflow.cache.client.errors import EXIT_AUTH, EXIT_NOT_FOUND, EXIT_OK
from tests.cache.harness import CacheProcess
from tests.client.conftest import ISSUER, Origin, _cli, dead_url, stashcp


def tree_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_recursive_download_through_a_cache(origin: Origin, tmp_path: Path) -> None:
    """-r lists at the origin (PROPFIND, Depth 1, walked), reads through the cache."""
    with CacheProcess(tmp_path / "c", {"/ns": origin.url + "/ns"}) as cache:
        r = stashcp(
            "-r", "--json", "--cache", cache.url, "--origin", origin.url,
            "stash:///ns/tree", str(tmp_path / "out"),
        )  # fmt: skip
        assert r.code == EXIT_OK, r.stderr
        assert tree_of(tmp_path / "out") == tree_of(origin.data / "tree")
        assert {t["servers"][0] for t in r.json()["transfers"]} == {cache.url}
        # into an existing directory: cp -r semantics, DEST/tree/...
        (tmp_path / "into").mkdir()
        r = stashcp("-r", "--cache", cache.url, "--origin", origin.url, "/ns/tree/",
                    str(tmp_path / "into"))  # fmt: skip
        assert r.code == EXIT_OK, r.stderr
        assert tree_of(tmp_path / "into" / "tree") == tree_of(origin.data / "tree")


def test_recursive_direct_from_the_origin_and_globs(origin: Origin, tmp_path: Path) -> None:
    r = stashcp("-r", f"{origin.url}/ns/tree/sub", str(tmp_path / "sub"))
    assert r.code == EXIT_OK, r.stderr
    assert tree_of(tmp_path / "sub") == tree_of(origin.data / "tree" / "sub")
    (tmp_path / "logs").mkdir()
    r = stashcp("--origin", origin.url, "--json", "/ns/tree/run*.log", str(tmp_path / "logs"))
    assert r.code == EXIT_OK, r.stderr
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["run1.log", "run2.log"]


def test_origin_is_the_last_fallback(origin: Origin, tmp_path: Path) -> None:
    r = stashcp(
        "--json", "--cache", dead_url(), "--origin", origin.url, "/ns/tree/sub/b.bin",
        str(tmp_path), env={"STASHFLOW_CLIENT_BACKOFF": "0.05"},
    )  # fmt: skip
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "b.bin").read_bytes() == (
        origin.data / "tree" / "sub" / "b.bin"
    ).read_bytes()
    assert r.json()["transfers"][0]["servers"] == [origin.url]


def test_a_cache_refusing_the_issuer_is_left_for_the_next(origin: Origin, tmp_path: Path) -> None:
    """A cache that does not trust the token's issuer answers 401 wrong_issuer: that is
    its own limitation, so the next cache serves the object; a 404 the origin itself
    confirms is final (10) after the caches."""
    other_keys = tmp_path / "other-issuer"
    other_jwks = json.loads(_cli("token", "keygen", "--out", str(other_keys)))["jwks"]
    own_jwks = origin.key.parent / "jwks.json"
    untrusting = CacheProcess(tmp_path / "c1", {"/ns": origin.url + "/ns"}, extra=[
        "--protected", "/ns", "--issuer", f"https://other.issuer.test={other_jwks}",
    ]).start()  # fmt: skip
    try:
        with CacheProcess(tmp_path / "c2", {"/ns": origin.url + "/ns"}, extra=[
            "--protected", "/ns", "--issuer", f"{ISSUER}={own_jwks}",
        ]) as trusting:  # fmt: skip
            token = origin.token("storage.read:/ns")
            caches = f"{untrusting.url},{trusting.url}"
            r = stashcp("--json", "--cache", caches, "/ns/tree/sub/b.bin", str(tmp_path),
                        env={"BEARER_TOKEN": token})  # fmt: skip
            assert r.code == EXIT_OK, r.stderr
            assert (tmp_path / "b.bin").read_bytes() == (
                origin.data / "tree" / "sub" / "b.bin"
            ).read_bytes()
            t = r.json()["transfers"][0]
            assert t["servers"] == [trusting.url]
            assert [(a["server"], a["status"]) for a in t["attempts"]] == [(untrusting.url, 401)]
            assert "not trusted" in t["attempts"][0]["error"]
            # only the untrusting cache: still an authorization error (11)
            r = stashcp("--cache", untrusting.url, "/ns/tree/a.txt", str(tmp_path),
                        env={"BEARER_TOKEN": token})  # fmt: skip
            assert r.code == EXIT_AUTH, r.stderr
            # missing at the caches and at the origin: not found, said by the origin
            r = stashcp("--json", "--cache", caches, "--origin", origin.url, "/ns/tree/absent",
                        str(tmp_path), env={"BEARER_TOKEN": token})  # fmt: skip
            assert r.code == EXIT_NOT_FOUND, r.stderr
            t = r.json()["transfers"][0]
            assert [a["server"] for a in t["attempts"]] == [
                untrusting.url, trusting.url, origin.url,
            ]  # fmt: skip
            assert len(r.stderr.strip().splitlines()) == 1
    finally:
        untrusting.stop()


def test_upload_needs_a_covering_token(origin: Origin, tmp_path: Path) -> None:
    src = tmp_path / "result.bin"
    src.write_bytes(os.urandom(2_000_000))
    dest = "stash:///ns/up/result.bin"
    r = stashcp("--origin", origin.url, str(src), dest)
    assert r.code == EXIT_AUTH and "no token found" in r.stderr
    read_only = origin.token("storage.read:/ns")
    r = stashcp("--origin", origin.url, str(src), dest, env={"BEARER_TOKEN": read_only})
    assert r.code == EXIT_AUTH
    assert read_only not in r.stderr
    assert not (origin.data / "up" / "result.bin").exists()
    tok_file = tmp_path / "tok"
    tok_file.write_text(origin.token("storage.create:/ns/up") + "\n")
    r = stashcp("--origin", origin.url, "--json", "--token", str(tok_file), str(src), dest)
    assert r.code == EXIT_OK, r.stderr
    assert (origin.data / "up" / "result.bin").read_bytes() == src.read_bytes()
    assert r.json()["transfers"][0]["checksum"].startswith("crc32c:")


def test_recursive_upload(origin: Origin, tmp_path: Path) -> None:
    local = tmp_path / "outputs"
    (local / "nested").mkdir(parents=True)
    (local / "one.txt").write_bytes(b"1\n")
    (local / "nested" / "two.bin").write_bytes(os.urandom(70_000))
    env = {"BEARER_TOKEN": origin.token("storage.create:/ns/up", "storage.modify:/ns/up")}
    r = stashcp("-r", "--origin", origin.url, str(local), "stash:///ns/up/", env=env)
    assert r.code == EXIT_OK, r.stderr
    assert tree_of(origin.data / "up" / "outputs") == tree_of(local)


def test_fsspec_listing_find_and_put(origin: Origin, tmp_path: Path) -> None:
    from stashflow.cache.client.fsspec_impl import StashFileSystem

    with CacheProcess(tmp_path / "c", {"/ns": origin.url + "/ns"}) as cache:
        fs = StashFileSystem(
            caches=[cache.url], origin=origin.url,
            token=origin.token("storage.create:/ns/up", "storage.read:/ns"),
            skip_instance_cache=True,
        )  # fmt: skip
        try:
            names = fs.ls("stash:///ns/tree", detail=False)
            assert names == ["/ns/tree/a.txt", "/ns/tree/run1.log", "/ns/tree/run2.log",
                             "/ns/tree/sub"]  # fmt: skip
            assert fs.isdir("/ns/tree/sub") and fs.isfile("/ns/tree/a.txt")
            found = fs.find("/ns/tree")
            assert "/ns/tree/sub/deeper/c.dat" in found and len(found) == 5
            assert fs.cat_file("/ns/tree/a.txt") == b"alpha\n"
            local = tmp_path / "p.txt"
            local.write_bytes(b"put through fsspec\n")
            fs.put(str(local), "stash:///ns/up/p.txt")
            assert (origin.data / "up" / "p.txt").read_bytes() == b"put through fsspec\n"
            with fs.open("/ns/up/w.txt", "wb") as f:
                f.write(b"written")
            assert (origin.data / "up" / "w.txt").read_bytes() == b"written"
        finally:
            fs.close()
