"""A namespace with several origins (cache/origins.py): a real cache goes on to the next
origin when one is unavailable, whether the origins are configured or learned from a
real director, and never hides an answer about the object itself."""

from __future__ import annotations

import time
from pathlib import Path

from tests.cache.harness import CacheProcess
from tests.director.helpers import DirectorProcess

DEAD = "http://127.0.0.1:9/ns"  # nothing listens on the discard port


def _files(tmp_path: Path) -> Path:
    src = tmp_path / "o"
    src.mkdir()
    (src / "big.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB: blocks, not inline
    (src / "small.txt").write_bytes(b"small\n")
    return src


def test_configured_origins_are_tried_in_turn(tmp_path: Path) -> None:
    src = _files(tmp_path)
    flags = ["--origin", f"/ns={DEAD}", "--origin", f"/ns=file://{src}"]
    with CacheProcess(tmp_path / "c", {}, extra=flags) as c:
        r = c.get("/ns/big.bin")
        assert r.status == 200 and r.body == (src / "big.bin").read_bytes()
        assert c.get("/ns/small.txt").body == b"small\n"
        # what the object is, the working origin says: a 404 is not hidden by another
        missing = c.get("/ns/nothing.bin")
        assert missing.status == 404
        log = c.log.read_text()
        assert f"origin {DEAD} unavailable" in log and "using it first from now on" in log
        # the origin that answered stays first: one warning about the dead one
        assert log.count(f"origin {DEAD} unavailable") == 1
    # when every origin is unavailable, the error names them all
    with CacheProcess(tmp_path / "d", {}, extra=["--origin", f"/ns={DEAD}",
                                                  "--origin", "/ns=http://127.0.0.1:7/ns"],
                      env={"STASHFLOW_CACHE_ORIGIN_TIMEOUT": "3s"}) as c:
        r = c.get("/ns/big.bin")
        assert r.status == 502 and r.json()["origin"] == f"{DEAD}, http://127.0.0.1:7/ns"


def test_origins_learned_from_the_director_are_tried_in_turn(tmp_path: Path) -> None:
    src = _files(tmp_path)
    director = DirectorProcess(
        tmp_path / "director",
        args=["--namespace", f"/ns={DEAD},file://{src}", "--heartbeat-interval", "1s"],
    )
    with director, CacheProcess(tmp_path / "c", {}, extra=["--director", director.url]) as c:
        deadline = time.monotonic() + 20
        while (r := c.get("/ns/big.bin")).status == 404:  # until the namespace is learned
            assert time.monotonic() < deadline, r.body
            time.sleep(0.2)
        assert r.status == 200 and r.body == (src / "big.bin").read_bytes()
