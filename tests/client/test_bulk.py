"""The libcurl first pass over many downloads (cache/client/bulk.py), against real cache
processes: what it fetches is identical and verified, and everything it cannot do
cleanly is handed back with nothing left behind."""

from __future__ import annotations

import base64
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stashflow.cache.client import bulk
from stashflow.cache.client.errors import EXIT_OK
from stashflow.cache.client.transfer import PART_SUFFIX, Options, Result
from tests.cache.harness import CacheProcess
from tests.client.conftest import access_log, dead_url, http_server, stashcp


def _run(jobs: list[bulk.Job], opts: Options | None = None) -> tuple[dict[int, Result], list[int]]:
    results: dict[int, Result] = {}

    def done(index: int, result: Result) -> None:
        results[index] = result

    back = bulk.fetch(jobs, opts or Options(), done, threads=2)
    return results, back


def test_pycurl_is_installed() -> None:
    assert bulk.usable(Options())
    assert not bulk.usable(Options(rate_limit=1e6))  # only the transfer engine limits


def test_many_objects_arrive_identical_and_verified(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path
) -> None:
    names = sorted(p.name for p in (origin_dir / "many").iterdir())
    jobs = [
        bulk.Job(f"stash:///ns/many/{n}", f"{cache.url}/ns/many/{n}", tmp_path / n) for n in names
    ]
    results, back = _run(jobs)
    assert back == []
    assert sorted(results) == list(range(len(names)))
    for i, n in enumerate(names):
        assert (tmp_path / n).read_bytes() == (origin_dir / "many" / n).read_bytes()
        r = results[i]
        assert r.ok and r.size == (origin_dir / "many" / n).stat().st_size
        assert r.checksum is not None and r.checksum.startswith("crc32c:")
        assert r.servers == [cache.url] and r.source == f"stash:///ns/many/{n}"
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no part files


def test_what_it_cannot_do_is_handed_back_untouched(
    cache: CacheProcess, origin_dir: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed.bin"
    part = resumed.with_name(f".{resumed.name}{PART_SUFFIX}")
    part.write_bytes(b"kept from an interrupted run")
    part.with_name(part.name + ".json").write_text("{}")
    jobs = [
        bulk.Job("/ns/missing", f"{cache.url}/ns/missing", tmp_path / "missing"),  # 404
        bulk.Job("/ns/small.txt", f"{dead_url()}/ns/small.txt", tmp_path / "dead.txt"),
        bulk.Job("/ns/big.bin", f"{cache.url}/ns/big.bin", tmp_path / "big.bin"),  # large
        bulk.Job("/ns/small.txt", f"{cache.url}/ns/small.txt", resumed),
        bulk.Job("/ns/small.txt", f"{cache.url}/ns/small.txt", tmp_path / "no-dir" / "x"),
        bulk.Job("/ns/small.txt", f"{cache.url}/ns/small.txt", tmp_path / "ok.txt"),
    ]
    results, back = _run(jobs, Options(chunk_size=1 << 20))
    assert back == [0, 1, 2, 3, 4]
    assert list(results) == [5]
    assert (tmp_path / "ok.txt").read_bytes() == b"hello stashflow\n"
    # nothing under a destination name, no partial, the resume record left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ok.txt", part.name, part.name + ".json"]
    )
    assert part.read_bytes() == b"kept from an interrupted run"


class _WrongDigest(http.server.BaseHTTPRequestHandler):
    body = b"the served bytes\n"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        wrong = base64.b64encode(b"\0\0\0\0").decode()
        self.send_header("Digest", f"crc32c={wrong}")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def wrong_digest_server() -> Iterator[str]:
    with http_server(_WrongDigest) as url:
        yield url


def test_a_checksum_mismatch_is_handed_back(wrong_digest_server: str, tmp_path: Path) -> None:
    jobs = [bulk.Job("/ns/x", f"{wrong_digest_server}/ns/x", tmp_path / "x")]
    results, back = _run(jobs)
    assert back == [0] and results == {}
    assert list(tmp_path.iterdir()) == []
    # without verification the same bytes are accepted
    results, back = _run(jobs, Options(checksum="none"))
    assert back == [] and (tmp_path / "x").read_bytes() == _WrongDigest.body


def test_stashcp_finishes_from_the_next_cache_what_the_first_pass_left(
    caches: tuple[CacheProcess, CacheProcess], origin_dir: Path, tmp_path: Path
) -> None:
    """The first cache is dead: the first pass hands every object back and the
    transfer engine fails over to the second cache, as without it."""
    a = caches[1]
    names = sorted(p.name for p in (origin_dir / "many").iterdir())[:12]
    sources = [f"/ns/many/{n}" for n in names]
    r = stashcp("--cache", f"{dead_url()},{a.url}", "--json", *sources, str(tmp_path))
    assert r.code == EXIT_OK, r.stderr
    transfers = r.json()["transfers"]
    assert [t["servers"] for t in transfers] == [[a.url]] * len(names)
    for n in names:
        assert (tmp_path / n).read_bytes() == (origin_dir / "many" / n).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_stashcp_many_files_take_one_get_each(
    caches: tuple[CacheProcess, CacheProcess], origin_dir: Path, tmp_path: Path
) -> None:
    a = caches[1]
    names = sorted(p.name for p in (origin_dir / "many").iterdir())[12:24]
    before = len(access_log(a))
    r = stashcp("--cache", a.url, *[f"/ns/many/{n}" for n in names], str(tmp_path))
    assert r.code == EXIT_OK, r.stderr
    requests = access_log(a)[before:]
    assert sorted(str(e.get("path")) for e in requests) == sorted(f"/ns/many/{n}" for n in names)
    assert {e.get("method") for e in requests} == {"GET"}
    assert {e.get("range") for e in requests} == {None}  # the transfer engine's are ranged


class _Stalling(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        time.sleep(20)

    def log_message(self, *args: object) -> None:
        pass


def test_stop_ends_the_pass_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    """What Ctrl-C does through `first_pass`: transfers under way are dropped."""
    with http_server(_Stalling) as url:
        jobs = [bulk.Job(f"/ns/{i}", f"{url}/ns/{i}", tmp_path / str(i)) for i in range(40)]
        stop = threading.Event()
        back: list[int] = []
        worker = threading.Thread(
            target=lambda: back.extend(bulk.fetch(jobs, Options(), lambda *_: None, 2, stop))
        )
        worker.start()
        deadline = time.monotonic() + 10
        while len(list(tmp_path.iterdir())) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)  # both threads' transfers are under way
        assert len(list(tmp_path.iterdir())) == 16  # the part files of 2 x 8 transfers
        stop.set()
        worker.join(timeout=5)
        assert not worker.is_alive()
    assert sorted(back) == list(range(16))  # the others were never started
    assert list(tmp_path.iterdir()) == []
