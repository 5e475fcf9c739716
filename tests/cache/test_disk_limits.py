"""A cache whose filesystem really fills up (bytes or inodes): a small tmpfs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.cache.harness import CacheProcess

MiB = 1 << 20


def test_full_disk_streams_from_origin(tmp_path: Path, small_fs: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    blobs = {f"f{i}.bin": os.urandom(5 * MiB) for i in range(5)}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    # the quota says 1 GiB but the filesystem holds 12 MiB
    with CacheProcess(small_fs / "c", {"/ns": f"file://{src}"}, size="1GiB") as c:
        for name, data in blobs.items():
            r = c.get(f"/ns/{name}")
            assert r.status == 200 and r.body == data, name
        for name, data in blobs.items():  # and again, whatever is cached or not
            assert c.get(f"/ns/{name}").body == data
        log = c.log.read_text()
        assert "disk full" in log or "cache filesystem full" in log
        # the cache makes room on the filesystem by evicting, and caches again
        time.sleep(6)  # past the back-off after ENOSPC
        c.get("/ns/f4.bin")
        assert c.get("/ns/f4.bin").headers["x-stashflow-cache"] == "hit"
        assert c.get("/ns/f0.bin", {"Range": "bytes=10-19"}).body == blobs["f0.bin"][10:20]


@pytest.mark.parametrize("small_fs", ["size=64m,nr_inodes=400"], indirect=True)
def test_inode_exhaustion_is_watched(tmp_path: Path, small_fs: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    for i in range(600):
        (src / f"s{i}.bin").write_bytes(bytes([i % 256]) * (80 << 10))  # not inline: one file each
    with CacheProcess(small_fs / "c", {"/ns": f"file://{src}"}, size="60MiB",
                      extra=["--inline-max", "4KiB"]) as c:
        for i in range(600):
            r = c.get(f"/ns/s{i}.bin")
            assert r.status == 200 and r.body == bytes([i % 256]) * (80 << 10), i
        stats = c.admin("stats").json()
        assert stats["inodes_total"] == 400
        assert c.metrics()["stashflow_cache_evictions_total"] > 0
        data_files = [p for p in (small_fs / "c" / "data").rglob("*") if p.is_file()]
        assert 0 < len(data_files) < 400
        time.sleep(6)  # housekeeping has evicted, and the back-off after ENOSPC is over
        assert c.admin("stats").json()["inode_use_ratio"] <= 0.95
        c.get("/ns/s599.bin")
        assert c.get("/ns/s599.bin").headers["x-stashflow-cache"] == "hit"
