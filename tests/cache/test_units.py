"""Unit tests of the cache's pure parts and of the index's bookkeeping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stashflow.cache.config import CacheConfig
from stashflow.cache.eviction import make_policy
from stashflow.cache.index import Index, NoSpace
from stashflow.cache.namespace import BadPath, clean_path
from stashflow.cache.ranges import RangeError, Unsatisfiable, parse_range
from stashflow.integration.config import ConfigError, parse_duration, parse_size

MiB = 1 << 20


def test_parse_range_basics() -> None:
    assert parse_range("bytes=0-9", 100) == [(0, 9)]
    assert parse_range("bytes=90-", 100) == [(90, 99)]
    assert parse_range("bytes=-10", 100) == [(90, 99)]
    assert parse_range("bytes=0-999", 100) == [(0, 99)]
    assert parse_range("bytes=0-9, 5-20, 50-60", 100) == [(0, 20), (50, 60)]
    assert parse_range("bytes=200-300, 0-0", 100) == [(0, 0)]
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=100-", 100)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-0", 0)
    for bad in ("bytes=", "bytes=x-1", "lines=0-1", "bytes=9-1", "0-1"):
        with pytest.raises(RangeError):
            parse_range(bad, 100)


@given(
    st.integers(0, 10_000),
    st.lists(st.tuples(st.integers(0, 12_000), st.integers(0, 12_000)), min_size=1, max_size=10),
)
def test_parse_range_covers_exactly_the_requested_bytes(
    size: int, pairs: list[tuple[int, int]]
) -> None:
    spec = "bytes=" + ",".join(f"{min(a, b)}-{max(a, b)}" for a, b in pairs)
    wanted = {i for a, b in pairs for i in range(min(a, b), min(max(a, b), size - 1) + 1)}
    try:
        ranges = parse_range(spec, size)
    except Unsatisfiable:
        assert not wanted
        return
    got = [i for a, b in ranges for i in range(a, b + 1)]
    assert len(got) == len(set(got))  # no byte twice
    assert set(got) == wanted
    assert ranges == sorted(ranges)


@pytest.mark.parametrize(
    "path",
    [
        "/ns/../x",
        "/ns//x",
        "/ns/./x",
        "/ns/x/",
        "/ns/a\x00b",
        "/ns/" + "a" * 256,
        "ns/x",
        "/ns/x\n",
    ],
)
def test_clean_path_refuses(path: str) -> None:
    with pytest.raises(BadPath):
        clean_path(path, path)


def test_clean_path_checks_the_raw_form_too() -> None:
    with pytest.raises(BadPath):
        clean_path("/ns/%2e%2e/x", "/ns/../x")
    assert clean_path("/ns/a%20b", "/ns/a b") == "/ns/a b"


def test_sizes_and_durations() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("512") == 512
    assert parse_size("1.5MiB") == 3 * (1 << 19)
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ConfigError):
        parse_size("big")
    with pytest.raises(ConfigError):
        parse_duration("soon")


def test_config_validation(tmp_path: Path) -> None:
    base = {"directory": str(tmp_path), "origins": ["/ns=file:///tmp"]}
    cfg = CacheConfig.build(
        {}, {**base, "size": "1GiB", "high_watermark": "80%", "low_watermark": "70"}
    )
    assert cfg.high_watermark == 0.8 and cfg.low_watermark == 0.7
    bad_flags = [
        {"origins": ["ns=file:///x"]},
        {"origins": []},
        {"block_size": "1000"},
        {"high_watermark": "0.5", "low_watermark": "0.6"},
        {"listen": "nowhere"},
    ]
    for bad in bad_flags:
        with pytest.raises(ConfigError):
            CacheConfig.build({}, {**base, "size": "1GiB", **bad})
    with pytest.raises(ConfigError, match="unknown cache setting"):
        CacheConfig.build({"colour": "blue"}, base)
    with pytest.raises(ConfigError, match="access_flush must be a positive duration"):
        CacheConfig.build({"access_flush": "0s"}, base)
    # one stalled origin must not be able to take every fetch slot from the others
    two = {**base, "origins": ["/a=file:///tmp", "/b=file:///tmp"]}
    with pytest.raises(ConfigError, match="origin_concurrency must be below"):
        CacheConfig.build({"origin_concurrency": 8, "total_concurrency": 8}, two)
    with pytest.raises(ConfigError, match="between 1 and total_concurrency"):
        CacheConfig.build({"origin_concurrency": 9, "total_concurrency": 8}, base)
    assert CacheConfig.build({"origin_concurrency": 8, "total_concurrency": 8}, base)


def _index(tmp_path: Path, size: int = 8 * MiB) -> Index:
    return Index(tmp_path / "idx", size=size, policy=make_policy("lru"))


def _rec(index: Index, key: str, size: int, now: float = 1.0):  # type: ignore[no-untyped-def]
    return index.upsert(
        key,
        size=size,
        mtime=1.0,
        etag=None,
        checksums={},
        block_size=MiB,
        inline_max=64 << 10,
        now=now,
    )


def test_claims_reserve_space_and_commit(tmp_path: Path) -> None:
    index = _index(tmp_path)
    rec = _rec(index, "/ns/a", 3 * MiB)
    claim, _ = index.claim(rec, [0, 1, 2])
    assert claim.blocks == [0, 1, 2] and index.usage() == 3 * MiB
    again, _ = index.claim(rec, [0, 1, 2])
    assert again.blocks == []  # claimed by a live process (us)
    assert index.commit_block(rec, 0, 123)
    assert index.present_blocks(rec, 0, 2) == {0: 123}
    index.release(rec, [1, 2])
    assert index.usage() == MiB
    assert index.get("/ns/a").present == MiB  # type: ignore[union-attr]


def test_claims_of_a_dead_process_are_taken_over(tmp_path: Path) -> None:
    index = _index(tmp_path)
    rec = _rec(index, "/ns/a", 2 * MiB)
    index.close()
    # another process claims block 0 and dies without committing
    code = (
        "import sys; from pathlib import Path;"
        "from stashflow.cache.index import Index; from stashflow.cache.eviction import make_policy;"
        f"i = Index(Path({str(tmp_path / 'idx')!r}), size={8 * MiB}, policy=make_policy('lru'));"
        "r = i.get('/ns/a'); c, _ = i.claim(r, [0]); assert c.blocks == [0]; i.close()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    index = _index(tmp_path)
    assert index.claims_of(rec, [0]) == {0: False}
    claim, _ = index.claim(rec, [0, 1])
    assert claim.blocks == [0, 1]
    assert index.usage() == 2 * MiB  # the dead claim's reservation was released


def test_claim_evicts_others_or_refuses(tmp_path: Path) -> None:
    index = _index(tmp_path, size=4 * MiB)
    a = _rec(index, "/ns/a", 3 * MiB, now=1)
    c, _ = index.claim(a, [0, 1, 2])
    for i in c.blocks:
        index.commit_block(a, i, 0)
    b = _rec(index, "/ns/b", 2 * MiB, now=2)
    claim, evicted = index.claim(b, [0, 1])
    assert evicted.objects == 1 and index.get("/ns/a") is None
    assert index.usage() == 2 * MiB
    index.set_pinned("/ns/b", True)
    for i in claim.blocks:
        index.commit_block(b, i, 0)
    big = _rec(index, "/ns/c", 3 * MiB, now=3)
    with pytest.raises(NoSpace):
        index.claim(big, [0, 1, 2])
    assert index.usage() == 2 * MiB


def test_recover_recounts_usage(tmp_path: Path) -> None:
    index = _index(tmp_path)
    rec = _rec(index, "/ns/a", 3 * MiB)
    index.claim(rec, [0, 1, 2])
    index.commit_block(rec, 1, 0)
    stats = index.recover()
    assert stats == {"claims": 2, "objects": 1, "usage": MiB}
    assert index.usage() == MiB


def test_verified_blocks_are_shared_per_file_version(tmp_path: Path) -> None:
    index = _index(tmp_path)
    rec = _rec(index, "/ns/a", 3 * MiB)
    many = [0, 1, 2, 4095, 4096, 9000]  # rows of 4096 blocks: the first three
    assert index.verified(rec, 100, many) == set()
    index.note_verified(rec, 100, [0, 2, 4096])
    index.note_verified(rec, 100, [1, 9000])
    # the next process to open the index (another worker) sees them
    index.close()
    index = _index(tmp_path)
    assert index.verified(rec, 100, many) == {0, 1, 2, 4096, 9000}
    # any write to the data file changes its mtime: nothing counts as checked
    assert index.verified(rec, 101, many) == set()
    index.note_verified(rec, 101, [2])
    assert index.verified(rec, 101, many) == {2}
    assert index.verified(rec, 100, many) == {4096, 9000}  # rows not rewritten since
    # a new run of the cache checks everything once again
    index.recover()
    assert index.verified(rec, 100, many) == set()
    index.note_verified(rec, 101, [2])
    # a new version of the object forgets the checks of the old one
    new = index.upsert("/ns/a", size=3 * MiB, mtime=2.0, etag=None, checksums={},
                       block_size=MiB, inline_max=0, now=5)
    assert index.verified(rec, 100, many) == set() and index.verified(new, 101, many) == set()


def test_new_origin_version_drops_old_blocks(tmp_path: Path) -> None:
    index = _index(tmp_path)
    rec = _rec(index, "/ns/a", 2 * MiB)
    index.claim(rec, [0, 1])
    index.commit_block(rec, 0, 0)
    new = index.upsert(
        "/ns/a",
        size=2 * MiB,
        mtime=2.0,
        etag=None,
        checksums={},
        block_size=MiB,
        inline_max=0,
        now=5,
    )
    assert new.gen == rec.gen + 1
    assert index.present_blocks(new, 0, 1) == {}
    assert not index.commit_block(rec, 1, 0)  # a late block of the old version is refused
    assert index.usage() == 0


def test_inode_pressure_evicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stashflow.cache.service import CacheService

    cfg = CacheConfig.build(
        {},
        {"directory": str(tmp_path / "c"), "size": "64MiB", "origins": [f"/ns=file://{tmp_path}"]},
    )
    svc = CacheService(cfg)
    for i in range(10):
        rec = _rec(svc.index, f"/ns/{i}", 100, now=i)
        svc.index.claim(rec, [0])
        svc.index.commit_inline(rec, b"x" * 100, 0)

    class Full:
        f_bavail, f_frsize, f_blocks, f_files = 10**9, 4096, 10**9, 1000
        f_favail = 10  # 99% of inodes used

    evicted: list[int] = []
    real_evict = svc.index.evict_objects

    def spy(n: int):  # type: ignore[no-untyped-def]
        evicted.append(n)
        return real_evict(n)

    monkeypatch.setattr(os, "statvfs", lambda p: Full)
    monkeypatch.setattr(svc.index, "evict_objects", spy)
    svc.enforce_limits()
    assert evicted and evicted[0] >= 80  # down to the 90% low watermark
    assert svc.index.count() == 0
    assert svc.disk_state.startswith("inodes exhausted")  # still full: reported, not hidden


def test_an_environment_variable_replaces_a_whole_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stashflow.integration import config as configlib

    toml = tmp_path / "cache.toml"
    toml.write_text(f'[cache]\ndir = "{tmp_path}"\n[cache.origins]\n"/ospool" = "file:///a"\n')
    cfg = CacheConfig.build(configlib.load(toml, "cache"), {})
    assert cfg.origins == {"/ospool": ["file:///a"]}
    monkeypatch.setenv("STASHFLOW_CACHE_ORIGINS", "/cms=file:///b, /cms=file:///c")
    cfg = CacheConfig.build(configlib.load(toml, "cache"), {})
    assert cfg.origins == {"/cms": ["file:///b", "file:///c"]}


def test_one_worker_per_cpu_by_default(tmp_path: Path) -> None:
    import os

    from stashflow.cache.config import MAX_AUTO_WORKERS

    base = {"directory": str(tmp_path), "origins": ["/ns=file:///tmp"]}
    assert CacheConfig.build({}, base).workers == min(os.cpu_count() or 1, MAX_AUTO_WORKERS)
    assert CacheConfig.build({"workers": 3}, base).workers == 3
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        CacheConfig.build({"workers": 0}, base)


def test_accesses_counted_while_a_thread_flushes_are_all_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """touch() on the event loop and flush_accesses() in a worker thread at once: every
    access lands in exactly one flushed batch, and no flush sees its batch change."""
    import threading

    from stashflow.cache.service import CacheService

    cfg = CacheConfig.build(
        {},
        {"directory": str(tmp_path / "c"), "size": "64MiB", "origins": [f"/ns=file://{tmp_path}"]},
    )
    svc = CacheService(cfg)
    recs = [_rec(svc.index, f"/ns/{i}", 100, now=i) for i in range(50)]
    flushed: list[int] = []
    errors: list[BaseException] = []

    def record(batch: dict[bytes, tuple[int, float]]) -> None:
        before = dict(batch)
        total = 0
        for hits, _ in batch.values():  # raises if the loop still writes into it
            total += hits
        assert batch == before
        flushed.append(total)

    monkeypatch.setattr(svc.index, "record_accesses", record)
    done = threading.Event()

    def flusher() -> None:
        try:
            while not done.is_set():
                svc.flush_accesses()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=flusher)
    thread.start()
    n = 200_000
    for i in range(n):
        svc.touch(recs[i % len(recs)])
    done.set()
    thread.join()
    svc.flush_accesses()
    assert errors == []
    assert sum(flushed) == n
