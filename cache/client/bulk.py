"""Many whole-object downloads at once through libcurl's multi interface (pycurl).

A job's files usually come from one cache, most of them small. For those, stashcp's
per-file cost in Python (aiohttp's request machinery, the failover and resume
bookkeeping) weighed more than the transfer: a first pass here fetches every object
whose first source is known without asking anyone (`--cache`, `--origin`, a direct
URL), or through the one redirect of a configured director to its best cache when no
token is held (a redirect followed blindly must not carry one). A few threads each
drive their own libcurl multi handle, the GIL released while libcurl waits, receives
and parses; only the bytes are handed to Python, to be written and checksummed.

The pass does the easy case and nothing else: one GET per object from its first
source, into the same hidden part file the transfer engine uses, renamed into place
only when the status is 200, the size is the announced Content-Length and the checksum
is the one in the `Digest` header. Anything else (a redirect other than the director's,
an error status, a refused connection, a stall, a mismatch, a part file with a resume
record, an object without Content-Length or Digest, one over a chunk) leaves nothing
behind and hands the object back: the caller runs it through the transfer engine,
which fails over, resumes, retries and reports the error as it always does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stashflow.cache.client.discovery import Remote, server_of
from stashflow.cache.client.progress import Progress
from stashflow.cache.client.transfer import (
    PART_SUFFIX,
    Client,
    Options,
    Result,
    pick_digest,
    want_digest,
)
from stashflow.integration.checksums import ALGORITHMS, Hasher

log = logging.getLogger("stashcp")

BUFFER = 256 * 1024  # libcurl's receive buffer: an object of 100 KiB in one or two writes


@dataclass
class Job:
    source: str  # the object as the user named it (stash:///ns/path, ...)
    url: str  # where to GET it
    dest: Path
    headers: dict[str, str] = field(default_factory=dict)  # the token, when it is sent
    follow_redirect: bool = False  # `url` is the director's: follow its one redirect


def usable(opts: Options) -> bool:
    """Whether this pass can run: pycurl is installed, and nothing asked for what only
    the transfer engine does (a rate limit)."""
    if opts.rate_limit:
        return False
    try:
        import pycurl  # noqa: F401
    except ImportError:
        return False
    return True


async def first_pass(
    client: Client, items: list[tuple[Remote, Path]], progress: Progress | None = None
) -> dict[int, Result]:
    """Fetch what this pass can of `items` (object, destination file) for `client`'s
    transfers; the Result of each fetched item by its index. The others are for
    `client.download`."""
    jobs: list[Job] = []
    indexes: list[int] = []
    for i, (remote, path) in enumerate(items):
        sources = client.fixed_sources(remote)
        if sources:
            job = Job(remote.url(), sources[0].url, path, client.auth_headers(None))
        elif (url := client.director_request(remote)) is not None:
            job = Job(remote.url(), url, path, follow_redirect=True)
        else:
            continue
        if job.url.startswith(("http://", "https://")):
            jobs.append(job)
            indexes.append(i)
    fetched: dict[int, Result] = {}

    def done(index: int, result: Result) -> None:
        if progress is not None:
            progress.add_total(result.size)
            progress.add(result.size)
            progress.file_done()
        fetched[indexes[index]] = result

    stop = threading.Event()
    try:
        await asyncio.to_thread(fetch, jobs, client.opts, done, stop=stop)
    except asyncio.CancelledError:  # Ctrl-C: the threads must not carry on downloading
        stop.set()
        raise
    return fetched


def fetch(
    jobs: list[Job],
    opts: Options,
    done: Callable[[int, Result], None],
    threads: int | None = None,
    stop: threading.Event | None = None,
) -> list[int]:
    """Download every job it can; `done` gets the index and Result of each finished one
    (from a worker thread). Returns the indexes of the jobs handed back to the caller.
    Setting `stop` ends the pass within a fraction of a second: transfers under way are
    dropped (their part files removed) and handed back, the others never started."""
    if not jobs:
        return []
    n_threads = max(1, min(threads or min(4, os.cpu_count() or 1), len(jobs)))
    per_thread = max(1, -(-opts.parallel_files // n_threads))
    queue = iter(enumerate(jobs))
    lock = threading.Lock()
    handed_back: list[int] = []
    stop = stop or threading.Event()

    def take() -> tuple[int, Job] | None:
        with lock:
            return next(queue, None)

    def give_back(index: int) -> None:
        with lock:
            handed_back.append(index)

    workers = [
        threading.Thread(
            target=_run,
            args=(opts, per_thread, take, give_back, done, stop),
            name=f"stashcp-curl-{i}",
        )
        for i in range(n_threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sorted(handed_back)


class _Download:
    """One object being received into its part file."""

    def __init__(self, index: int, job: Job, algorithm: str | None, largest: int) -> None:
        self.index = index
        self.largest = largest
        self.length: int | None = None
        self.job = job
        self.part = job.dest.with_name(f".{job.dest.name}{PART_SUFFIX}")
        self.hasher = Hasher(algorithm) if algorithm else None
        self.received = 0
        self.digest_header: str | None = None
        self.failed: str | None = None
        self.start = time.time()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.fd = os.open(self.part, flags, 0o644)

    def write(self, data: bytes) -> int | None:
        if self.length is not None and self.length > self.largest:
            # parallel ranges (and splice) fetch a large object faster than one stream
            self.failed = f"{self.length} bytes: large enough for parallel ranges"
            return 0
        try:
            os.write(self.fd, data)
        except OSError as e:  # the transfer engine reports it, with the object's name
            self.failed = f"cannot write {self.part}: {e.strerror}"
            return 0  # anything but len(data): libcurl aborts the transfer
        if self.hasher is not None:
            self.hasher.update(data)
        self.received += len(data)
        return None

    def header(self, line: bytes) -> None:
        name = line[:15].lower()
        if name.startswith(b"digest:"):
            self.digest_header = line[7:].strip().decode("latin-1")
        elif name == b"content-length:":
            try:
                self.length = int(line[15:])
            except ValueError:
                self.length = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.part)
        except FileNotFoundError:
            pass


def _run(
    opts: Options,
    slots: int,
    take: Callable[[], tuple[int, Job] | None],
    give_back: Callable[[int], None],
    done: Callable[[int, Result], None],
    stop: threading.Event,
) -> None:
    import pycurl

    verify = ssl.get_default_verify_paths()
    want = f"Want-Digest: {want_digest(opts.checksum)}"
    algorithm = None
    if opts.checksum != "none":
        algorithm = opts.checksum if opts.checksum in ALGORITHMS else "crc32c"
    multi = pycurl.CurlMulti()
    idle: list[Any] = []
    for _ in range(slots):
        c = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.BUFFERSIZE, BUFFER)
        c.setopt(pycurl.MAXREDIRS, 1)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.USERAGENT, "stashcp (stashflow)")
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(opts.connect_timeout * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, max(1, int(opts.min_rate)))
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, int(opts.stall_window)))
        if verify.cafile:
            c.setopt(pycurl.CAINFO, verify.cafile)
        if verify.capath:
            c.setopt(pycurl.CAPATH, verify.capath)
        idle.append(c)
    running: dict[int, tuple[Any, _Download]] = {}

    def start(c: Any, index: int, job: Job) -> None:
        if _resumable(job.dest):
            give_back(index)  # the transfer engine resumes it
            idle.append(c)
            return
        try:
            d = _Download(index, job, algorithm, int(opts.chunk_size))
        except OSError:
            give_back(index)  # the transfer engine reports why it cannot write there
            idle.append(c)
            return
        headers = [want, "Accept-Encoding: identity"]
        headers += [f"{k}: {v}" for k, v in job.headers.items()]
        c.setopt(pycurl.URL, job.url)
        c.setopt(pycurl.FOLLOWLOCATION, 1 if job.follow_redirect else 0)
        c.setopt(pycurl.HTTPHEADER, headers)
        c.setopt(pycurl.WRITEFUNCTION, d.write)
        c.setopt(pycurl.HEADERFUNCTION, d.header)
        multi.add_handle(c)
        running[id(c)] = (c, d)

    def finish(c: Any, error: str | None) -> None:
        _, d = running.pop(id(c))
        multi.remove_handle(c)
        idle.append(c)
        outcome = error or d.failed or _check(c, d, opts)
        if isinstance(outcome, Result):
            d.close()
            try:
                os.replace(d.part, d.job.dest)
            except OSError:
                d.discard()
                give_back(d.index)
                return
            done(d.index, outcome)
            return
        log.debug("%s: %s; handing it to the transfer engine", d.job.source, outcome)
        d.discard()
        give_back(d.index)

    exhausted = False
    try:
        while not stop.is_set():
            while idle and not exhausted:
                nxt = take()
                if nxt is None:
                    exhausted = True
                    break
                start(idle.pop(), *nxt)
            if not running:
                if exhausted:
                    break
                continue
            while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            _, ok, failed = multi.info_read()
            for c in ok:
                finish(c, None)
            for c, _code, message in failed:
                finish(c, message or "transfer failed")
            if not ok and not failed:
                multi.select(0.2)
    finally:
        for c, d in list(running.values()):
            multi.remove_handle(c)
            d.discard()
            give_back(d.index)
        for c in itertools.chain(idle, (c for c, _ in running.values())):
            c.close()
        multi.close()


def _resumable(dest: Path) -> bool:
    """A resume record from an interrupted run: the transfer engine continues it."""
    return dest.with_name(f".{dest.name}{PART_SUFFIX}.json").exists()


def _check(c: Any, d: _Download, opts: Options) -> Result | str:
    """The Result of a download that checks out, or why it does not."""
    import pycurl

    d.close()
    status = c.getinfo(pycurl.RESPONSE_CODE)
    if status != 200:
        return f"HTTP {status}"
    length = int(c.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T))
    if length < 0:
        return "no Content-Length"
    if d.received != length:
        return f"{d.received} bytes received of {length}"
    checksum = None
    if opts.checksum != "none":
        offered = pick_digest(d.digest_header, opts.checksum)
        if offered is None:
            return "no checksum offered"
        algo, expected = offered
        if d.hasher is None or d.hasher.algorithm != algo:
            return f"checksum offered in {algo}"
        actual = d.hasher.hexdigest()
        if actual != expected:
            return f"{algo} checksum mismatch: got {actual}, expected {expected}"
        checksum = f"{algo}:{actual}"
    url = c.getinfo(pycurl.EFFECTIVE_URL) or d.job.url
    return Result(
        source=d.job.source,
        dest=str(d.job.dest),
        ok=True,
        size=length,
        transferred=length,
        start=d.start,
        end=time.time(),
        servers=[server_of(url)],
        checksum=checksum,
    )
