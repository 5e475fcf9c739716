"""Dead, slow, hanging and lying origins: the cache answers clearly, in bounded time,
and never caches or serves bad data. The origin is a real HTTP server that misbehaves
on purpose (origin_app.py)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from stashflow.integration.servers import free_port
from tests.cache.harness import CacheProcess, MisbehavingOrigin, request

MiB = 1 << 20


@pytest.fixture
def origin(tmp_path: Path):  # type: ignore[no-untyped-def]
    src = tmp_path / "o"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(3 * MiB))
    (src / "small").write_bytes(b"0123456789" * 100)
    for i in range(6):  # distinct objects: requests for one object share one fetch
        (src / f"h{i}.bin").write_bytes(os.urandom(2 * MiB))
    with MisbehavingOrigin(src) as o:
        yield o


def _cache(tmp_path: Path, origin: MisbehavingOrigin, **env: str) -> CacheProcess:
    return CacheProcess(
        tmp_path / "c",
        {
            f"/{mode}": f"{origin.url}/{mode}"
            for mode in ("ok", "truncate", "slow", "hang", "hanghead")
        },
        env={"STASHFLOW_CACHE_ORIGIN_TIMEOUT": "2s", **env},
    )


def test_http_origin_works(tmp_path: Path, origin: MisbehavingOrigin) -> None:
    data = (origin.directory / "f.bin").read_bytes()
    with _cache(tmp_path, origin) as c:
        assert c.get("/ok/f.bin").body == data
        assert c.get("/ok/f.bin").headers["x-stashflow-cache"] == "hit"
        assert c.get("/ok/f.bin", {"Range": "bytes=10-19"}).body == data[10:20]


def test_origin_down_is_502_naming_the_origin(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/data"
    with CacheProcess(tmp_path / "c", {"/ns": dead}) as c:
        started = time.monotonic()
        r = c.get("/ns/file")
        assert r.status == 502
        body = r.json()
        assert body["origin"] == dead and dead in body["error"]
        assert time.monotonic() - started < 30


def test_hanging_origin_is_504_after_bounded_time(
    tmp_path: Path, origin: MisbehavingOrigin
) -> None:
    with _cache(tmp_path, origin) as c:
        started = time.monotonic()
        r = c.get("/hanghead/f.bin")
        assert r.status == 504
        assert "did not answer within 2s" in r.json()["error"]
        assert time.monotonic() - started < 10


def test_truncated_origin_cuts_the_response_and_caches_nothing(
    tmp_path: Path, origin: MisbehavingOrigin
) -> None:
    with _cache(tmp_path, origin) as c:
        out = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                str(tmp_path / "out"),
                "-w",
                "%{http_code} %{size_download}",
                c.url + "/truncate/f.bin",
            ],
            capture_output=True,
            text=True,
        )
        # either a clean 502 before any byte, or a body cut short: never 3 MiB of junk
        status, size = out.stdout.split()
        if status == "200":
            assert out.returncode == 18 and int(size) < 3 * MiB  # curl: partial file
        else:
            assert status == "502"
        # small object: the whole thing is fetched before answering -> clean 502
        small = c.get("/truncate/small")
        assert small.status == 502 and "/truncate/small" in small.json()["error"]
        # nothing of a cut transfer stays cached, not even its first block, which
        # arrived whole (the fetch drops it just after the client's response is cut)
        deadline = time.monotonic() + 10
        while True:
            cut = [o for o in c.admin("objects").json()["objects"]
                   if o["path"].startswith("/truncate/")]
            if all(o["cached_bytes"] == 0 for o in cut) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert cut and all(o["cached_bytes"] == 0 and not o["complete"] for o in cut), cut
        assert c.admin("stats").json()["usage_bytes"] == 0


def test_stalled_origin_transfer_is_abandoned(tmp_path: Path, origin: MisbehavingOrigin) -> None:
    with _cache(
        tmp_path, origin, STASHFLOW_CACHE_STALL_WINDOW="2s", STASHFLOW_CACHE_MIN_RATE="64KiB"
    ) as c:
        started = time.monotonic()
        inflight: list[float] = []

        def watch() -> None:  # the fetch shows in the gauge while it runs
            while not inflight or inflight[-1] == 0:
                inflight.append(c.metrics().get("stashflow_cache_inflight_fetches", 0.0))
                if time.monotonic() - started > 10:
                    return
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        r = c.get("/slow/f.bin")
        watcher.join()
        assert r.status == 504 and r.json()["cause"] == "stalled"
        assert "below the minimum" in r.json()["error"]
        assert time.monotonic() - started < 15
        assert inflight[-1] >= 1
        m = c.metrics()
        assert m["stashflow_cache_inflight_fetches"] == 0
        assert m["stashflow_cache_origin_errors_total"] >= 1
        assert any(k.startswith("stashflow_cache_origin_errors_total{") and "Stalled" in k
                   for k in m)


def test_one_stalled_origin_does_not_block_others(
    tmp_path: Path, origin: MisbehavingOrigin
) -> None:
    with _cache(
        tmp_path,
        origin,
        STASHFLOW_CACHE_ORIGIN_CONCURRENCY="2",
        STASHFLOW_CACHE_QUEUE_LIMIT="2",
        STASHFLOW_CACHE_STALL_WINDOW="8s",
        STASHFLOW_CACHE_ORIGIN_TIMEOUT="8s",
    ) as c:
        results: list[int] = []

        def hang(i: int) -> None:
            results.append(request(f"{c.url}/hang/h{i}.bin", timeout=60).status)

        threads = [threading.Thread(target=hang, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(2)
        # the other origin is served at once while the hanging one holds its slots
        started = time.monotonic()
        assert c.get("/ok/small").status == 200
        assert c.get("/ok/f.bin").status == 200
        assert time.monotonic() - started < 5
        for t in threads:
            t.join()
        assert 429 in results  # beyond the queue: refused at once, with Retry-After
        assert all(s in (429, 504) for s in results)


def test_overload_answer_has_retry_after(tmp_path: Path, origin: MisbehavingOrigin) -> None:
    with _cache(
        tmp_path,
        origin,
        STASHFLOW_CACHE_ORIGIN_CONCURRENCY="1",
        STASHFLOW_CACHE_QUEUE_LIMIT="1",
        STASHFLOW_CACHE_STALL_WINDOW="4s",
    ) as c:
        seen: list[tuple[int, str | None]] = []

        def hang(i: int) -> None:
            r = request(f"{c.url}/hang/h{i}.bin", timeout=60)
            seen.append((r.status, r.headers.get("retry-after")))

        threads = [threading.Thread(target=hang, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join()
        refused = [h for s, h in seen if s == 429]
        assert refused and all(h is not None and int(h) > 0 for h in refused)


def test_pinning_through_a_failing_origin_says_why(
    tmp_path: Path, origin: MisbehavingOrigin
) -> None:
    with _cache(tmp_path, origin) as c:
        r = c.admin("pin", {"path": "/hanghead/f.bin"})
        assert r.status == 504 and r.json()["cause"] == "timeout"
        assert r.json()["origin"].endswith("/hanghead") and "within 2s" in r.json()["error"]
        r = c.admin("pin", {"path": "/ok/nothing-here"})
        assert r.status == 404 and "/ok/nothing-here" in r.json()["error"]
    dead = CacheProcess(tmp_path / "d", {"/ns": "http://127.0.0.1:1/ns"},
                        env={"STASHFLOW_CACHE_ORIGIN_TIMEOUT": "2s"})
    with dead as c:
        r = c.admin("pin", {"path": "/ns/f.bin"})
        assert r.status == 502 and r.json()["origin"] == "http://127.0.0.1:1/ns"
        assert r.json()["cause"]
    with _cache(tmp_path, origin) as c:  # a GET that times out says so in `cause` too
        r = c.get("/hanghead/f.bin")
        assert r.status == 504 and r.json()["cause"] == "timeout"
