"""Benchmarks 1-3 of the cache: serving hits, the miss path and request coalescing,
side by side with nginx and XCache, in one run, on the same files, over loopback.

1. Hits. The same files are served by
   - nginx from disk (`worker_processes 2`, sendfile on, access_log off): the ceiling;
   - our cache (`stashflow cache serve --workers 2`), warmed by one pass over the files;
   - XCache (XRootD proxy file cache, HTTP through XrdHttp) in front of an XRootD origin
     exporting the same directory, warmed the same way (its data on its disk).
   Large: `--repeats` sequential `curl -o /dev/null` GETs of one `--large-size` (1 GiB)
   file per server, interleaved round by round; the median MB/s is reported.
   Small: `wrk -t2 -c64 -d10s` over `--small-count` distinct `--small-size` (4 KiB) files
   (a Lua script walks the list round-robin from a random start per thread); the median
   requests/s of `--rounds` runs per server, interleaved.
2. Miss path: the large file fetched with curl directly from the origin (nginx, HTTP)
   and through a cold cache in front of that origin (a fresh cache directory each time;
   the cache's start-up is not timed); the ratio of the median times.
3. Coalescing: `--clients` (50) concurrent curl GETs of one cold `--coalesce-size`
   (200 MiB) object through a fresh cache with 2 workers; bytes the cache read from the
   origin (its metric stashflow_cache_origin_bytes_total, demand + prefetch) divided by
   the object size, cross-checked with the body bytes nginx logged for that object.

The origin files live in the page cache during the run (the machine has the RAM), so
"from disk" means from the filesystem through the page cache, for every server alike.
All servers are stopped at exit, including on errors, Ctrl-C and SIGTERM.

Run:   .venv/bin/python benchmarks/cache_serving.py --output-md docs/benchmarks.md
Quick: .venv/bin/python benchmarks/cache_serving.py --quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_common import (
    BenchmarkError,
    Cache,
    MiB,
    Nginx,
    connections_per_process,
    curl_get,
    curl_many,
    machine,
    run_wrk,
    terminate_on_sigterm,
    tool_versions,
    update_markdown,
)

from stashflow.integration.config import parse_size

SECTION = "## Cache serving (benchmarks 1-3)"
NS = "/data"  # the namespace of our cache = the export of XRootD = a directory under nginx's root


@dataclass
class Server:
    name: str
    url: str
    large_mbps: list[float] = field(default_factory=list)
    small_rps: list[float] = field(default_factory=list)
    small_notes: list[str] = field(default_factory=list)
    spread: list[str] = field(default_factory=list)  # wrk connections per worker, per round
    skipped: str | None = None

    @property
    def large(self) -> float | None:
        return statistics.median(self.large_mbps) if self.large_mbps else None

    @property
    def small(self) -> float | None:
        return statistics.median(self.small_rps) if self.small_rps else None


@dataclass
class Results:
    servers: dict[str, Server] = field(default_factory=dict)
    miss_direct: list[float] = field(default_factory=list)
    miss_cache: list[float] = field(default_factory=list)
    coal_metric_bytes: float = 0.0
    coal_nginx_bytes: int = 0
    coal_size: int = 0
    coal_seconds: float = 0.0
    coal_ok: int = 0
    coal_clients: int = 0
    large_size: int = 0
    notes: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- data ----------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def make_files(root: Path, args: argparse.Namespace) -> list[str]:
    """Create the files under root/data; return the URL paths of the small ones."""
    data = root / NS.strip("/")
    write_random(data / "large.bin", args.large_size)
    write_random(data / "coalesce.bin", args.coalesce_size)
    small_dir = data / "small"
    small_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.small_count):
        name = f"{i // 1000:03d}/f{i:06d}"
        p = small_dir / name
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(os.urandom(args.small_size))
        paths.append(f"{NS}/small/{name}")
    os.sync()
    return paths


def warm_small(base_url: str, paths: Sequence[str], size: int, threads: int = 16) -> None:
    """GET every small file once (keep-alive, `threads` connections); check each body."""
    host, port = base_url.removeprefix("http://").split(":")
    local = threading.local()
    bad: list[str] = []

    def get(path: str) -> None:
        conn = getattr(local, "conn", None)
        for _attempt in range(3):
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or len(body) != size:
                    bad.append(f"{path}: {resp.status}, {len(body)} bytes")
                return
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = local.conn = None
        bad.append(f"{path}: connection failed")

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, paths))
    if bad:
        raise BenchmarkError(f"warming {base_url} failed for {len(bad)} files, e.g. {bad[:3]}")


def warm_large(url: str, size: int) -> None:
    got = curl_get(url)
    if got.status != 200 or got.size != size:
        raise BenchmarkError(f"warming {url}: HTTP {got.status}, {got.size} of {size} bytes")


def wait_xcache_complete(cache_dir: Path, rel: str, size: int, timeout: float = 60) -> None:
    """XCache writes RAM blocks to its disk asynchronously: wait until the data file
    holds the whole object."""
    path = cache_dir / rel.lstrip("/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_blocks * 512 >= size:
                return
        time.sleep(0.2)
    raise BenchmarkError(f"XCache did not store all of {rel} within {timeout:.0f}s")


# -- the benchmarks --------------------------------------------------------------------


def bench_hits(
    servers: list[Server], args: argparse.Namespace, small_paths: list[str], work: Path
) -> None:
    active = [s for s in servers if s.skipped is None]
    log(f"\n[1] large hits: {args.repeats} GETs of {args.large_size / MiB:.0f} MiB per server")
    for r in range(args.repeats):
        for s in active:
            got = curl_get(f"{s.url}{NS}/large.bin")
            if got.status != 200 or got.size != args.large_size:
                raise BenchmarkError(f"{s.name}: HTTP {got.status}, {got.size} bytes")
            s.large_mbps.append(got.mb_per_s)
            log(f"    round {r + 1} {s.name:8s} {got.mb_per_s:8.0f} MB/s")
    paths_file = work / "small-paths.txt"
    paths_file.write_text("".join(f"{p}\n" for p in small_paths))
    script = work / "paths.lua"
    log(
        f"\n[1] small hits: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s over "
        f"{len(small_paths)} files of {args.small_size} B, {args.rounds} round(s)"
    )
    for r in range(args.rounds):
        for s in active:
            port = int(s.url.rsplit(":", 1)[1])
            res = run_wrk(
                s.url,
                paths_file,
                script,
                threads=args.threads,
                connections=args.connections,
                duration=args.duration,
                probe=(lambda p=port: connections_per_process(p))
                if s.name == "stashflow"
                else None,
            )
            if res.probe is not None:
                s.spread.append(res.probe)
            if res.errors or res.non_2xx:
                s.small_notes.append(f"{res.errors} socket errors, {res.non_2xx} non-2xx")
            s.small_rps.append(res.requests_per_s)
            spread = f", connections per worker {res.probe}" if res.probe else ""
            log(
                f"    round {r + 1} {s.name:8s} {res.requests_per_s:10.0f} req/s "
                f"(latency avg {res.latency_avg}, errors {res.errors}, non-2xx {res.non_2xx}"
                f"{spread})"
            )


def bench_miss(nginx: Nginx, args: argparse.Namespace, work: Path, res: Results) -> None:
    log(
        f"\n[2] miss path: {args.large_size / MiB:.0f} MiB direct from the origin "
        "vs through a cold cache"
    )
    direct_url = f"{nginx.origin_url}{NS}/large.bin"
    for r in range(args.miss_repeats):
        d = curl_get(direct_url)
        if d.size != args.large_size:
            raise BenchmarkError(f"origin sent {d.size} bytes")
        res.miss_direct.append(d.seconds)
        cdir = work / f"cold-{r}"
        with Cache(cdir, {NS: f"{nginx.origin_url}{NS}"}, workers=args.workers) as cache:
            c = curl_get(f"{cache.url}{NS}/large.bin")
        shutil.rmtree(cdir, ignore_errors=True)
        if c.status != 200 or c.size != args.large_size:
            raise BenchmarkError(f"cold cache: HTTP {c.status}, {c.size} bytes")
        res.miss_cache.append(c.seconds)
        log(
            f"    round {r + 1}: direct {d.seconds:6.2f} s ({d.mb_per_s:5.0f} MB/s), "
            f"cold cache {c.seconds:6.2f} s ({c.mb_per_s:5.0f} MB/s)"
        )


def bench_coalescing(nginx: Nginx, args: argparse.Namespace, work: Path, res: Results) -> None:
    log(
        f"\n[3] coalescing: {args.clients} concurrent clients on one cold "
        f"{args.coalesce_size / MiB:.0f} MiB object, {args.workers} workers"
    )
    rel = f"{NS}/coalesce.bin"
    before = nginx.origin_bytes(rel)
    cdir = work / "coalesce"
    with Cache(cdir, {NS: f"{nginx.origin_url}{NS}"}, workers=args.workers) as cache:
        t0 = time.perf_counter()
        got = curl_many(f"{cache.url}{rel}", args.clients)
        res.coal_seconds = time.perf_counter() - t0
        metrics = cache.metrics()
    shutil.rmtree(cdir, ignore_errors=True)
    time.sleep(0.2)  # nginx writes its log line when the response ends
    res.coal_size = args.coalesce_size
    res.coal_clients = args.clients
    res.coal_ok = sum(1 for g in got if g.status == 200 and g.size == args.coalesce_size)
    res.coal_metric_bytes = metrics.get("stashflow_cache_origin_bytes_total", 0.0)
    res.coal_nginx_bytes = nginx.origin_bytes(rel) - before
    log(
        f"    {res.coal_ok}/{args.clients} complete in {res.coal_seconds:.1f} s; origin bytes "
        f"{res.coal_metric_bytes / MiB:.1f} MiB (metric), {res.coal_nginx_bytes / MiB:.1f} MiB "
        f"(nginx log)"
    )


# -- report ----------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**not met**"


ANALYSIS = """Where the time goes (py-spy and strace of the cache on this machine type,
2 vCPUs shared with wrk/curl and the other servers):

- The cache runs the hit benchmarks with `--revalidate-ttl 1h` (nginx and XCache never
  revalidate); with the default 60 s, every object is checked with the origin once a
  minute, which costs a burst of origin requests in a run longer than that.
- Large hits are `sendfile` from the page cache in runs of up to 16 blocks, on a corked
  socket (`TCP_CORK` while the body goes out, as nginx's `tcp_nopush`). Without the cork
  the kernel sent the short segment at the end of every sendfile piece on its own and
  the cache stayed at 1.7-2.0 GB/s where nginx did 2.4-2.7; with it, 2.3-2.5 GB/s, even
  with nginx and close to XCache (the spread between rounds is +-15% on these vCPUs). A
  block's checksum check is now remembered in the index for every worker, so only the
  first hit after a miss reads the object back (that round is the slow one, about
  1.5 GB/s). Tried and not kept: sending from a thread with blocking `poll` (nginx's
  2 MiB pieces) instead of `loop.sendfile`: 2.5-3.1 GB/s in a standalone server, no
  better than the event loop inside the cache.
- Large hits against XCache on the AMD EPYC host of session 5: XCache 3.6-4.5 GB/s,
  nginx 1.5-1.7, stashflow 1.6-2.3. A standalone server sending 1 GiB over loopback to
  curl made 2.5-3.2 GB/s with `sendfile` and 3.8-4.2 GB/s with `pread` into a 2 MiB
  buffer and `send` (8 alternated runs each); the cache with its copy fallback forced
  (`pread` 1 MiB in a thread, then write) made 2.3-3.5 GB/s against 1.5-1.9 with
  `sendfile`. So on this host a body copied from user memory reaches a loopback
  receiver faster than page-cache pages handed over by `sendfile`, and XCache sends
  from its RAM blocks. Not adopted: on a real network interface `sendfile` costs the
  cache no CPU per byte, the copy costs a core-second per ~4 GB, and on the Intel host
  of session 4 (same VM type) the cache's `sendfile` was level with XCache. The target
  "ahead of XCache" for large hits is met or missed with the host here.
- Small hits: plain GETs of cached small objects are answered by the fast path
  (cache/fastpath.py: one LMDB read transaction, one write of head and body, no aiohttp
  request machinery), about 4x the requests/s of the full aiohttp handler. A worker
  under wrk spends most of its time in the kernel's `send` of each answer (39% of the
  samples) and in epoll. Two costs were ours and went in session 6: writing the
  batched access counts back to the index every 5 s took 12% of a worker (every
  object read since the last write is decoded, re-ranked and encoded again), now every
  `access_flush` = 15 s (and before a watermark eviction pass); and the latency
  histogram, two writes to a mapped file per hit (1.8 us, 7%), is now counted in
  process and added twice a second. Together +14% (36,600 -> 41,600 req/s, 0.55x ->
  0.63x-0.70x of nginx in three runs). uvloop instead of asyncio's loop changed nothing
  measurable (36,784 vs 36,585). Each worker has its own SO_REUSEPORT socket; the
  kernel hashes connections over them (the split is noted above).
- Miss path: the worker's loop receives from the origin (aiohttp, 64-256 KiB at a
  time) and writes to the client, a write-behind thread writes the blocks (`pwritev`,
  29% of the samples) and computes crc32c. On this host writes into the page cache run
  at 5 GB/s (`dd`; in session 2, on another host, memory the guest had never used took
  0.44 GB/s). The direct path is nginx's `sendfile` and curl's reads, about one core for
  0.45 s; the cache path adds a receive, a write into the page cache and a send, about
  one more core-second of kernel copies on the same two vCPUs, before any Python: the
  1.15x target is not in reach of this design here (4.2x measured).
- A bound for any design, measured in session 5 on the AMD host (2.41x there): a
  standalone relay that moves 1 GiB from a sendfile origin to curl with splice(2) only
  (socket -> pipe -> socket, no user-space copy, nothing stored) took 0.55-0.67 s against
  0.32-0.39 s direct (1.7x); with tee(2) and a splice into a file (what a cache must
  keep) 0.74-1.2 s (2.2-2.6x). Origin, relay and client share the two vCPUs, so the
  relay's work is not hidden behind the others: the 1.15x target cannot be met here by
  a cache that relays, whatever it does in user space.
- The same cache code measured differently on different hosts of the same VM type:
  session 1 published 34,286 small hits/s against nginx's 70,167 (0.49x), and a 3.46x
  miss; session 2, with unchanged cache code, measured 28,390 against 115,766 (0.25x) and
  5.06x. On the AMD host of sessions 5 and 6 the miss ratio ranged 2.41x-3.09x between
  runs of the same code (3.09x in the table above, 2.41x and 2.74x in two `--only miss`
  runs of 5 pairs right after it).
"""


def report(res: Results, args: argparse.Namespace, elapsed: float) -> str:
    ng = res.servers["nginx"]
    us = res.servers["stashflow"]
    xc = res.servers["xcache"]
    miss_d = statistics.median(res.miss_direct) if res.miss_direct else None
    miss_c = statistics.median(res.miss_cache) if res.miss_cache else None
    coal = res.coal_metric_bytes / res.coal_size if res.coal_size else None
    coal_ng = res.coal_nginx_bytes / res.coal_size if res.coal_size else None
    large_mib = args.large_size / MiB

    lines = [
        f"Hits ({large_mib:.0f} MiB file: median of {args.repeats} sequential curl GETs; "
        f"{args.small_size} B objects: median of {args.rounds} x `wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration:g}s` over {args.small_count} distinct files):",
        "",
        f"| server | {large_mib:.0f} MiB hit, MB/s | {args.small_size} B hits, req/s |",
        "|---|---:|---:|",
    ]
    for s in (ng, us, xc):
        if s.skipped:
            lines.append(f"| {s.name} | skipped: {s.skipped} | |")
        else:
            notes = f" ({'; '.join(sorted(set(s.small_notes)))})" if s.small_notes else ""
            lines.append(f"| {s.name} | {_fmt(s.large, ',.0f')} | {_fmt(s.small, ',.0f')}{notes} |")
    lines += [
        "",
        "| benchmark | measured | ratio | target | |",
        "|---|---|---:|---|---|",
    ]
    r = _ratio(us.large, ng.large)
    lines.append(
        f"| 1. large hit vs nginx | {_fmt(us.large, ',.0f')} vs {_fmt(ng.large, ',.0f')} MB/s "
        f"| {_fmt(r, '.2f')}x | >= 0.9x | {_verdict(r, 0.9, True)} |"
    )
    r = _ratio(us.large, xc.large)
    lines.append(
        f"| 1. large hit vs XCache | {_fmt(us.large, ',.0f')} vs {_fmt(xc.large, ',.0f')} MB/s "
        f"| {_fmt(r, '.2f')}x | > 1x | {_verdict(r, 1.0, True)} |"
    )
    r = _ratio(us.small, ng.small)
    lines.append(
        f"| 1. small hits vs nginx | {_fmt(us.small, ',.0f')} vs {_fmt(ng.small, ',.0f')} req/s "
        f"| {_fmt(r, '.2f')}x | >= 0.6x | {_verdict(r, 0.6, True)} |"
    )
    r = _ratio(us.small, xc.small)
    lines.append(
        f"| 1. small hits vs XCache | {_fmt(us.small, ',.0f')} vs {_fmt(xc.small, ',.0f')} req/s "
        f"| {_fmt(r, '.2f')}x | > 1x | {_verdict(r, 1.0, True)} |"
    )
    r = _ratio(miss_c, miss_d)
    lines.append(
        f"| 2. miss: cold cache vs direct from origin | {_fmt(miss_c, '.2f')} s vs "
        f"{_fmt(miss_d, '.2f')} s (median of {args.miss_repeats}) | {_fmt(r, '.2f')}x time "
        f"| <= 1.15x | {_verdict(r, 1.15, False)} |"
    )
    lines.append(
        f"| 3. coalescing: origin bytes / object size | {res.coal_metric_bytes / MiB:.1f} MiB "
        f"for {res.coal_size / MiB:.0f} MiB, {res.coal_clients} clients "
        f"({res.coal_ok} complete, {res.coal_seconds:.1f} s; nginx log: {_fmt(coal_ng, '.3f')}x) "
        f"| {_fmt(coal, '.3f')}x | <= 1.05x | {_verdict(coal, 1.05, False)} |"
    )
    lines += [
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/cache_serving.py', *args.argv])}` "
        f"({elapsed / 60:.1f} min).",
        "",
        f"Machine: {machine()}; {tool_versions()}. All servers and clients share the same "
        "CPUs over loopback (wrk's threads compete with the server for them).",
    ]
    if us.spread:
        res.notes.append(
            "wrk's connections per worker process of our cache, sampled in each round: "
            + ", ".join(us.spread)
            + " (one SO_REUSEPORT socket per worker: the kernel hashes connections over"
            " them)"
        )
    if res.notes:
        lines += ["", *[f"Note: {n}" for n in res.notes]]
    lines += ["", ANALYSIS]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Cache benchmarks 1-3: hits (vs nginx and XCache), miss path, coalescing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--large-size", type=parse_size, default="1GiB", help="size of the large file")
    p.add_argument("--small-size", type=parse_size, default="4KiB", help="size of each small file")
    p.add_argument("--small-count", type=int, default=10_000, help="number of small files")
    p.add_argument(
        "--coalesce-size", type=parse_size, default="200MiB", help="object of benchmark 3"
    )
    p.add_argument("--clients", type=int, default=50, help="concurrent clients of benchmark 3")
    p.add_argument("--repeats", type=int, default=5, help="timed GETs of the large file per server")
    p.add_argument("--miss-repeats", type=int, default=3, help="cold-cache / direct pairs")
    p.add_argument("--rounds", type=int, default=2, help="wrk runs per server")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--workers", type=int, default=2, help="worker processes of nginx and our cache")
    p.add_argument("--no-xcache", action="store_true", help="leave XCache out")
    p.add_argument(
        "--only",
        choices=["hits", "miss", "coalescing"],
        action="append",
        help="run only these benchmarks (repeatable); default all",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (256 MiB, 1000 small files, 3 s wrk, 1 round)",
    )
    p.add_argument("--workdir", type=Path, help="directory for files and servers [a new temp dir]")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--output-md",
        type=Path,
        help=f"write (or replace) the section {SECTION!r} of this markdown file",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.large_size = min(args.large_size, 256 * MiB)
        args.coalesce_size = min(args.coalesce_size, 64 * MiB)
        args.small_count = min(args.small_count, 1000)
        args.duration = min(args.duration, 3.0)
        args.rounds = 1
        args.repeats = min(args.repeats, 3)
        args.miss_repeats = min(args.miss_repeats, 2)
    return args


def _start_xcache(stack: contextlib.ExitStack, work: Path, root: Path) -> tuple[Any, str | None]:
    try:
        from stashflow.integration.servers.xrootd import (
            XCacheServer,
            XRootDServer,
            xrootd_available,
        )
    except ImportError as e:
        return None, f"XRootD launchers unavailable ({e})"
    reason = xrootd_available()
    if reason:
        return None, reason
    origin = stack.enter_context(
        XRootDServer(work / "xrd-origin", exports_dir=root, export=NS, http=False, checksums=())
    )
    xcache = stack.enter_context(
        XCacheServer(work / "xcache", origin=f"{origin.host}:{origin.port}", export=NS)
    )
    return xcache, None


def run(args: argparse.Namespace, work: Path, res: Results) -> None:
    only = set(args.only or ["hits", "miss", "coalescing"])
    root = work / "files"
    log(f"work directory {work}; creating files ...")
    small_paths = make_files(root, args)
    res.large_size = args.large_size
    with contextlib.ExitStack() as stack:
        nginx = stack.enter_context(Nginx(work / "nginx", root, workers=args.workers))
        log(f"nginx on {nginx.url} (origin block {nginx.origin_url})")
        servers = [
            Server("nginx", nginx.url),
            Server("stashflow", ""),
            Server("xcache", ""),
        ]
        res.servers = {s.name: s for s in servers}
        if "hits" in only:
            cache = stack.enter_context(
                # nginx and XCache never revalidate: a TTL longer than the run keeps the
                # cache's once-per-TTL origin checks out of a hit-throughput measurement
                Cache(work / "cache-hits", {NS: f"{nginx.origin_url}{NS}"}, workers=args.workers,
                      extra=["--revalidate-ttl", "1h"])
            )
            servers[1].url = cache.url
            log(f"stashflow cache on {cache.url}")
            if args.no_xcache:
                servers[2].skipped = "--no-xcache"
            else:
                try:
                    xcache, why = _start_xcache(stack, work, root)
                except Exception as e:  # report, and run the rest
                    xcache, why = None, f"did not start: {e}".splitlines()[0]
                if xcache is None:
                    servers[2].skipped = why
                    res.notes.append(f"XCache skipped: {why}")
                else:
                    servers[2].url = f"http://127.0.0.1:{xcache.http_port}"
                    log(f"XCache on {servers[2].url} (XRootD origin {xcache.origin})")
            log("warming the caches (one pass over every file) ...")
            for s in servers[1:]:
                if s.skipped:
                    continue
                t0 = time.perf_counter()
                warm_large(f"{s.url}{NS}/large.bin", args.large_size)
                # XCache 5.5.3 segfaults (in libXrdPfc) when many small files are first
                # opened concurrently: warm it one file at a time
                warm_small(s.url, small_paths, args.small_size, 1 if s.name == "xcache" else 16)
                log(f"    {s.name} warmed in {time.perf_counter() - t0:.1f} s")
            if not servers[2].skipped:
                wait_xcache_complete(xcache.cache_dir, f"{NS}/large.bin", args.large_size)
                # a second pass: every later read must be a hit on XCache's disk
                warm_large(f"{servers[2].url}{NS}/large.bin", args.large_size)
            m = cache.metrics()
            log(
                f"    stashflow after warming: {m.get('stashflow_cache_hits_total', 0):.0f} hits, "
                f"{m.get('stashflow_cache_misses_total', 0):.0f} misses"
            )
            bench_hits(servers, args, small_paths, work)
            if not servers[2].skipped and not xcache.running:
                res.notes.append(
                    "XCache died during the hit benchmarks (see dmesg: segfault in libXrdPfc)"
                )
            m2 = cache.metrics()
            extra_misses = m2.get("stashflow_cache_misses_total", 0) - m.get(
                "stashflow_cache_misses_total", 0
            )
            if extra_misses:
                res.notes.append(f"our cache counted {extra_misses:.0f} misses during the hit runs")
        else:
            for s in servers[1:]:
                s.skipped = "not run (--only)"
            servers[0].skipped = "not run (--only)"
        if "miss" in only:
            bench_miss(nginx, args, work, res)
        if "coalescing" in only:
            bench_coalescing(nginx, args, work, res)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    args.argv = arguments
    if args.workdir:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="stashflow-bench-", dir="/tmp"))
    # xrootd runs as its own user and nginx workers must get in
    os.chmod(work, 0o755)
    res = Results()
    started = time.perf_counter()
    try:
        with terminate_on_sigterm():
            run(args, work, res)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped", file=sys.stderr)
        return 130
    except BenchmarkError as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    text = report(res, args, elapsed)
    print("\n" + text)
    if args.output_md:
        update_markdown(args.output_md, SECTION, text)
        print(f"\nwrote the section {SECTION!r} of {args.output_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
