"""Membership of a federation: the cache registers with the director, heartbeats, and
learns from the answer which namespaces exist, where their origins are and which need
tokens (so a site configures namespaces once, at the director).

Contract: docs/director.md, `POST /api/v1.0/director/registerCache`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import aiohttp

from stashflow.cache.config import CacheConfig

log = logging.getLogger("stashflow.cache")

# {prefix: (origin URLs, require_token, issuer or None, the issuer's token base path)}
NamespaceInfo = dict[str, tuple[list[str], bool, str | None, str]]


class Membership:
    def __init__(
        self,
        cfg: CacheConfig,
        status: Callable[[], dict[str, Any]],
        apply: Callable[[NamespaceInfo], None],
    ) -> None:
        assert cfg.director
        self.cfg = cfg
        self.director = cfg.director.rstrip("/")
        self.name = cfg.name or cfg.advertised_url or socket.gethostname()
        self._status = status
        self._apply = apply
        self.interval = 10.0
        self.registered = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def _headers(self) -> dict[str, str]:
        if self.cfg.registration_token:
            return {"Authorization": f"Bearer {self.cfg.registration_token}"}
        return {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._task = asyncio.create_task(self._loop())
        # serve only once the namespace map is known, but never hang on a dead director
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registered.wait(), timeout=10)
        if not self.registered.is_set():
            log.error("director %s not reached yet: serving configured namespaces only, "
                      "retrying in the background", self.director)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            # leave the candidate lists at once rather than after two missed heartbeats
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._session.post(
                    f"{self.director}/api/v1.0/director/unregisterCache",
                    json={"name": self.name}, headers=self._headers(),
                ):
                    pass
            await self._session.close()

    async def _loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.heartbeat()
                failures = 0
                await asyncio.sleep(self.interval)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                failures += 1
                (log.warning if failures < 3 else log.error)(
                    "cannot register with director %s: %s", self.director, e
                )
                await asyncio.sleep(min(self.interval, 2.0 * failures))

    async def heartbeat(self) -> None:
        assert self._session is not None
        status = self._status()
        body = {
            "name": self.name,
            "url": self.cfg.advertised_url,
            "load": status.get("load", 0.0),
            "free_bytes": status.get("free_bytes"),
        }
        if self.cfg.site:
            body["site"] = self.cfg.site
        async with self._session.post(
            f"{self.director}/api/v1.0/director/registerCache", json=body,
            headers=self._headers(),
        ) as resp:
            answer = await resp.json(content_type=None)
            if resp.status != 200:
                message = answer.get("error") if isinstance(answer, dict) else answer
                raise ValueError(f"HTTP {resp.status}: {message}")
        self.interval = float(answer.get("heartbeat_interval", self.interval))
        learned: NamespaceInfo = {}
        for prefix, info in (answer.get("namespaces") or {}).items():
            origins = info.get("origins") or []
            if origins:
                learned[prefix] = (list(origins), bool(info.get("require_token")),
                                   info.get("issuer"), info.get("token_base_path") or "/")
        self._apply(learned)
        if not self.registered.is_set():
            log.info("registered with director %s as %s (%d namespaces)", self.director,
                     self.name, len(learned))
        self.registered.set()
