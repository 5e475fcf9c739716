"""Several origins of one namespace behind one storage interface.

A namespace the director knows from several origins (replicas of the same export) is
fetched from the one that answered last; when it is unavailable (refused, unreachable,
a server error) the next is tried, and the one that answers becomes the first for the
following requests. An answer about the object itself (not found, denied, corrupt) is
the answer: the origins hold the same data, so asking the others would only hide it.
A transfer that breaks after its first byte is not resumed elsewhere: the fetch fails
like any broken transfer and the next fetch starts on the next origin.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from stashflow.integration.storage import ObjectInfo, Storage, Unavailable
from stashflow.integration.storage.base import DEFAULT_CHUNK

log = logging.getLogger("stashflow.cache")
T = TypeVar("T")


class OriginSet(Storage):
    scheme = "origins"

    def __init__(self, members: list[Storage]) -> None:
        if not members:
            raise ValueError("an origin set needs at least one origin")
        super().__init__(members[0].url)
        self.members = members
        self._first = 0
        self.conditional_reads = all(m.conditional_reads for m in members)

    def _in_turn(self) -> list[tuple[int, Storage]]:
        n = len(self.members)
        return [((self._first + i) % n, self.members[(self._first + i) % n]) for i in range(n)]

    def _answered(self, index: int) -> None:
        if index != self._first:
            log.warning("origin %s answers; using it first from now on", self.members[index].url)
            self._first = index
            self.url = self.members[index].url

    async def _each(self, op: Callable[[Storage], Awaitable[T]]) -> T:
        failure: Unavailable | None = None
        for index, member in self._in_turn():
            try:
                result = await op(member)
            except Unavailable as e:
                log.warning("origin %s unavailable (%s); trying the next", member.url, e.reason)
                failure = e
                continue
            self._answered(index)
            return result
        assert failure is not None
        raise failure

    def url_of(self, path: str) -> str:
        return self.members[self._first].url_of(path)

    async def stat(self, path: str) -> ObjectInfo:
        return await self._each(lambda s: s.stat(path))

    async def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._each(lambda s: s.read(path, offset, length))

    async def stream(
        self, path: str, offset: int = 0, length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK, *, if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        failure: Unavailable | None = None
        for index, member in self._in_turn():
            chunks = member.stream(path, offset, length, chunk_size, if_match=if_match)
            try:
                first = await anext(chunks, None)
            except Unavailable as e:
                log.warning("origin %s unavailable (%s); trying the next", member.url, e.reason)
                failure = e
                await chunks.aclose()
                continue
            self._answered(index)
            if first is None:
                return
            yield first
            async for chunk in chunks:
                yield chunk
            return
        assert failure is not None
        raise failure

    async def write(self, path: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        # a cache never writes to its origins; a body stream could not be replayed anyway
        return await self.members[self._first].write(path, data)

    async def delete(self, path: str) -> None:
        await self.members[self._first].delete(path)

    async def list(self, path: str = "") -> list[ObjectInfo]:
        return await self._each(lambda s: s.list(path))

    async def server_checksum(self, path: str, algorithm: str) -> str | None:
        return await self._each(lambda s: s.server_checksum(path, algorithm))

    async def close(self) -> None:
        for member in self.members:
            await member.close()
