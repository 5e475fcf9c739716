"""Fair admission of origin fetches: a cap per origin inside a global cap, shared in turn.

A stalled origin can hold at most `per_origin` fetch slots of a worker, so the other
origins keep `total - per_origin` slots. When slots are scarce, a freed slot goes to the
origins with waiting requests in turn (round robin), not to whichever request came first:
a burst for one origin cannot make a request for another wait behind all of it. Beyond
`queue_limit` waiters for one origin, or after `wait_limit` seconds in the queue, a
request is refused (429 + Retry-After) rather than queued forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Overloaded(Exception):
    def __init__(self, origin: str, waiting: int, why: str = "") -> None:
        super().__init__(
            why or f"origin {origin} has {waiting} requests waiting for a fetch slot"
        )
        self.origin = origin
        self.retry_after = 5


class Admission:
    def __init__(
        self, total: int, per_origin: int, queue_limit: int, wait_limit: float = 30.0
    ) -> None:
        self._free = total
        self._cap = per_origin
        self.queue_limit = queue_limit
        self.wait_limit = wait_limit
        self._active: dict[str, int] = {}
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._turn: deque[str] = deque()  # origins with waiters, next one first

    def active(self) -> dict[str, int]:
        return dict(self._active)

    def _eligible(self, origin: str) -> bool:
        return self._free > 0 and self._active.get(origin, 0) < self._cap

    def _grant(self, origin: str) -> None:
        self._free -= 1
        self._active[origin] = self._active.get(origin, 0) + 1

    def _release(self, origin: str) -> None:
        self._free += 1
        self._active[origin] -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiting requests, one origin after the other."""
        passed = 0
        while self._free > 0 and self._turn and passed < len(self._turn):
            origin = self._turn[0]
            self._turn.rotate(-1)
            queue = self._queues.get(origin)
            while queue and queue[0].done():  # cancelled or timed out waiters
                queue.popleft()
            if not queue:
                self._turn.remove(origin)
                passed = 0
                continue
            if not self._eligible(origin):
                passed += 1  # at its own cap: the others go first
                continue
            self._grant(origin)
            queue.popleft().set_result(None)
            if not queue:
                self._turn.remove(origin)
            passed = 0

    @contextlib.asynccontextmanager
    async def slot(self, origin: str) -> AsyncIterator[None]:
        queue = self._queues.setdefault(origin, deque())
        waiting = sum(1 for f in queue if not f.done())
        if waiting >= self.queue_limit:
            raise Overloaded(origin, waiting)
        if not waiting and self._eligible(origin):
            self._grant(origin)
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.append(granted)
            if origin not in self._turn:
                self._turn.append(origin)
            try:
                async with asyncio.timeout(self.wait_limit):
                    await asyncio.shield(granted)
            except BaseException as e:
                if granted.done() and not granted.cancelled():
                    self._release(origin)  # granted just as we gave up: pass it on
                else:
                    granted.cancel()
                if isinstance(e, TimeoutError):
                    raise Overloaded(
                        origin, waiting,
                        f"origin {origin}: no fetch slot free within {self.wait_limit:.0f}s "
                        f"({waiting + 1} requests waiting)",
                    ) from None
                raise
        try:
            yield
        finally:
            self._release(origin)
