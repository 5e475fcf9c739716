"""Running a cache: a supervisor that binds the socket once, recovers the index, and
forks worker processes that all accept on it (so both cores serve requests), restarting
any worker that dies and releasing what it held in the index."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from stashflow.cache.config import CacheConfig

log = logging.getLogger("stashflow.cache")


def _bind(cfg: CacheConfig, *, listen: bool) -> socket.socket:
    """A socket on the cache's address with SO_REUSEPORT: each worker listens on its
    own, so that the kernel spreads connections between workers (with one shared
    listening socket, one worker may end up accepting all of them)."""
    host, port = cfg.host_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise SystemExit(f"stashflow cache: cannot listen on {cfg.listen}: {e.strerror}") from None
    if listen:
        sock.listen(1024)
    return sock


def _setup_logging(cfg: CacheConfig) -> None:
    logging.basicConfig(
        level=os.environ.get("STASHFLOW_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    access = logging.getLogger("stashflow.cache.access")
    access.propagate = False
    if cfg.access_log is None:
        access.disabled = True
    else:
        handler: logging.Handler = (
            logging.StreamHandler(sys.stderr)
            if cfg.access_log == "-"
            else logging.FileHandler(cfg.access_log)
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)


async def _run_worker(cfg: CacheConfig) -> None:
    from aiohttp import web

    from stashflow.cache.fastpath import FastPathProtocol, protocol_factory
    from stashflow.cache.server import AccessLogger, make_app
    from stashflow.cache.service import CacheService

    service = CacheService(cfg)
    app = make_app(service)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("stashflow.cache.access"),
        handle_signals=False,
    )
    await runner.setup()
    # connections start on the small-object fast path and move to aiohttp for
    # anything else (see fastpath.py)
    connections: set[FastPathProtocol] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        protocol_factory(service, runner.server, connections), sock=_bind(cfg, listen=True)
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for conn in list(connections):
        conn.close()
    await runner.cleanup()


def _worker_main(cfg: CacheConfig) -> None:
    try:
        asyncio.run(_run_worker(cfg))
    except Exception:
        log.exception("cache worker failed")
        os._exit(1)
    os._exit(0)


def serve(cfg: CacheConfig) -> None:
    _setup_logging(cfg)
    cfg.directory.mkdir(parents=True, exist_ok=True)
    # prometheus_client's multiprocess files are mmap'd: on the cache filesystem, a full
    # disk would turn a metric update into SIGBUS. They live in a private temp dir.
    metrics_dir = tempfile.mkdtemp(prefix="stashflow-cache-metrics-")
    atexit.register(shutil.rmtree, metrics_dir, True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    from stashflow.cache.eviction import make_policy
    from stashflow.cache.index import Index

    def with_index(fn: str, *args: object) -> object:
        # the supervisor opens the index only briefly: an LMDB environment must not be
        # inherited across fork()
        index = Index(cfg.directory, size=cfg.size, policy=make_policy(cfg.policy))
        try:
            return getattr(index, fn)(*args)
        finally:
            index.close()

    stats = with_index("recover")
    log.info("index recovered: %s", stats)
    # held (bound, not listening) for the supervisor's lifetime: the port is checked
    # once, with a clear error, and stays ours while workers come and go
    reserved = _bind(cfg, listen=False)
    log.info(
        "cache listening on %s with %d worker(s), %s",
        cfg.listen,
        cfg.workers,
        ", ".join(f"{k} -> {v}" for k, v in cfg.origins.items()),
    )
    if cfg.workers <= 1:
        asyncio.run(_run_worker(cfg))
        reserved.close()
        return

    children: dict[int, float] = {}
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            reserved.close()
            _worker_main(cfg)
        children[pid] = time.monotonic()

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(cfg.workers):
        spawn()
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        started = children.pop(pid, None)
        if started is None:
            continue
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
        if stopping:
            continue
        log.error(
            "cache worker %d died (status %d); releasing its fetches and restarting it", pid, status
        )
        with_index("forget_process", pid)
        if time.monotonic() - started < 1:
            time.sleep(1)  # a worker that dies at once would otherwise spin
        spawn()
