"""`make demo`: a short end-to-end run on this machine with embedded defaults.

Starts a cache in front of a local directory origin, fetches a file twice (a miss that
pulls it from the origin, then a hit from the cache's disk), checks the bytes and the
checksum, shows the cache's statistics and stops everything cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from stashflow.integration.servers import free_port, wait_for_port

MiB = 1 << 20


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str], float]:
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        body = r.read()
        return body, dict(r.headers.items()), time.perf_counter() - started


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="stashflow-demo-") as tmp:
        root = Path(tmp)
        origin = root / "origin" / "public"
        origin.mkdir(parents=True)
        data = os.urandom(64 * MiB)
        (origin / "dataset.bin").write_bytes(data)
        port = free_port()
        print(f"[demo] origin: a local directory with a 64 MiB file ({origin})")
        print(f"[demo] starting: stashflow cache serve --listen 127.0.0.1:{port} "
              f"--origin /public=file://{origin} --workers 2")
        log = open(root / "cache.log", "wb")
        cache = subprocess.Popen(
            [sys.executable, "-m", "stashflow.integration.cli", "cache", "serve",
             "--listen", f"127.0.0.1:{port}", "--dir", str(root / "cache"), "--size", "1GiB",
             "--origin", f"/public=file://{origin}", "--workers", "2", "--access-log",
             str(root / "access.log")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=30)
            url = f"http://127.0.0.1:{port}/public/dataset.bin"
            for attempt in ("first", "second"):
                # the second GET also asks for the checksum, computed once from the cache
                want = {"Want-Digest": "sha-256"} if attempt == "second" else {}
                body, headers, seconds = _get(url, want)
                ok = hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
                print(f"[demo] {attempt} GET {url}: {headers['X-Stashflow-Cache']:<4} "
                      f"{len(body) / MiB:.0f} MiB in {seconds:.2f}s "
                      f"({len(body) / MiB / seconds:.0f} MiB/s), bytes "
                      f"{'identical' if ok else 'DIFFERENT'} {headers.get('Digest', '')[:24]}")
                if not ok:
                    raise SystemExit("[demo] FAILED: the cache returned different bytes")
            part, headers, _ = _get(url, {"Range": "bytes=1000000-1000015"})
            print(f"[demo] range request bytes=1000000-1000015: {headers['Content-Range']}, "
                  f"{'correct' if part == data[1000000:1000016] else 'WRONG'}")
            stats = json.loads(_get(f"http://127.0.0.1:{port}/.stashflow/stats")[0])
            shown = {k: stats[k] for k in ("objects", "blocks", "usage_bytes", "size_bytes",
                                           "policy", "disk_state")}
            print(f"[demo] cache stats: {json.dumps(shown)}")
            metrics = _get(f"http://127.0.0.1:{port}/metrics")[0].decode()
            for line in metrics.splitlines():
                if line.startswith(("stashflow_cache_hits_total", "stashflow_cache_misses_total",
                                    "stashflow_cache_origin_bytes_total{")):
                    print(f"[demo] metric {line}")
        finally:
            cache.send_signal(signal.SIGTERM)
            try:
                cache.wait(timeout=20)
            except subprocess.TimeoutExpired:
                cache.kill()
            log.close()
        print(f"[demo] cache stopped (exit {cache.returncode}). Done.")
        return 0 if cache.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
