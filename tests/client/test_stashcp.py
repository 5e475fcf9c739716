"""`stashcp` against real cache processes (posix origins behind them), run as the real
command: downloads, parallel ranges, failover, checksums, resume, exit codes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stashflow.cache.client.errors import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_RETRYABLE,
    EXIT_USAGE,
)
from tests.cache.harness import CacheProcess, MisbehavingOrigin
from tests.client.conftest import MiB, access_log, dead_url, stashcp, stashcp_killing


def test_single_download_is_identical_and_verified(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path
) -> None:
    r = stashcp("--cache", cache.url, "--json", "stash:///ns/medium.bin", str(tmp_path))
    assert r.code == EXIT_OK, r.stderr
    out = tmp_path / "medium.bin"
    assert out.read_bytes() == (origin_dir / "medium.bin").read_bytes()
    summary = r.json()
    t = summary["transfers"][0]
    assert t["ok"] and t["size"] == 3 * MiB + 17
    assert t["checksum"].startswith("crc32c:")  # the cache's Digest was checked
    assert t["servers"] == [cache.url]
    assert [p.name for p in tmp_path.iterdir()] == ["medium.bin"]  # no temp files left
    assert r.stderr == ""  # quiet when not on a terminal


def test_source_forms_and_explicit_destination(cache: CacheProcess, tmp_path: Path) -> None:
    for i, src in enumerate(["stash:///ns/small.txt", "osdf:///ns/small.txt", "/ns/small.txt"]):
        dest = tmp_path / f"copy{i}.txt"
        r = stashcp("--cache", cache.url, src, str(dest))
        assert r.code == EXIT_OK, r.stderr
        assert dest.read_bytes() == b"hello stashflow\n"
    r = stashcp("--cache", cache.url, "/ns/empty", str(tmp_path / "e"))
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "e").read_bytes() == b""


def test_many_files_in_parallel_and_glob(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path
) -> None:
    names = sorted(p.name for p in (origin_dir / "many").iterdir())
    sources = [f"stash:///ns/many/{n}" for n in names]
    r = stashcp("--cache", cache.url, "-j", "8", "--json", *sources, str(tmp_path))
    assert r.code == EXIT_OK, r.stderr
    assert r.json()["files"] == len(names)
    for n in names:
        assert (tmp_path / n).read_bytes() == (origin_dir / "many" / n).read_bytes()


def test_large_file_in_parallel_ranges_is_reassembled(
    caches: tuple[CacheProcess, CacheProcess], origin_dir: Path, tmp_path: Path
) -> None:
    cache = caches[1]
    r = stashcp(
        "--cache", cache.url, "--chunk-size", "1MiB", "--chunks", "6", "--json",
        "/ns/big.bin", str(tmp_path / "big.bin"),
    )  # fmt: skip
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "big.bin").read_bytes() == (origin_dir / "big.bin").read_bytes()
    ranges = [e["range"] for e in access_log(cache) if e["path"] == "/ns/big.bin" and e["range"]]
    assert len(ranges) >= 25  # 24 MiB + 5 bytes in 1 MiB ranges
    assert f"bytes=0-{MiB - 1}" in ranges and f"bytes={24 * MiB}-{24 * MiB + 4}" in ranges


def test_not_found_has_its_exit_code_and_leaves_nothing(
    cache: CacheProcess, tmp_path: Path
) -> None:
    dest = tmp_path / "x.bin"
    r = stashcp("--cache", cache.url, "stash:///ns/no/such.bin", str(dest))
    assert r.code == EXIT_NOT_FOUND
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "stash:///ns/no/such.bin" in lines[0] and "not found" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no error page, no partial file


def test_failed_get_keeps_the_old_destination(cache: CacheProcess, tmp_path: Path) -> None:
    dest = tmp_path / "keep.txt"
    dest.write_bytes(b"precious")
    r = stashcp("--cache", cache.url, "/ns/missing.txt", str(dest))
    assert r.code == EXIT_NOT_FOUND
    assert dest.read_bytes() == b"precious"
    r = stashcp("--cache", dead_url(), "/ns/small.txt", str(dest))
    assert r.code == EXIT_RETRYABLE
    assert dest.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_dead_first_cache_fails_over(cache: CacheProcess, origin_dir: Path, tmp_path: Path) -> None:
    dead = dead_url()
    r = stashcp("--cache", f"{dead},{cache.url}", "--json", "/ns/medium.bin", str(tmp_path))
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "medium.bin").read_bytes() == (origin_dir / "medium.bin").read_bytes()
    assert r.json()["transfers"][0]["servers"] == [cache.url]


def test_a_cache_without_the_namespace_is_left_for_the_next(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path
) -> None:
    """A cache's own 404 (it serves no such namespace) speaks for that cache only: the
    next cache is tried. When every cache says 404, it is still "not found" (10)."""
    with CacheProcess(tmp_path / "other", {"/other": f"file://{origin_dir}"}) as other:
        assert other.get("/ns/small.txt").status == 404  # the premise: a cache-level 404
        out = tmp_path / "out"
        out.mkdir()
        r = stashcp("--cache", f"{other.url},{cache.url}", "--json", "/ns/medium.bin", str(out))
        assert r.code == EXIT_OK, r.stderr
        assert (out / "medium.bin").read_bytes() == (origin_dir / "medium.bin").read_bytes()
        t = r.json()["transfers"][0]
        assert t["servers"] == [cache.url]
        assert [a["status"] for a in t["attempts"]] == [404]
        # the object is missing everywhere: not found, after both caches were asked
        r = stashcp("--cache", f"{other.url},{cache.url}", "--json", "/ns/absent", str(out))
        assert r.code == EXIT_NOT_FOUND, r.stderr
        t = r.json()["transfers"][0]
        assert {a["server"] for a in t["attempts"]} == {other.url, cache.url}
        assert len(r.stderr.strip().splitlines()) == 1 and "/ns/absent" in r.stderr


def test_exit_code_is_that_of_the_first_failing_argument(
    cache: CacheProcess, tmp_path: Path
) -> None:
    """A failure found while planning (an unsupported scheme: usage, 2) that comes
    after a failed transfer (not found, 10) does not jump ahead of it."""
    r = stashcp("--cache", cache.url, "/ns/absent", "ftp://host/ns/x", str(tmp_path))
    assert r.code == EXIT_NOT_FOUND, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "/ns/absent" in lines[0] and "ftp://" in lines[1]
    r = stashcp("--cache", cache.url, "ftp://host/ns/x", "/ns/absent", str(tmp_path))
    assert r.code == EXIT_USAGE, r.stderr


def test_all_sources_dead_is_retryable(tmp_path: Path) -> None:
    r = stashcp(
        "--cache", f"{dead_url()},{dead_url()}", "--json", "/ns/small.txt", str(tmp_path),
        env={"STASHFLOW_CLIENT_BACKOFF": "0.05"},
    )  # fmt: skip
    assert r.code == EXIT_RETRYABLE
    t = r.json()["transfers"][0]
    assert t["retryable"] is True and t["error_kind"] == "transfer"
    assert "cannot connect" in r.stderr and "/ns/small.txt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cache_killed_mid_download_completes_from_the_next(
    origin_dir: Path, tmp_path: Path
) -> None:
    """Two caches; the first is kill -9'd while serving a large file: the download
    finishes from the second, byte-identical."""
    src = origin_dir / "big.bin"
    with (
        CacheProcess(tmp_path / "ca", {"/ns": f"file://{origin_dir}"}) as a,
        CacheProcess(tmp_path / "cb", {"/ns": f"file://{origin_dir}"}) as b,
    ):
        out = tmp_path / "out"
        out.mkdir()
        # kill the first cache once it has served a few ranges
        run = stashcp_killing(
            a, lambda: len([e for e in access_log(a) if e["path"] == "/ns/big.bin"]) >= 3,
            "--cache", f"{a.url},{b.url}", "--json", "--limit-rate", "8MiB",
            "--chunk-size", "2MiB", "--chunks", "2", "--min-rate", "1KiB",
            "/ns/big.bin", str(out / "big.bin"),
        )  # fmt: skip
        assert run.code == EXIT_OK, run.stderr
        assert (out / "big.bin").read_bytes() == src.read_bytes()
        stdout = run.stdout
        t = json.loads(stdout)["transfers"][0]
        assert set(t["servers"]) == {a.url, b.url}
        assert any(att["server"] == a.url for att in t["attempts"])
        assert t["checksum"]
        assert sorted(p.name for p in out.iterdir()) == ["big.bin"]


def test_cache_killed_mid_spliced_download_fails_over(origin_dir: Path, tmp_path: Path) -> None:
    """Default options, so large bodies are received by splice: the first cache is
    kill -9'd while a splice is receiving from it, and the download completes from the
    second, byte-identical and checksum-verified. The first cache's origin holds every
    object at HOLD_AT bytes (tests/cache/origin_app.py, /hold/), so that the kill always
    lands mid-transfer whatever the speed of the machine, without throttling the
    client."""
    hold_at = 8 * MiB
    src = origin_dir / "big.bin"
    assert src.stat().st_size > hold_at + 4 * MiB
    held = tmp_path / "held"
    with (
        MisbehavingOrigin(origin_dir, hold_at=hold_at, marker=held) as slow,
        CacheProcess(tmp_path / "ca", {"/ns": f"{slow.url}/hold"}) as a,
        CacheProcess(tmp_path / "cb", {"/ns": f"file://{origin_dir}"}) as b,
    ):
        out = tmp_path / "out"
        out.mkdir()
        part = out / ".big.bin.stashcp-part"
        # The first cache has all it will ever get and stashcp has received part of
        # it (the part file is sparse: allocated blocks are landed bytes).
        run = stashcp_killing(
            a,
            lambda: held.exists() and part.exists() and part.stat().st_blocks * 512 >= MiB,
            "-d", "--json", "--cache", f"{a.url},{b.url}", "/ns/big.bin",
            str(out / "big.bin"), wait=60, finish=120,
        )  # fmt: skip
        assert run.code == EXIT_OK, run.stderr[-3000:]
        assert (out / "big.bin").read_bytes() == src.read_bytes()
        stdout, stderr = run.stdout, run.stderr
        t = json.loads(stdout)["transfers"][0]
        assert set(t["servers"]) == {a.url, b.url}
        assert any(att["server"] == a.url for att in t["attempts"])
        assert t["checksum"]
        # the splice receive path was the one interrupted and resumed
        spliced = [line for line in stderr.splitlines() if "by splice" in line]
        assert any(a.url in line for line in spliced), stderr[-3000:]
        assert any(b.url in line for line in spliced), stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == ["big.bin"]


def test_interrupted_download_resumes(origin_dir: Path, tmp_path: Path) -> None:
    """A run whose only cache dies leaves no destination file, only the hidden partial;
    the next run fetches just the missing bytes."""
    c = CacheProcess(tmp_path / "c", {"/ns": f"file://{origin_dir}"}).start()
    out = tmp_path / "out"
    out.mkdir()
    try:
        port = c.port
        run = stashcp_killing(
            c, lambda: len([e for e in access_log(c) if e["path"] == "/ns/big.bin"]) >= 6,
            "--cache", c.url, "--limit-rate", "8MiB", "--chunk-size", "1MiB",
            "--chunks", "2", "/ns/big.bin", str(out / "big.bin"),
            env={"STASHFLOW_CLIENT_BACKOFF": "0.05"},
        )  # fmt: skip
        stderr = run.stderr
        assert run.code == EXIT_RETRYABLE, stderr
        assert "/ns/big.bin" in stderr
        assert not (out / "big.bin").exists()
        partial = out / ".big.bin.stashcp-part"
        assert partial.exists() and (out / ".big.bin.stashcp-part.json").exists()
        kept = sum(
            b - a for a, b in json.loads((out / ".big.bin.stashcp-part.json").read_text())["done"]
        )
        assert kept >= 2 * MiB

        c.port = port
        c.start()
        r = stashcp("--cache", c.url, "--json", "/ns/big.bin", str(out / "big.bin"))
        assert r.code == EXIT_OK, r.stderr
        t = r.json()["transfers"][0]
        assert t["resumed"] == kept
        assert t["transferred"] == t["size"] - kept
        assert (out / "big.bin").read_bytes() == (origin_dir / "big.bin").read_bytes()
        assert sorted(p.name for p in out.iterdir()) == ["big.bin"]
    finally:
        c.stop()


def test_corrupted_partial_is_caught_by_the_checksum(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path
) -> None:
    """Resumed bytes that do not belong to the object fail the checksum: the download
    starts over rather than delivering a wrong file."""
    data = (origin_dir / "medium.bin").read_bytes()
    head = cache.get("/ns/medium.bin", method="HEAD")
    part = tmp_path / ".medium.bin.stashcp-part"
    garbage = bytearray(data)
    garbage[:MiB] = os.urandom(MiB)
    part.write_bytes(bytes(garbage[: 2 * MiB]) + b"\0" * (len(data) - 2 * MiB))
    (tmp_path / ".medium.bin.stashcp-part.json").write_text(
        json.dumps(
            {"source": "/ns/medium.bin", "size": len(data), "etag": head.headers["etag"],
             "done": [[0, 2 * MiB]]}
        )
    )  # fmt: skip
    r = stashcp("--cache", cache.url, "--json", "/ns/medium.bin", str(tmp_path / "medium.bin"))
    assert r.code == EXIT_OK, r.stderr
    t = r.json()["transfers"][0]
    assert t["checksum_failures"] == 1
    assert (tmp_path / "medium.bin").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["medium.bin"]


def _corrupt_cached_copy(cache: CacheProcess, size: int) -> None:
    """Flip bytes in the cache's data file of an object without changing its mtime:
    silent disk corruption the cache itself no longer checks for."""
    files = [p for p in (cache.directory / "data").rglob("*") if p.is_file()]
    target = next(p for p in files if p.stat().st_size == size)
    st = target.stat()
    with open(target, "r+b") as f:
        f.seek(12345)
        block = f.read(64)
        f.seek(12345)
        f.write(bytes(b ^ 0xFF for b in block))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_checksum_mismatch_is_detected_and_fails_over(origin_dir: Path, tmp_path: Path) -> None:
    data = (origin_dir / "medium.bin").read_bytes()
    with (
        CacheProcess(tmp_path / "ca", {"/ns": f"file://{origin_dir}"}) as a,
        CacheProcess(tmp_path / "cb", {"/ns": f"file://{origin_dir}"}) as b,
    ):
        # warm cache a (data and checksum), then corrupt its copy on disk
        assert a.get("/ns/medium.bin").body == data
        digest = a.get("/ns/medium.bin", {"Want-Digest": "crc32c"}, method="HEAD")
        assert "digest" in digest.headers
        # once its data file is older than the timestamp granularity, a verified block
        # is not checked again while the file's mtime stays the same
        time.sleep(1.2)
        assert a.get("/ns/medium.bin").body == data
        _corrupt_cached_copy(a, len(data))
        assert a.get("/ns/medium.bin").body != data  # the cache serves the bad bytes

        alone = tmp_path / "alone"
        alone.mkdir()
        r = stashcp("--cache", a.url, "/ns/medium.bin", str(alone),
                    env={"STASHFLOW_CLIENT_BACKOFF": "0.05"})  # fmt: skip
        assert r.code == EXIT_RETRYABLE
        assert "checksum mismatch" in r.stderr and "/ns/medium.bin" in r.stderr
        assert list(alone.iterdir()) == []  # never delivered, not even as a partial

        both = tmp_path / "both"
        both.mkdir()
        r = stashcp("--cache", f"{a.url},{b.url}", "--json", "/ns/medium.bin", str(both))
        assert r.code == EXIT_OK, r.stderr
        t = r.json()["transfers"][0]
        assert t["checksum_failures"] == 1 and t["servers"] == [b.url]
        assert (both / "medium.bin").read_bytes() == data


def test_classic_command_line(cache: CacheProcess, tmp_path: Path) -> None:
    r = stashcp("-d", "--cache", cache.url, "--methods", "http", "/ns/small.txt", ".",
                cwd=tmp_path)  # fmt: skip
    assert r.code == EXIT_OK, r.stderr
    assert (tmp_path / "small.txt").read_bytes() == b"hello stashflow\n"
    assert "verified" in r.stderr  # -d says what happened
    r = stashcp("--cache", cache.url, "--methods", "cvmfs,xrootd", "/ns/small.txt", ".",
                cwd=tmp_path)  # fmt: skip
    assert r.code == EXIT_USAGE and "http" in r.stderr
    r = stashcp("--cache", cache.url, "--closest")
    assert r.code == EXIT_OK and r.stdout.strip() == cache.url


def test_usage_errors(tmp_path: Path) -> None:
    r = stashcp("/ns/only-one")
    assert r.code == EXIT_USAGE
    r = stashcp("/ns/small.txt", str(tmp_path))  # no director, no cache
    assert r.code == EXIT_USAGE
    assert "director" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = stashcp("--cache", "http://127.0.0.1:1", "/ns/a", str(tmp_path / "no" / "dir" / "a"))
    assert r.code == 13 and "does not exist" in r.stderr


def test_token_is_never_printed(cache: CacheProcess, tmp_path: Path) -> None:
    secret = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LXRva2Vu.c2ln"
    r = stashcp("-d", "--json", "--cache", cache.url, "/ns/missing", str(tmp_path),
                env={"BEARER_TOKEN": secret})  # fmt: skip
    assert r.code == EXIT_NOT_FOUND
    assert secret not in r.stdout and secret not in r.stderr


def test_progress_only_when_asked_or_on_a_terminal(cache: CacheProcess, tmp_path: Path) -> None:
    quiet = stashcp("--cache", cache.url, "/ns/medium.bin", str(tmp_path / "q"))
    assert quiet.code == EXIT_OK and quiet.stderr == ""
    shown = stashcp("--progress", "--cache", cache.url, "/ns/medium.bin", str(tmp_path / "p"))
    assert shown.code == EXIT_OK
    final = shown.stderr.strip().splitlines()[-1]
    assert "3.0 MiB / 3.0 MiB (100%)" in final


def test_stalled_transfer_is_abandoned(cache: CacheProcess, tmp_path: Path) -> None:
    """A source slower than --min-rate over --stall-window is dropped (here every
    source is slow: the run ends as a retryable failure naming the stall)."""
    r = stashcp(
        "--cache", cache.url, "--limit-rate", "64KiB", "--min-rate", "1MiB",
        "--stall-window", "0.5s", "--json", "/ns/medium.bin", str(tmp_path / "m"),
        env={"STASHFLOW_CLIENT_BACKOFF": "0.05", "STASHFLOW_CLIENT_ROUNDS": "2"},
    )  # fmt: skip
    assert r.code == EXIT_RETRYABLE
    assert "stalled" in r.stderr
    t = r.json()["transfers"][0]
    assert t["error_kind"] == "stalled" and t["retryable"]
    assert not (tmp_path / "m").exists()
