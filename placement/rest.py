"""The HTTP plumbing shared by every REST module: Rucio's error envelope, exact content
types, x-json-stream listings, request-body parsing, token checking, and running catalog
work in worker threads (the catalog API is synchronous SQLAlchemy; aiohttp stays free).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from aiohttp import web
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from stashflow.placement import auth
from stashflow.placement.exceptions import RucioException

log = logging.getLogger("stashflow.placement.rest")

JSON = "application/json"
STREAM = "application/x-json-stream"
OCTET = "application/octet-stream"
T = TypeVar("T")
# Whole-transaction attempts on a lost race (unique key, deadlock, serialisation failure).
ATTEMPTS = 5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HTTPError(Exception):
    """An error whose class name on the wire is not one of ours (e.g. Rucio's 400
    `ValueError` for a missing token)."""

    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(message)
        self.status, self.name, self.message = status, name, message


def error_response(status: int, name: str, message: str) -> web.Response:
    # The headers repeat the body, truncated, as Rucio's generate_http_error does; header
    # values must be single-line latin-1.
    short = message[:125].encode("latin-1", "replace").decode("latin-1")
    short = short.replace("\r", " ").replace("\n", " ")
    body = json.dumps({"ExceptionClass": name, "ExceptionMessage": message})
    return web.Response(status=status, body=body.encode(),
                        headers={"Content-Type": OCTET, "ExceptionClass": name,
                                 "ExceptionMessage": short})


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(),
                        headers={"Content-Type": JSON})


def stream_response(items: Iterable[Any]) -> web.Response:
    body = b"".join(orjson.dumps(item) + b"\n" for item in items)
    return web.Response(status=200, body=body, headers={"Content-Type": STREAM})


def stream_response_with_infinity(items: Iterable[Any]) -> web.Response:
    """stream_response for the few small answers that may hold infinite quotas: orjson
    writes inf as null, which the client cannot do arithmetic with, whereas Rucio's
    encoder writes `Infinity` (which Python's json reads back as float('inf'))."""
    body = b"".join(json.dumps(item).encode() + b"\n" for item in items)
    return web.Response(status=200, body=body, headers={"Content-Type": STREAM})


# Lines per write of a streamed listing: large enough that a write costs little, small
# enough that the client starts parsing while the rest is still being produced.
STREAM_BATCH = 500


async def stream_lines(request: web.Request, items: Iterable[Any]) -> web.StreamResponse:
    """An x-json-stream listing produced while it is sent. The items are built lazily on
    the event loop, a batch at a time, so a long listing reaches the client early instead
    of after the last line is made."""
    response = web.StreamResponse(status=200, headers={"Content-Type": STREAM})
    await response.prepare(request)
    batch: list[bytes] = []
    for item in items:
        batch.append(orjson.dumps(item))
        if len(batch) == STREAM_BATCH:
            batch.append(b"")
            await response.write(b"\n".join(batch))
            batch = []
            # a write returns at once while the socket buffer has room: let the other
            # requests of this worker run between batches of a long listing
            await asyncio.sleep(0)
    if batch:
        batch.append(b"")
        await response.write(b"\n".join(batch))
    await response.write_eof()
    return response


def created(text: str = "Created") -> web.Response:
    return web.Response(status=201, text=text)


def ok() -> web.Response:
    return web.Response(status=200)


class Catalog:
    """Runs a function `fn(session, caller, ...)` in one transaction on a worker thread."""

    def __init__(self, factory: sessionmaker[Session], threads: int) -> None:
        self.factory = factory
        self.executor = ThreadPoolExecutor(max_workers=threads,
                                           thread_name_prefix="placement-db")

    async def call(self, request: web.Request | None, fn: Callable[..., T], *args: Any,
                   authenticated: bool = True) -> T:
        token = None
        if authenticated:
            assert request is not None
            token = request.headers.get("X-Rucio-Auth-Token")
            if not token:
                raise HTTPError(400, "ValueError", "Token must be set.")

        def work() -> T:
            for attempt in range(ATTEMPTS):
                committing = False
                try:
                    with self.factory.begin() as session:
                        caller = auth.validate(session, token).account if token else None
                        result = fn(session, caller, *args)
                        committing = True
                    return result
                except IntegrityError:
                    # A concurrent transaction inserted the same key first. Run again on
                    # the new state: the domain checks then answer as they would have
                    # (e.g. DuplicateRule), or the work succeeds (e.g. a shared request).
                    if attempt == ATTEMPTS - 1:
                        raise
                except OperationalError as exc:
                    # Serialisation failures and deadlocks on PostgreSQL are retried; the
                    # transaction was rolled back, so nothing was half-written. So is a
                    # connection that died (a database restart) before the commit: after
                    # a failed commit nobody knows whether the work landed.
                    dead = exc.connection_invalidated and not committing
                    if attempt == ATTEMPTS - 1 or not (dead or _retryable(exc)):
                        raise
                # Desynchronise the contenders before the next attempt.
                time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
            raise AssertionError("unreachable")

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, work)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _retryable(exc: OperationalError) -> bool:
    code = getattr(exc.orig, "sqlstate", None)
    return code in ("40001", "40P01") or "database is locked" in str(exc)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RucioException as exc:
        return error_response(exc.status, exc.name, exc.message)
    except HTTPError as exc:
        return error_response(exc.status, exc.name, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        name = {404: "NotFound", 405: "MethodNotAllowed", 413: "InvalidObject"}.get(
            exc.status, "RucioException")
        return error_response(exc.status, name, exc.reason or "error")
    except IntegrityError as exc:
        # A concurrent writer got there first; the transaction was rolled back.
        log.info("integrity error on %s %s: %s", request.method, request.path, exc.orig)
        return error_response(409, "Duplicate", "The object already exists or conflicts "
                                                "with a concurrent change; nothing was written")
    except Exception:  # the last line of defence: log it, answer with the envelope
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "RucioException", "Internal server error")


async def read_json(request: web.Request, *, allowed: set[str] | None = None,
                    required: Iterable[str] = (), default: Any = None,
                    kind: type = dict) -> Any:
    """The request body as JSON. The rucio client sends JSON without a Content-Type and
    also on DELETE, so the raw body is parsed whatever the headers say."""
    raw = await request.read()
    if not raw.strip():
        if default is not None or not list(required):
            return default if default is not None else kind()
        raise HTTPError(400, "ValueError", "cannot decode json parameter dictionary: the "
                                           "body is empty")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, "ValueError", f"cannot decode json parameter dictionary: "
                                           f"{exc}") from None
    if not isinstance(data, kind):
        raise HTTPError(400, "ValueError", f"the body must be a JSON "
                                           f"{'object' if kind is dict else 'list'}")
    if isinstance(data, dict):
        if allowed is not None:
            unknown = sorted(set(data) - allowed)
            if unknown:
                raise HTTPError(400, "InvalidObject",
                                f"Unknown field(s) in the request: {', '.join(unknown)}")
        missing = [key for key in required if key not in data]
        if missing:
            raise HTTPError(400, "KeyError", f"'{missing[0]}' not defined")
    return data


def query_flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("true", "1", "yes")
