"""Fair admission of origin fetches: a cap per origin inside a global cap.

A stalled origin can hold at most `per_origin` fetch slots of a worker, so the other
origins keep `total - per_origin` slots; beyond `queue_limit` waiters for one origin,
new requests are refused at once (429 + Retry-After) rather than queued forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Overloaded(Exception):
    def __init__(self, origin: str, waiting: int) -> None:
        super().__init__(f"origin {origin} has {waiting} requests waiting for a fetch slot")
        self.origin = origin
        self.retry_after = 5


class Admission:
    def __init__(self, total: int, per_origin: int, queue_limit: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_origin_cap = per_origin
        self._per_origin: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self.queue_limit = queue_limit

    def active(self) -> dict[str, int]:
        return dict(self._active)

    @contextlib.asynccontextmanager
    async def slot(self, origin: str) -> AsyncIterator[None]:
        waiting = self._waiting.get(origin, 0)
        if waiting >= self.queue_limit:
            raise Overloaded(origin, waiting)
        sem = self._per_origin.setdefault(origin, asyncio.Semaphore(self._per_origin_cap))
        self._waiting[origin] = waiting + 1
        try:
            # per-origin first: a request for a stalled origin must not hold a global slot
            await sem.acquire()
            try:
                await self._total.acquire()
            except BaseException:
                sem.release()
                raise
        finally:
            self._waiting[origin] -= 1
        self._active[origin] = self._active.get(origin, 0) + 1
        try:
            yield
        finally:
            self._active[origin] -= 1
            self._total.release()
            sem.release()
