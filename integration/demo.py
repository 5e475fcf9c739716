"""`make demo`: a short end-to-end run on this machine with embedded defaults.

Starts a local federation (an origin exporting a directory, a director, a cache that
registers with it), then does what a job does: `stashcp` a file through the director
twice (a miss that pulls it from the origin, then a hit from the cache's disk),
checks the bytes, reads a byte range over plain HTTP, shows the cache's statistics and
stops everything cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from stashflow.integration.federation import Federation

MiB = 1 << 20


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        return r.read(), dict(r.headers.items())


def _metric(cache: str, name: str) -> float:
    text = _get(f"{cache}/metrics")[0].decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="stashflow-demo-") as tmp:
        fed = Federation(Path(tmp), namespace="/public", caches=1)
        print("[demo] starting a local federation: origin, director, one cache (2 workers)")
        with fed.running():
            cache = fed.cache_urls[0]
            print(f"[demo] origin {fed.origin_url}, director {fed.director_url}, cache {cache}")
            data = os.urandom(64 * MiB)
            (fed.data_dir / "dataset.bin").write_bytes(data)
            want = hashlib.sha256(data).hexdigest()
            print("[demo] the origin exports /public/dataset.bin (64 MiB)")
            for attempt in ("first", "second"):
                out = Path(tmp) / f"{attempt}.bin"
                misses = _metric(cache, "stashflow_cache_misses_total")
                started = time.perf_counter()
                run = subprocess.run(
                    [sys.executable, "-m", "stashflow.cache.client.stashcp", "--json",
                     "--director", fed.director_url, "stash:///public/dataset.bin", str(out)],
                    capture_output=True, text=True)
                seconds = time.perf_counter() - started
                if run.returncode != 0:
                    raise SystemExit(f"[demo] FAILED: stashcp: {run.stderr.strip()}")
                ok = hashlib.sha256(out.read_bytes()).hexdigest() == want
                missed = _metric(cache, "stashflow_cache_misses_total") > misses
                served = "miss" if missed else "hit"
                server = json.loads(run.stdout)["transfers"][0]["servers"]
                print(f"[demo] {attempt} stashcp stash:///public/dataset.bin: cache {served}, "
                      f"64 MiB in {seconds:.2f}s from {server}, bytes "
                      f"{'identical' if ok else 'DIFFERENT'}")
                if not ok:
                    raise SystemExit("[demo] FAILED: stashcp returned different bytes")
            part, headers = _get(f"{cache}/public/dataset.bin",
                                 {"Range": "bytes=1000000-1000015", "Want-Digest": "sha-256"})
            print(f"[demo] HTTP range bytes=1000000-1000015 from the cache: "
                  f"{'correct' if part == data[1000000:1000016] else 'WRONG'}, "
                  f"Digest {headers.get('Digest', '-')[:30]}...")
            stats = json.loads(_get(f"{cache}/.stashflow/stats")[0])
            shown = {k: stats[k] for k in ("objects", "blocks", "usage_bytes", "policy",
                                           "disk_state")}
            print(f"[demo] cache stats: {json.dumps(shown)}")
        print("[demo] federation stopped. Done.")
        return 0


if __name__ == "__main__":
    sys.exit(main())
