"""Disk quota, eviction, pinning, the admin API and metrics of a real cache process."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest

from stashflow.integration.servers import free_port
from tests.cache.harness import CacheProcess, request

MiB = 1 << 20


@pytest.fixture
def files(tmp_path: Path) -> Path:
    src = tmp_path / "o"
    src.mkdir()
    for i in range(24):
        (src / f"f{i:02d}.bin").write_bytes(bytes([i]) * (2 * MiB))
    return src


def test_eviction_keeps_the_cache_within_its_size(tmp_path: Path, files: Path) -> None:
    with CacheProcess(
        tmp_path / "c", {"/ns": f"file://{files}"}, size="12MiB", extra=["--policy", "lru"]
    ) as c:
        pinned = c.admin("pin", {"path": "/ns/f00.bin"}).json()
        assert pinned == {"path": "/ns/f00.bin", "pinned": True}
        for i in range(24):
            r = c.get(f"/ns/f{i:02d}.bin")
            assert r.body == bytes([i]) * (2 * MiB)
            assert c.admin("stats").json()["usage_bytes"] <= 12 * MiB
        m = c.metrics()
        assert m["stashflow_cache_evictions_total"] > 0
        cached = {o["path"] for o in c.admin("objects").json()["objects"]}
        assert "/ns/f00.bin" in cached  # pinned: never evicted
        assert "/ns/f01.bin" not in cached  # least recently used: gone
        assert c.get("/ns/f00.bin").headers["x-stashflow-cache"] == "hit"


def test_burst_of_misses_never_exceeds_size(tmp_path: Path, files: Path) -> None:
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}, size="8MiB", workers=2) as c:
        peak = 0
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, c.admin("stats").json()["usage_bytes"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        bodies: dict[int, bytes] = {}

        def get(i: int) -> None:
            bodies[i] = request(f"{c.url}/ns/f{i:02d}.bin").body

        threads = [threading.Thread(target=get, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        watcher.join()
        assert all(bodies[i] == bytes([i]) * (2 * MiB) for i in range(24))
        assert peak <= 8 * MiB
        assert c.admin("stats").json()["usage_bytes"] <= 8 * MiB


def test_everything_pinned_streams_from_origin(tmp_path: Path, files: Path) -> None:
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}, size="4MiB") as c:
        for name in ("f00.bin", "f01.bin"):
            c.admin("pin", {"path": f"/ns/{name}"})
            assert c.get(f"/ns/{name}").status == 200
        r = c.get("/ns/f02.bin")
        assert r.status == 200 and r.body == bytes([2]) * (2 * MiB)
        assert r.headers["x-stashflow-cache"] == "bypass"
        assert "without caching" in c.log.read_text()
        assert c.admin("stats").json()["usage_bytes"] <= 4 * MiB
        # unpinning makes room again
        c.admin("unpin", {"path": "/ns/f00.bin"})
        assert c.get("/ns/f03.bin").headers["x-stashflow-cache"] == "miss"
        assert c.get("/ns/f03.bin").headers["x-stashflow-cache"] == "hit"


def test_admin_evict_and_purge(tmp_path: Path, files: Path) -> None:
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}) as c:
        for i in range(4):
            c.get(f"/ns/f{i:02d}.bin")
        assert c.admin("stats").json()["objects"] == 4
        assert c.admin("evict", {"path": "/ns/f00.bin"}).json()["evicted_objects"] == 1
        assert c.get("/ns/f00.bin").headers["x-stashflow-cache"] == "miss"
        c.admin("pin", {"path": "/ns/f01.bin"})
        purged = c.admin("purge", {"prefix": "/ns/"}).json()
        assert purged["evicted_objects"] == 3  # the pinned one stays
        assert [o["path"] for o in c.admin("objects").json()["objects"]] == ["/ns/f01.bin"]
        forced = c.admin("purge", {"prefix": "/ns/", "force": True}).json()
        assert forced["evicted_objects"] == 1
        assert c.admin("stats").json()["usage_bytes"] == 0
        assert not any((tmp_path / "c" / "data").rglob("*.*"))
        assert c.admin("evict", {"nothing": 1}).status == 400
        assert c.admin("pin", {"path": "/ns/missing"}).status == 404
        # a prefix is whole path segments: /ns/f0 is not a prefix of /ns/f00.bin
        c.get("/ns/f00.bin")
        assert c.admin("purge", {"prefix": "/ns/f0"}).json()["evicted_objects"] == 0
        assert c.admin("purge", {"prefix": "/ns/f00.bin"}).json()["evicted_objects"] == 1


def test_admin_token(tmp_path: Path, files: Path) -> None:
    with CacheProcess(
        tmp_path / "c", {"/ns": f"file://{files}"}, extra=["--admin-token", "s3cret"]
    ) as c:
        assert c.admin("stats").status == 403
        assert c.admin("stats", token="wrong").status == 403
        assert c.admin("stats", token="s3cret").status == 200
        assert c.admin("health").status == 200  # health is for load balancers: open


def test_metrics_exposition(tmp_path: Path, files: Path) -> None:
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}, workers=2) as c:
        c.get("/ns/f00.bin")
        c.wait_cached("/ns/f00.bin")  # so that either worker answers the next GET as a hit
        c.get("/ns/f00.bin")
        c.get("/ns/nope")
        m = c.metrics()
        for name in (
            "stashflow_cache_hits_total",
            "stashflow_cache_misses_total",
            "stashflow_cache_bytes_to_clients_total",
            "stashflow_cache_origin_bytes_total",
            "stashflow_cache_evictions_total",
            "stashflow_cache_disk_usage_bytes",
            "stashflow_cache_inode_use_ratio",
            "stashflow_cache_request_seconds_count",
        ):
            assert name in m, name
        assert m["stashflow_cache_hits_total"] >= 1
        assert m["stashflow_cache_misses_total"] >= 1
        assert m["stashflow_cache_bytes_to_clients_total"] >= 4 * MiB
        assert m["stashflow_cache_disk_usage_bytes"] == 2 * MiB
        access = (tmp_path / f"access-{c.port}.log").read_text()
        assert '"path": "/ns/nope"' in access and '"status": 404' in access


def test_corrupted_block_is_detected_and_refetched(tmp_path: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    data = os.urandom(3 * MiB)
    (src / "f.bin").write_bytes(data)
    with CacheProcess(tmp_path / "c", {"/ns": f"file://{src}"}) as c:
        assert c.get("/ns/f.bin").body == data
        assert c.get("/ns/f.bin").body == data  # verified, cached
        # the write-behind may still be writing the blocks of the miss: corrupt the file
        # only once all three are on disk, or its write would repair the damage
        deadline = time.monotonic() + 10
        while c.admin("stats").json()["blocks"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        [datafile] = [p for p in (tmp_path / "c" / "data").rglob("*") if p.is_file()]
        with open(datafile, "r+b") as f:
            f.seek(MiB + 100)
            f.write(b"\xff" * 16)
        r = c.get("/ns/f.bin")
        assert r.body == data
        assert c.metrics()["stashflow_cache_corrupt_blocks_total"] == 1
        assert c.get("/ns/f.bin").headers["x-stashflow-cache"] == "hit"


def test_kill9_during_a_large_miss_then_restart(tmp_path: Path) -> None:
    import subprocess

    src = tmp_path / "o"
    src.mkdir()
    data = os.urandom(96 * MiB)
    (src / "f.bin").write_bytes(data)
    c = CacheProcess(tmp_path / "c", {"/ns": f"file://{src}"}, workers=2)
    c.start()
    try:
        # a slow client keeps the miss in progress
        curl = subprocess.Popen(
            ["curl", "-s", "--limit-rate", "8M", "-o", "/dev/null", c.url + "/ns/f.bin"]
        )
        time.sleep(2)
        stats = c.admin("stats").json()
        assert 0 < stats["usage_bytes"] < len(data)
        c.kill9()
        curl.wait(timeout=30)
        c.start()
        r = c.get("/ns/f.bin")
        assert r.status == 200 and r.body == data
        c.wait_cached("/ns/f.bin")
        assert c.get("/ns/f.bin").headers["x-stashflow-cache"] == "hit"
        assert c.admin("stats").json()["usage_bytes"] == len(data)
    finally:
        c.stop()


def test_dead_worker_is_replaced(tmp_path: Path, files: Path) -> None:
    import signal
    import time

    from tests.cache.harness import _children

    with CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}, workers=2) as c:
        assert c.proc is not None
        workers = _children(c.proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = _children(c.proc.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            time.sleep(0.1)
        for i in range(6):
            assert c.get(f"/ns/f{i:02d}.bin").status == 200
        assert "died" in c.log.read_text()


def test_a_second_cache_on_the_same_directory_or_port_is_refused(
    tmp_path: Path, files: Path
) -> None:
    import subprocess
    import sys

    def second(directory: Path, port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stashflow.integration.cli", "cache", "serve",
             "--listen", f"127.0.0.1:{port}", "--dir", str(directory), "--size", "1GiB",
             "--origin", f"/ns=file://{files}"],
            capture_output=True, text=True, timeout=60,
        )

    with CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}, workers=2) as first:
        assert first.get("/ns/f00.bin").status == 200
        # same directory, another port: it would recover the index under the first one
        refused = second(tmp_path / "c", free_port())
        assert refused.returncode != 0
        assert f"{tmp_path / 'c'} is in use by another cache (pid {first.proc.pid})" in (
            refused.stderr
        )
        # another directory, same port: SO_REUSEPORT must not let it share the port
        refused = second(tmp_path / "d", first.port)
        assert refused.returncode != 0
        assert "cannot listen on" in refused.stderr and "another server holds" in refused.stderr
        # the first cache kept its index and answers every request
        for _ in range(8):
            assert first.get("/ns/f00.bin").headers["x-stashflow-cache"] == "hit"


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, files: Path) -> None:
    import signal

    from tests.cache.harness import _children

    c = CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}, workers=2).start()
    try:
        assert c.proc is not None
        workers = _children(c.proc.pid)
        assert len(workers) == 2
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait()
        deadline = time.monotonic() + 20
        while any(os.path.exists(f"/proc/{pid}") for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            for pid in workers:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        # nothing holds the directory or the port any more: a new cache starts there
        with CacheProcess(tmp_path / "c", {"/ns": f"file://{files}"}, port=c.port) as again:
            assert again.get("/ns/f01.bin").status == 200
    finally:
        c.stop()


def test_watermark_pass_keeps_the_reread_objects_with_lfuda(tmp_path: Path, files: Path) -> None:
    # 20 MiB quota, evict from 80% down to 50%; the default policy (lfuda)
    with CacheProcess(
        tmp_path / "c", {"/ns": f"file://{files}"}, size="20MiB",
        extra=["--high-watermark", "80%", "--low-watermark", "50%"],
    ) as c:
        for _ in range(10):  # the working set: read over and over
            for hot in ("f00", "f01"):
                assert c.get(f"/ns/{hot}.bin").status == 200
        for i in range(2, 9):  # a one-off scan: 14 MiB more, 18 MiB in all (> 16 MiB)
            assert c.get(f"/ns/f{i:02d}.bin").status == 200
        # no fetch needed room (18 < 20 MiB): the once-a-second housekeeping evicts,
        # with this worker's hit counts written first (they are not due for 15 s)
        deadline = time.monotonic() + 10
        while c.admin("stats").json()["usage_bytes"] > 10 * MiB:
            assert time.monotonic() < deadline, c.admin("stats").json()
            time.sleep(0.2)
        cached = {o["path"] for o in c.admin("objects").json()["objects"]}
        assert {"/ns/f00.bin", "/ns/f01.bin"} <= cached
        assert len(cached) <= 5  # 10 MiB of 2 MiB objects
        assert c.metrics()["stashflow_cache_evictions_total"] >= 4


def test_an_object_being_read_is_not_evicted(tmp_path: Path, files: Path) -> None:
    import socket

    big = os.urandom(10 * MiB)
    (files / "big.bin").write_bytes(big)
    with CacheProcess(
        tmp_path / "c", {"/ns": f"file://{files}"}, size="16MiB", extra=["--policy", "lru"]
    ) as c:
        assert c.get("/ns/big.bin").body == big  # cached, and the least recently used
        with socket.create_connection(("127.0.0.1", c.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            s.sendall(b"GET /ns/big.bin HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
            got = s.recv(65536)  # then stall: the cache stays mid-response
            for i in range(1, 5):  # 8 MiB of misses on a 16 MiB cache holding 10 MiB
                assert c.get(f"/ns/f{i:02d}.bin").status == 200
                assert c.admin("stats").json()["usage_bytes"] <= 16 * MiB
            while chunk := s.recv(1 << 20):
                got += chunk
        assert got.split(b"\r\n\r\n", 1)[1] == big
        cached = {o["path"]: o for o in c.admin("objects").json()["objects"]}
        # the open object was kept although least recently used; others made room
        assert cached["/ns/big.bin"]["cached_bytes"] == 10 * MiB
        assert c.metrics()["stashflow_cache_evictions_total"] >= 1
