"""Running a cache: a supervisor that binds the socket once, recovers the index, and
forks worker processes that all accept on it (so both cores serve requests), restarting
any worker that dies and releasing what it held in the index."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import fcntl
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


LOCK_FILE = "stashflow-cache.lock"
_PR_SET_PDEATHSIG = 1


def _lock_directory(cfg: CacheConfig) -> int:
    """Hold an exclusive lock on the cache directory for as long as this cache or any of
    its workers lives (forked workers share the lock): a second cache on the same
    directory would recover the index under the first one's feet, dropping the fetches
    its workers have in flight."""
    path = cfg.directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(
            f"stashflow cache: {cfg.directory} is in use by another cache (pid {holder}); "
            f"stop it first, or give another --dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _check_port_free(cfg: CacheConfig) -> None:
    """Our own sockets all set SO_REUSEPORT, which would also let a second cache (same
    user) bind the port and silently take half the connections. A plain bind fails
    while any socket holds the port."""
    host, port = cfg.host_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise SystemExit(
                f"stashflow cache: cannot listen on {cfg.listen}: {e.strerror} "
                f"(another server holds the port)"
            ) from None


def _die_with_parent(parent: int) -> None:
    """A worker whose supervisor is gone (kill -9) must not go on serving unsupervised:
    SIGTERM it when the parent dies (Linux), and exit now if that already happened."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


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

    lock = _lock_directory(cfg)
    _check_port_free(cfg)
    stats = with_index("recover")
    log.info("index recovered: %s", stats)
    # held (bound, not listening) for the supervisor's lifetime: the port is checked
    # once, with a clear error, and stays ours while workers come and go
    reserved = _bind(cfg, listen=False)
    log.info(
        "cache listening on %s with %d worker(s), %s",
        cfg.listen,
        cfg.workers,
        ", ".join(f"{k} -> {' | '.join(v)}" for k, v in cfg.origins.items()),
    )
    if cfg.workers <= 1:
        asyncio.run(_run_worker(cfg))
        reserved.close()
        os.close(lock)
        return

    children: dict[int, float] = {}
    stopping = False

    supervisor = os.getpid()

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            _die_with_parent(supervisor)
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
