"""Filling the cache from origins: one fetch per block, however many clients wait.

Within a worker, waiters share one asyncio future per block. Across workers, blocks
are claimed in the index (see index.py): a worker that finds a block claimed by a live
process polls the index until the block is present, and takes the claim over if the
claiming process dies or gives up. Contiguous missing blocks are fetched with one ranged
request; each block is written to the sparse data file (or inline into LMDB for small
objects) and committed to the index as soon as its last byte arrives, so a client
reading the first block does not wait for the last.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stashflow.cache import metrics
from stashflow.cache.admission import Admission
from stashflow.cache.config import CacheConfig
from stashflow.cache.index import Index, NoSpace, Record
from stashflow.cache.namespace import Namespace
from stashflow.integration.checksums import block_crc
from stashflow.integration.storage import Corrupt, NotFound

log = logging.getLogger("stashflow.cache")


class Stalled(Exception):
    """An origin transfer fell below the minimum rate."""


class CacheFull(Exception):
    """The cache cannot store this data (disk full, quota reached with everything in
    use or pinned): serve it straight from the origin instead."""


class ObjectGone(Exception):
    """The object was evicted or changed while being read: serve the rest from the origin."""


@dataclass
class Fill:
    """Blocks of one object being made present, as seen by one request."""

    futures: dict[int, asyncio.Future[None]]
    was_present: int
    was_missing: int


async def guarded(
    chunks: AsyncIterator[bytes], origin: str, window: float, min_rate: int
) -> AsyncIterator[bytes]:
    """Pass chunks through, raising Stalled when no byte arrives for a whole window or
    fewer than `min_rate` bytes/s arrive over one."""
    start = time.monotonic()
    count = 0
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), timeout=window)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise Stalled(f"origin {origin} sent nothing for {window:.0f}s") from None
            count += len(chunk)
            now = time.monotonic()
            if now - start >= window:
                rate = count / (now - start)
                if rate < min_rate:
                    raise Stalled(
                        f"origin {origin} sent {rate / 1024:.1f} KiB/s over {now - start:.0f}s,"
                        f" below the minimum of {min_rate / 1024:.0f} KiB/s"
                    )
                start, count = now, 0
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _write_block(path: Path, offset: int, data: bytes) -> int:
    """pwrite one block into the sparse data file; returns its crc32c."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    finally:
        os.close(fd)
    return block_crc(data)


class Fetcher:
    def __init__(self, index: Index, cfg: CacheConfig, admission: Admission) -> None:
        self.index = index
        self.cfg = cfg
        self.admission = admission
        self._pending: dict[tuple[bytes, int, int], asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._full_until = 0.0

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def present(self, rec: Record, first: int, last: int) -> dict[int, int]:
        if rec.inline:
            return {0: 0} if self.index.inline_data(rec) is not None else {}
        return self.index.present_blocks(rec, first, last)

    def ensure(self, ns: Namespace, rec: Record, first: int, last: int, demand_last: int) -> Fill:
        """Start whatever is needed for blocks first..last to become present and return
        futures for those not present yet. Blocks after `demand_last` are read-ahead.
        Raises CacheFull when nothing can be stored."""
        present = self.present(rec, first, last)
        futures: dict[int, asyncio.Future[None]] = {}
        wanted: list[int] = []
        for idx in range(first, last + 1):
            if idx in present:
                continue
            fut = self._pending.get((rec.objid, rec.gen, idx))
            if fut is not None:
                futures[idx] = fut
            else:
                wanted.append(idx)
        if wanted:
            self._start(ns, rec, wanted, demand_last, futures)
        return Fill(futures, len(present), last - first + 1 - len(present))

    def _start(
        self,
        ns: Namespace,
        rec: Record,
        wanted: list[int],
        demand_last: int,
        futures: dict[int, asyncio.Future[None]],
    ) -> None:
        if time.monotonic() < self._full_until:
            raise CacheFull("the cache disk was full moments ago")
        try:
            claim, evicted = self.index.claim(rec, wanted)
        except NoSpace as e:
            raise CacheFull(str(e)) from None
        if evicted.objects:
            metrics.EVICTIONS.inc(evicted.objects)
            metrics.EVICTED_BYTES.inc(evicted.bytes)
            self.index.unlink_files(evicted.files)
        loop = asyncio.get_running_loop()
        taken = set(claim.blocks)
        for idx in wanted:
            fut: asyncio.Future[None] = loop.create_future()
            # a failed fill must not warn "exception never retrieved" if nobody waits
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._pending[(rec.objid, rec.gen, idx)] = fut
            futures[idx] = fut
        run: list[int] = []
        for idx in claim.blocks:
            if run and idx != run[-1] + 1:
                self._spawn(self._fetch_run(ns, rec, run, demand_last))
                run = []
            run.append(idx)
        if run:
            self._spawn(self._fetch_run(ns, rec, run, demand_last))
        elsewhere = [idx for idx in wanted if idx not in taken]
        if elsewhere:
            self._spawn(self._watch(ns, rec, elsewhere, demand_last))

    def _settle(self, rec: Record, idx: int, exc: BaseException | None = None) -> None:
        fut = self._pending.pop((rec.objid, rec.gen, idx), None)
        if fut is None or fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    async def _fetch_run(
        self, ns: Namespace, rec: Record, blocks: list[int], demand_last: int
    ) -> None:
        bs = rec.block_size
        offset = blocks[0] * bs
        length = sum(rec.block_len(i) for i in blocks)
        rel = ns.relative(rec.key)
        next_i = 0
        origin = ns.prefix
        try:
            async with self.admission.slot(origin):
                metrics.INFLIGHT.labels(origin).inc()
                try:
                    buf = bytearray()

                    async def drain() -> None:
                        nonlocal next_i
                        while next_i < len(blocks) and len(buf) >= rec.block_len(blocks[next_i]):
                            idx = blocks[next_i]
                            n = rec.block_len(idx)
                            data = bytes(buf[:n])
                            del buf[:n]
                            kind = "demand" if idx <= demand_last else "prefetch"
                            metrics.ORIGIN_BYTES.labels(origin, kind).inc(n)
                            await self._commit(rec, idx, data)
                            next_i += 1

                    stream = ns.storage.stream(rel, offset, length)
                    async for chunk in guarded(
                        stream, ns.origin_url, self.cfg.stall_window, self.cfg.min_rate
                    ):
                        buf += chunk
                        await drain()
                    await drain()  # zero-length objects have a block with no bytes
                    if next_i < len(blocks):
                        got = len(buf) + sum(rec.block_len(i) for i in blocks[:next_i])
                        raise Corrupt(
                            ns.storage.url_of(rel), f"origin sent {got} of {length} bytes promised"
                        )
                finally:
                    metrics.INFLIGHT.labels(origin).dec()
        except BaseException as e:
            rest = blocks[next_i:]
            if rest:
                await asyncio.to_thread(self.index.release, rec, rest)
            if isinstance(e, NotFound | Corrupt):
                # the origin's object is not what the record says any more
                self.index.mark_stale(rec.key)
            if not isinstance(e, CacheFull | ObjectGone | asyncio.CancelledError):
                kind = type(e).__name__
                metrics.ORIGIN_ERRORS.labels(origin, kind).inc()
                log.warning(
                    "fetch of %s blocks %d-%d failed: %s",
                    rec.key,
                    rest[0] if rest else -1,
                    blocks[-1],
                    e,
                )
            for idx in rest:
                self._settle(
                    rec,
                    idx,
                    e
                    if not isinstance(e, asyncio.CancelledError)
                    else ObjectGone("fetch cancelled"),
                )
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _commit(self, rec: Record, idx: int, data: bytes) -> None:
        try:
            if rec.inline:
                ok = await asyncio.to_thread(self.index.commit_inline, rec, data, block_crc(data))
            else:
                path = self.index.data_path(rec)
                crc = await asyncio.to_thread(_write_block, path, idx * rec.block_size, data)
                ok = await asyncio.to_thread(self.index.commit_block, rec, idx, crc)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._full_until = time.monotonic() + 5
                log.error(
                    "cache disk full while storing %s: serving from the origin uncached", rec.key
                )
                raise CacheFull(f"cache disk full: {e.strerror}") from None
            raise
        if not ok:
            raise ObjectGone(f"{rec.key} changed or was evicted while being fetched")
        self._settle(rec, idx)

    async def _watch(self, ns: Namespace, rec: Record, blocks: list[int], demand_last: int) -> None:
        """Wait for blocks another process is fetching; take over those it abandons."""
        remaining = set(blocks)
        delay = 0.005
        try:
            while remaining:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.05)
                lo, hi = min(remaining), max(remaining)
                present = self.present(rec, lo, hi)
                for idx in list(remaining):
                    if idx in present:
                        remaining.discard(idx)
                        self._settle(rec, idx)
                if not remaining:
                    return
                claims = self.index.claims_of(rec, sorted(remaining))
                orphaned = sorted(i for i in remaining if not claims.get(i, False))
                if not orphaned:
                    continue
                if self.index.get(rec.key) is None:
                    raise ObjectGone(f"{rec.key} was evicted while being fetched")
                claim, _ = self.index.claim(rec, orphaned)
                run: list[int] = []
                for idx in claim.blocks:
                    remaining.discard(idx)
                    if run and idx != run[-1] + 1:
                        self._spawn(self._fetch_run(ns, rec, run, demand_last))
                        run = []
                    run.append(idx)
                if run:
                    self._spawn(self._fetch_run(ns, rec, run, demand_last))
        except NoSpace as e:
            for idx in remaining:
                self._settle(rec, idx, CacheFull(str(e)))
        except BaseException as e:
            for idx in remaining:
                self._settle(rec, idx, e if isinstance(e, Exception) else ObjectGone("cancelled"))
            if not isinstance(e, Exception):
                raise
