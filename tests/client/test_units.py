"""Pure pieces of the client: URL forms, director headers, listings, byte-range
bookkeeping, ClassAds, token discovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stashflow.cache.client.condor import Expr, format_ad, parse_ads
from stashflow.cache.client.discovery import (
    glob_root,
    parse_link_header,
    parse_multistatus,
    parse_namespace_header,
    parse_remote,
)
from stashflow.cache.client.tokens import find_token
from stashflow.cache.client.transfer import Intervals, Options


def test_source_forms() -> None:
    assert parse_remote("stash:///ns/a/b").path == "/ns/a/b"
    assert parse_remote("osdf:///ns/a").scheme == "osdf"
    assert parse_remote("osdf://ns/a").path == "/ns/a"
    p = parse_remote("pelican://fed.example:8444/ns/x%20y")
    assert (p.scheme, p.host, p.path) == ("pelican", "fed.example:8444", "/ns/x y")
    assert parse_remote("/ns/../ns/f").path == "/ns/f"
    assert parse_remote("https://o.example/ns/f").direct
    with pytest.raises(ValueError):
        parse_remote("relative/path")
    with pytest.raises(ValueError):
        parse_remote("ftp://x/y")
    assert glob_root("/ns/run*/data/*.root") == "/ns"
    assert parse_remote("/ns/a*.txt").has_glob()


def test_link_and_namespace_headers() -> None:
    link = (
        '<https://c2.example:8443/ns/f>; rel="duplicate"; pri=2; depth=1, '
        '<https://c1.example:8443/ns/f>; rel="duplicate"; pri=1; depth=1'
    )
    assert parse_link_header(link) == [
        "https://c1.example:8443/ns/f",
        "https://c2.example:8443/ns/f",
    ]
    ns = parse_namespace_header(
        "namespace=/ns, require-token=true, collections-url=https://o.example:8443"
    )
    assert ns is not None
    assert (ns.namespace, ns.require_token, ns.collections_url) == (
        "/ns",
        True,
        "https://o.example:8443",
    )
    assert parse_namespace_header("require-token=false") is None


def test_multistatus() -> None:
    body = b"""<?xml version="1.0"?>
    <D:multistatus xmlns:D="DAV:">
      <D:response><D:href>/ns/dir/</D:href><D:propstat><D:prop>
        <D:resourcetype><D:collection/></D:resourcetype></D:prop>
        <D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
      <D:response><D:href>/ns/dir/a%20b.txt</D:href><D:propstat><D:prop>
        <D:resourcetype/><D:getcontentlength>12</D:getcontentlength>
        <D:getlastmodified>Mon, 01 Jan 2024 00:00:00 GMT</D:getlastmodified></D:prop>
        <D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
    </D:multistatus>"""
    entries = parse_multistatus(body)
    assert [(e.path, e.is_dir, e.size) for e in entries] == [
        ("/ns/dir", True, None),
        ("/ns/dir/a b.txt", False, 12),
    ]
    assert entries[1].mtime == 1704067200.0


def test_intervals() -> None:
    iv = Intervals()
    iv.add(10, 20)
    iv.add(0, 5)
    iv.add(5, 10)
    assert iv.items == [[0, 20]]
    iv.add(30, 40)
    assert iv.missing(50) == [(20, 29), (40, 49)]
    assert iv.first_missing(0, 100) == 20
    assert iv.first_missing(30, 39) is None
    assert iv.total() == 30 and not iv.covers(50) and iv.covers(20)


def test_classads_round_trip() -> None:
    ad = {
        "TransferUrl": 'stash:///ns/"q"',
        "TransferSuccess": False,
        "TransferTotalBytes": 12,
        "Rate": 1.5,
        "DeveloperData": {"Servers": "a,b"},
        "TransferErrorData": [{"ErrorType": "Contact", "Retryable": 0}],
    }
    text = format_ad(ad) + "\n" + format_ad({"x": 1})
    back = parse_ads(text)
    assert back == [ad, {"x": 1}]
    # expressions we cannot evaluate are kept, not fatal; comments are skipped
    (e,) = parse_ads('[ Url = "u"; // c\n Expr = a + 2 * (b - 1); LocalFileName = "l" ]')
    assert e["Url"] == "u" and e["LocalFileName"] == "l" and isinstance(e["Expr"], Expr)
    assert parse_ads('A = 1\nB = "x"\n\nA = 2\n') == [{"A": 1, "B": "x"}, {"A": 2}]


def test_token_discovery_order(tmp_path: Path) -> None:
    uid = os.getuid()
    f = tmp_path / "tok"
    f.write_text("# comment\nfiletoken\n")
    (tmp_path / f"bt_u{uid}").write_text("runtime\n")
    env = {
        "BEARER_TOKEN": "envtoken",
        "BEARER_TOKEN_FILE": str(f),
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    tok = find_token("explicit", env)
    assert tok is not None and tok.value == "explicit"
    tok = find_token(str(f), env)
    assert tok is not None and tok.value == "filetoken"
    assert (t := find_token(None, env)) is not None and t.value == "envtoken"
    del env["BEARER_TOKEN"]
    assert (t := find_token(None, env)) is not None and t.value == "filetoken"
    del env["BEARER_TOKEN_FILE"]
    assert (t := find_token(None, env)) is not None and t.value == "runtime"
    assert "runtime" not in repr(t) and "runtime" not in str(t)


def test_options_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STASHFLOW_DIRECTOR", "https://d.example:8444")
    monkeypatch.setenv("STASHFLOW_CLIENT_CHUNK_SIZE", "4MiB")
    monkeypatch.setenv("STASHFLOW_CLIENT_STALL_WINDOW", "5s")
    monkeypatch.setenv("STASHFLOW_CLIENT_CACHES", "http://a:1, http://b:2")
    monkeypatch.delenv("STASHFLOW_CONFIG", raising=False)
    o = Options.load(parallel_files=3)
    assert o.director == "https://d.example:8444"
    assert o.chunk_size == 4 * 1024 * 1024 and o.stall_window == 5.0
    assert o.caches == ["http://a:1", "http://b:2"] and o.parallel_files == 3
    assert Options.load(director="https://other").director == "https://other"


def test_allocator_keeps_freed_memory_on_glibc() -> None:
    import platform

    from stashflow.cache.client.allocator import keep_freed_memory

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    # mallopt answers 1 for accepted settings: on glibc both must be taken
    assert keep_freed_memory() is on_glibc


def test_director_environment_wins_over_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text('[client]\ndirector = "https://from-file.example:8444"\nparallel_files = 5\n')
    monkeypatch.setenv("STASHFLOW_CONFIG", str(conf))
    monkeypatch.delenv("STASHFLOW_CLIENT_DIRECTOR", raising=False)
    monkeypatch.delenv("STASHFLOW_DIRECTOR", raising=False)
    assert Options.load().director == "https://from-file.example:8444"
    monkeypatch.setenv("STASHFLOW_DIRECTOR", "https://from-env.example:8444")
    o = Options.load()
    assert o.director == "https://from-env.example:8444"
    assert o.parallel_files == 5  # the rest of the file still applies
    assert Options.load(director="https://flag").director == "https://flag"
