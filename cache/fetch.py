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
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from crc32c import crc32c as _crc32c

from stashflow.cache import metrics
from stashflow.cache.admission import Admission
from stashflow.cache.config import CacheConfig
from stashflow.cache.index import Index, NoSpace, Record
from stashflow.cache.namespace import Namespace
from stashflow.integration.checksums import block_crc
from stashflow.integration.storage import Corrupt, NotFound

log = logging.getLogger("stashflow.cache")
Buffer: TypeAlias = bytes | memoryview
# A block's future resolves as soon as its bytes are in this worker's memory (to the
# bytes, so that waiting clients are served without waiting for the disk), or to None
# when the block became present on disk through another worker.
BlockFuture: TypeAlias = "asyncio.Future[list[Buffer] | None]"


MAX_BACKLOG_BLOCKS = 64


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

    futures: dict[int, BlockFuture]
    was_present: int
    was_missing: int


async def guarded(
    chunks: AsyncIterator[bytes], origin: str, window: float, min_rate: int
) -> AsyncIterator[bytes]:
    """Pass chunks through, raising Stalled when no byte arrives for a whole window or
    fewer than `min_rate` bytes/s arrive over one.

    One timeout is rescheduled per chunk (rather than a wait_for per chunk, which costs
    a task each): it covers only the wait for the next chunk, never the consumer's time
    between chunks."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    count = 0
    try:
        async with asyncio.timeout(None) as deadline:
            while True:
                deadline.reschedule(loop.time() + window)
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                finally:
                    if not deadline.expired():
                        deadline.reschedule(None)
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
    except TimeoutError:
        raise Stalled(f"origin {origin} sent nothing for {window:.0f}s") from None
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _take(parts: list[Buffer], n: int) -> tuple[list[Buffer], list[Buffer]]:
    """Split the first `n` bytes off a list of buffers, without copying."""
    out: list[Buffer] = []
    i = 0
    while n:
        part = parts[i]
        if len(part) <= n:
            out.append(part)
            n -= len(part)
            i += 1
        else:
            view = memoryview(part)
            out.append(view[:n])
            parts[i] = view[n:]
            n = 0
    return out, parts[i:]


def _write_block(path: Path, offset: int, parts: list[Buffer]) -> int:
    """Write one block, given as a list of buffers, into the sparse data file.
    Returns its crc32c."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        total = sum(len(p) for p in parts)
        written = os.pwritev(fd, parts, offset) if total else 0
        if written < total:  # a short write: finish it piece by piece
            view = memoryview(b"".join(parts))[written:]
            offset += written
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
    finally:
        os.close(fd)
    crc = 0
    for part in parts:
        crc = _crc32c(part, crc)
    return int(crc)


class Fetcher:
    def __init__(self, index: Index, cfg: CacheConfig, admission: Admission) -> None:
        self.index = index
        self.cfg = cfg
        self.admission = admission
        self._pending: dict[tuple[bytes, int, int], BlockFuture] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._full_until = 0.0
        # called when a write finds the cache disk full (bytes or inodes)
        self.on_full: Callable[[], None] | None = None

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
        futures: dict[int, BlockFuture] = {}
        wanted: list[int] = []
        in_memory = 0  # fetched already, on its way to the disk: no origin request
        for idx in range(first, last + 1):
            if idx in present:
                continue
            fut = self._pending.get((rec.objid, rec.gen, idx))
            if fut is not None:
                futures[idx] = fut
                in_memory += self.delivered(fut)
            else:
                wanted.append(idx)
        if wanted:
            self._start(ns, rec, wanted, demand_last, futures)
        have = len(present) + in_memory
        return Fill(futures, have, last - first + 1 - have)

    @staticmethod
    def delivered(fut: BlockFuture) -> bool:
        return fut.done() and not fut.cancelled() and fut.exception() is None and (
            fut.result() is not None
        )

    def in_memory(self, rec: Record, idx: int) -> bool:
        fut = self._pending.get((rec.objid, rec.gen, idx))
        return fut is not None and self.delivered(fut)

    def _start(
        self,
        ns: Namespace,
        rec: Record,
        wanted: list[int],
        demand_last: int,
        futures: dict[int, BlockFuture],
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
            fut: BlockFuture = loop.create_future()
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
        """The block is committed (or failed): later requests look at the index."""
        fut = self._pending.pop((rec.objid, rec.gen, idx), None)
        if fut is None or fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def _deliver(self, rec: Record, idx: int, parts: list[Buffer]) -> None:
        """The block's bytes arrived: wake its waiters now. The future stays pending in
        `_pending` until the block is committed, so that requests arriving meanwhile get
        the bytes from memory too instead of claiming the block again."""
        fut = self._pending.get((rec.objid, rec.gen, idx))
        if fut is not None and not fut.done():
            fut.set_result(parts)

    async def _fetch_run(
        self, ns: Namespace, rec: Record, blocks: list[int], demand_last: int
    ) -> None:
        """Fetch a run of contiguous blocks with one ranged request.

        Blocks are committed in order while the next ones are being received: a
        committer task hands every block complete so far to a thread in one batch
        (write, checksum, one index transaction), so that a slow disk makes batches
        larger rather than the transfer slower, and a fast one commits block by block."""
        bs = rec.block_size
        offset = blocks[0] * bs
        length = sum(rec.block_len(i) for i in blocks)
        rel = ns.relative(rec.key)
        done = 0  # blocks committed
        ready: list[tuple[int, list[Buffer]]] = []  # complete blocks not handed on yet
        committer: asyncio.Task[None] | None = None
        origin = ns.prefix
        demand = metrics.ORIGIN_BYTES.labels(origin, "demand")
        prefetch = metrics.ORIGIN_BYTES.labels(origin, "prefetch")

        async def commit_ready() -> None:
            nonlocal done
            while ready:
                batch = ready[:]
                ready.clear()
                await self._commit(rec, batch)
                done += len(batch)

        def kick() -> None:
            nonlocal committer
            if committer is not None and committer.done():
                task, committer = committer, None
                task.result()  # raises what the last batch failed with
            if committer is None and ready:
                committer = asyncio.ensure_future(commit_ready())

        try:
            async with self.admission.slot(origin):
                metrics.INFLIGHT.labels(origin).inc()
                try:
                    parts: list[Buffer] = []
                    have = 0
                    cut = 0  # blocks cut from the stream

                    def cut_blocks() -> None:
                        nonlocal parts, have, cut
                        while cut < len(blocks) and have >= rec.block_len(blocks[cut]):
                            idx = blocks[cut]
                            n = rec.block_len(idx)
                            block, parts = _take(parts, n)
                            have -= n
                            (demand if idx <= demand_last else prefetch).inc(n)
                            ready.append((idx, block))
                            self._deliver(rec, idx, block)
                            cut += 1
                        kick()

                    stream = ns.storage.stream(rel, offset, length)
                    async for chunk in guarded(
                        stream, ns.origin_url, self.cfg.stall_window, self.cfg.min_rate
                    ):
                        parts.append(chunk)
                        have += len(chunk)
                        if cut < len(blocks) and have >= rec.block_len(blocks[cut]):
                            cut_blocks()
                        # bound the memory of blocks served but not yet on disk: a disk
                        # slower than the origin slows the transfer instead
                        while committer is not None and cut - done > MAX_BACKLOG_BLOCKS:
                            await asyncio.wait([committer])
                            kick()
                    cut_blocks()  # zero-length objects have a block with no bytes
                    while committer is not None:
                        await asyncio.wait([committer])
                        kick()
                    if cut < len(blocks):
                        got = have + sum(rec.block_len(i) for i in blocks[:cut])
                        raise Corrupt(
                            ns.storage.url_of(rel), f"origin sent {got} of {length} bytes promised"
                        )
                finally:
                    metrics.INFLIGHT.labels(origin).dec()
        except BaseException as e:
            if committer is not None:
                # let the batch in flight finish: its blocks are then committed, not lost
                await asyncio.wait([committer])
                if not committer.cancelled():
                    committer.exception()  # if it failed, its blocks are released below
            rest = blocks[done:]
            if rest:
                await asyncio.to_thread(self.index.release, rec, rest)
            failed = not isinstance(e, CacheFull | ObjectGone | asyncio.CancelledError)
            if done and failed and not rec.inline:
                # the origin did not deliver the run it promised (cut short, gone,
                # stalled, failed): none of it stays cached, not even the blocks that
                # arrived whole, since the object may have changed under the transfer
                await asyncio.to_thread(self._forget, rec, blocks[:done])
            if isinstance(e, NotFound | Corrupt):
                # the origin's object is not what the record says any more
                self.index.mark_stale(rec.key)
            if failed:
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

    def _forget(self, rec: Record, blocks: list[int]) -> None:
        for idx in blocks:
            self.index.drop_block(rec, idx)

    def _store(self, rec: Record, batch: list[tuple[int, list[Buffer]]]) -> bool:
        """In a thread: write blocks, checksum them and commit them to the index."""
        if rec.inline:
            data = b"".join(p for _, parts in batch for p in parts)
            return self.index.commit_inline(rec, data, block_crc(data))
        path = self.index.data_path(rec)
        crcs = [(idx, _write_block(path, idx * rec.block_size, parts)) for idx, parts in batch]
        return self.index.commit_blocks(rec, crcs)

    async def _commit(self, rec: Record, batch: list[tuple[int, list[Buffer]]]) -> None:
        try:
            ok = await asyncio.to_thread(self._store, rec, batch)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._full_until = time.monotonic() + 5
                if self.on_full is not None:
                    self.on_full()
                log.error(
                    "cache disk full while storing %s: serving from the origin uncached", rec.key
                )
                raise CacheFull(f"cache disk full: {e.strerror}") from None
            raise
        if not ok:
            raise ObjectGone(f"{rec.key} changed or was evicted while being fetched")
        for idx, _ in batch:
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
