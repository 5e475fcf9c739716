"""The placement server: the Rucio-compatible REST API, our `/stashflow/v1/` extensions
with their OpenAPI document, and the in-process judge-cleaner and judge-repairer."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from stashflow.placement import (
    auth,
    rules,
    statistics,
    web_accounts,
    web_dids,
    web_replicas,
    web_rses,
    web_rules,
)
from stashflow.placement import dids as did_api
from stashflow.placement import replicas as replica_api
from stashflow.placement.db import is_sqlite, make_engine, make_sessionmaker
from stashflow.placement.migrations import check_current
from stashflow.placement.models import DID, Lock, Replica, Request, Rule, RuleState
from stashflow.placement.rest import Catalog, errors_middleware, json_response, read_json

log = logging.getLogger("stashflow.placement.server")

CATALOG_KEY: web.AppKey[Catalog] = web.AppKey("catalog", Catalog)
# Long enough for a 1 MB DID name in a URL, so that it reaches our validation and gets
# Rucio's error envelope instead of the HTTP parser's bare 400.
MAX_LINE = 4 * 1024 * 1024
MAX_BODY = 256 * 1024 * 1024
# Seconds between checks of the planner statistics (a query; ANALYZE only when stale).
STATISTICS_INTERVAL = 5.0


def _openapi() -> dict[str, Any]:
    ok = {"200": {"description": "OK", "content": {"application/json": {}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "stashflow placement extensions", "version": "1"},
        "paths": {
            "/stashflow/v1/openapi.json": {"get": {"summary": "This document.",
                                                   "responses": ok}},
            "/stashflow/v1/stats": {"get": {
                "summary": "Catalog statistics: DIDs by type, replicas by state, rules by "
                           "state, locks by state, requests by state.",
                "responses": ok}},
            "/stashflow/v1/auth/revoke": {"post": {
                "summary": "Revoke the presented token, or {\"token\": T} (own or, for "
                           "admins, any).", "responses": {"200": {"description": "OK"}}}},
            "/stashflow/v1/datasets/{scope}/{name}/replicas": {"post": {
                "summary": "Bulk: register files as replicas on an RSE and attach them to "
                           "the dataset in one transaction. Body {\"rse\", \"files\"}.",
                "responses": {"201": {"description": "Created"}}}},
        },
    }


def _stats(session: Session, _caller: str) -> dict[str, Any]:
    def grouped(column: Any) -> dict[str, int]:
        rows = session.execute(select(column, func.count()).group_by(column)).all()
        return {getattr(k, "value", str(k)): int(n) for k, n in rows}

    return {"dids": grouped(DID.did_type), "replicas": grouped(Replica.state),
            "rules": grouped(Rule.state), "locks": grouped(Lock.state),
            "requests": grouped(Request.state)}


def extension_routes(catalog: Catalog) -> list[web.RouteDef]:
    async def openapi(_request: web.Request) -> web.Response:
        return json_response(_openapi())

    async def stats(request: web.Request) -> web.Response:
        return json_response(await catalog.call(request, _stats))

    async def bulk_dataset(request: web.Request) -> web.Response:
        scope, name = request.match_info["scope"], request.match_info["name"]
        body = await read_json(request, allowed={"rse", "files"}, required=("rse", "files"))

        def work(session: Session, caller: str) -> int:
            count = replica_api.add_replicas(session, caller, str(body["rse"]), body["files"])
            did_api.attach(session, caller, scope, name,
                           [{"scope": f["scope"], "name": f["name"]} for f in body["files"]])
            return count

        count = await catalog.call(request, work)
        return json_response({"registered": count}, status=201)

    return [
        web.get("/stashflow/v1/openapi.json", openapi),
        web.get("/stashflow/v1/stats", stats),
        web.post("/stashflow/v1/datasets/{scope}/{name:.+}/replicas", bulk_dataset),
    ]


def create_app(url: str, *, cleaner_interval: float = 60.0, repairer_interval: float = 60.0,
               threads: int | None = None, check_schema: bool = True) -> web.Application:
    """Build the application; raises SchemaNotCurrent on an unmigrated database."""
    if check_schema:
        check_current(url)
    engine = make_engine(url)
    # SQLite serialises writers anyway (BEGIN IMMEDIATE); one thread avoids busy waits.
    catalog = Catalog(make_sessionmaker(engine), threads or (1 if is_sqlite(engine) else 8))
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app[CATALOG_KEY] = catalog
    for module in (web_accounts, web_dids, web_replicas, web_rses, web_rules):
        app.add_routes(module.routes(catalog))
    app.add_routes(extension_routes(catalog))

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        # The background rounds run in one worker only (the others get no cleaner and no
        # repairer); an interval of 0 turns a round off.
        tasks = [] if cleaner_interval <= 0 else [
            asyncio.create_task(_cleaner(catalog, cleaner_interval)),
            asyncio.create_task(_statistics(engine))]
        if repairer_interval > 0:
            tasks.append(asyncio.create_task(_repairer(catalog, repairer_interval)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        catalog.close()
        engine.dispose()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _cleaner(catalog: Catalog, interval: float) -> None:
    """Judge-cleaner and token purge, in-process (Rucio runs these as daemons)."""
    def work(session: Session, _caller: None) -> int:
        auth.purge_expired(session)
        return rules.clean_expired(session)

    while True:
        await asyncio.sleep(interval)
        try:
            removed = await catalog.call(None, work, authenticated=False)
            if removed:
                log.info("judge-cleaner removed %d expired rule(s)", removed)
        except Exception:  # keep the loop alive; the next round retries
            log.exception("judge-cleaner round failed")


async def _repairer(catalog: Catalog, interval: float) -> None:
    """Judge-repairer, in-process (Rucio runs it as a daemon)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await repair_pass(catalog)
        except Exception:  # keep the loop alive; the next round retries
            log.exception("judge-repairer round failed")


async def repair_pass(catalog: Catalog, limit: int = rules.REPAIR_BATCH) -> int:
    """One pass over the longest-stuck rules, each repaired in its own transaction (so a
    rule that fails, or waits for a lock, does not hold the others back). Returns how
    many rules left STUCK."""
    def batch(session: Session, _caller: None) -> list[str]:
        return rules.stuck_rules(session, limit)

    def repair(session: Session, _caller: None, rule_id: str) -> rules.Repair | None:
        return rules.repair_rule(session, rule_id)

    unstuck = 0
    for rule_id in await catalog.call(None, batch, authenticated=False):
        try:
            result = await catalog.call(None, repair, rule_id, authenticated=False)
        except Exception:  # one rule's failure must not stop the pass
            log.exception("judge-repairer failed on rule %s", rule_id)
            continue
        if result is None:
            continue
        if result.changed:
            log.info("judge-repairer: %s", result)
        else:
            log.debug("judge-repairer: %s", result)
        unstuck += result.state != RuleState.STUCK
    return unstuck


async def _statistics(engine: Engine) -> None:
    """Planner statistics refreshed during bulk loads (see placement/statistics.py)."""
    if is_sqlite(engine):
        return
    failing = False
    while True:
        await asyncio.sleep(STATISTICS_INTERVAL)
        try:
            await asyncio.to_thread(statistics.refresh, engine)
            failing = False
        except Exception:  # keep the loop alive; say it once per spell of failures
            if not failing:
                log.exception("refreshing the planner statistics failed; will retry")
            failing = True


async def serve(url: str, host: str, port: int, *, reuse_port: bool = False,
                announce: bool = True, **options: Any) -> None:
    app = create_app(url, **options)
    runner = web.AppRunner(app, max_line_size=MAX_LINE, max_field_size=MAX_LINE,
                           access_log=logging.getLogger("stashflow.placement.access"))
    await runner.setup()
    _tune_gc()
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port)
    await site.start()
    if announce:
        log.info("placement server listening on http://%s:%d", host, port)
        print(f"placement server listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # A stop request lets in-flight requests and the open transaction finish.
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# Young-generation size of the cyclic garbage collector in a server process (CPython's
# default is 700 allocations).
GC_YOUNG = 10_000


def _tune_gc() -> None:
    """Keep the garbage collector off the objects every request shares. A listing holds
    tens of thousands of rows and lines until it is sent; they survive young collections,
    and each time enough of them have, CPython runs a full collection, which walks every
    object in the process: the modules, SQLAlchemy's mappers and compiled statements,
    aiohttp. Measured on `POST /replicas/list` of 10,000 files: 60 ms per full
    collection, 1.1 s of 1.3 s of collector time in a benchmark run. Frozen after
    start-up, that heap is left out of every collection (6 ms each); a larger young
    generation makes fewer collections of the same objects. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)


def _worker(url: str, host: str, port: int, index: int, log_level: str,
            options: dict[str, Any]) -> None:
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [w{index}] %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(url, host, port, reuse_port=True, announce=index == 0, **options))


def run_workers(url: str, host: str, port: int, workers: int, log_level: str = "INFO",
                **options: Any) -> int:
    """Serve with several processes sharing the port (SO_REUSEPORT); the database is the
    only shared state. Only the first runs the judge-cleaner and the judge-repairer, so
    rounds never race.
    Returns the exit status."""
    check_current(url)
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(workers):
        own = dict(options)
        if index > 0:
            own["cleaner_interval"] = 0.0
            own["repairer_interval"] = 0.0
        process = context.Process(target=_worker, name=f"placement-worker-{index}",
                                  args=(url, host, port, index, log_level, own))
        process.start()
        processes.append(process)
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    try:
        while processes:
            for process in list(processes):
                process.join(timeout=0.5)
                if process.exitcode is None:
                    continue
                processes.remove(process)
                if not stopping:
                    # One worker died: stop the others rather than serve at reduced capacity
                    # without anyone noticing.
                    log.error("%s exited with %s; stopping", process.name, process.exitcode)
                    status = 1
                    stop(signal.SIGTERM, None)
    finally:
        for process in processes:
            process.kill()
    return status
