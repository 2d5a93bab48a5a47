"""The HTTP application: FastAPI for the API surface, wrapped by the Edge (see edge.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from .. import __version__
from ..domain.errors import InvalidRequest, NotFound, QuotaStackError
from ..service import entitlements
from ..service.ports import Database
from ..service.subscriptions import ensure_subscription
from ..service.sweep import sweep
from ..service.tenants import hash_key
from ..store.database import SqliteDatabase
from .auth import Authenticator, RateLimiter, Unconfirmed, bearer, now_us
from .checks import CheckCache
from .edge import Edge, Metrics
from .mutations import Mutations
from .render import JSON, dumps, error_body, error_response
from .routes import COMPONENTS, build_router

log = logging.getLogger("quotastack")


@dataclass
class Settings:
    operator_key: str | None = None
    rate_limit_per_second: float = 0.0
    docs_dir: str | None = None
    # The background sweep (see service/sweep.py); 0 turns it off. It runs only where the server
    # runs the ASGI lifespan (``quotastack serve`` does).
    sweep_interval_seconds: float = 5.0
    # Check answers kept between checks on SQLite (see checks.py); 0 turns the cache off.
    check_cache_entries: int = 200_000
    # Whether the server warms that cache when it starts (``CheckCache.warm``; with the lifespan).
    check_cache_warm: bool = True


async def _sweeping(db: Database, interval_seconds: float) -> None:
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await db.run(sweep, db, now_us())
        except Exception:  # noqa: BLE001 - the next round tries again; requests never depend on it
            log.exception("sweep failed")


async def _warming(cache: CheckCache) -> None:
    started = time.perf_counter()
    try:
        kept = await cache.warm()
    except Exception:  # noqa: BLE001 - checks read what was not warmed; nothing depends on it
        log.exception("warming the check cache failed")
    else:
        log.info("check cache warmed: %d answers in %.1f s", kept, time.perf_counter() - started)


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "req_unknown"))


def create_app(db: Database, settings: Settings | None = None) -> Edge:
    settings = settings or Settings()
    auth = Authenticator(db, settings.operator_key, RateLimiter(settings.rate_limit_per_second))
    mutations = Mutations(db)
    metrics = Metrics()
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = []
        if settings.sweep_interval_seconds > 0:
            tasks.append(asyncio.create_task(_sweeping(db, settings.sweep_interval_seconds)))
        if cache is not None and settings.check_cache_warm:
            tasks.append(asyncio.create_task(_warming(cache)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="QuotaStack", version=__version__, default_response_class=JSON, lifespan=lifespan,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None,
                  description="Credit-native billing: exact ledger, real-time entitlements, "
                              "reservations, resetting quotas.")
    # The in-flight Idempotency-Key registry, reachable from the process (tests hold a claim to
    # stand for a request that is still running).
    app.state.mutations = mutations
    cache = CheckCache(db, settings.check_cache_entries) \
        if isinstance(db, SqliteDatabase) and settings.check_cache_entries > 0 else None
    app.state.check_cache = cache
    if cache is not None:
        metrics.extra.append(cache.metrics)
        auth.principals = cache
    elif getattr(db, "kind", "") == "postgresql":
        auth.unconfirmed = Unconfirmed()  # mutations confirm the kept principal in their unit of work

    scopes = ("entitlements:read", "read")

    def kept_answer(authorization: str | None, query: dict[str, str]) -> bytes | None:
        """The check's kept answer, authorised, when there is one; None sends the check down
        ``check_endpoint`` (which also answers every bad request). No statement, no await."""
        end_user_id = query.get("end_user_id")
        feature_key = query.get("feature_key")
        if cache is None or not end_user_id or len(end_user_id) > 255 or not feature_key or not authorization:
            return None
        hit = cache.get(end_user_id, hash_key(bearer(authorization)), feature_key, query.get("units", "1"), now_us())
        if hit is None:
            return None
        auth.permit(hit[0], scopes)
        return hit[1]

    async def check_endpoint(authorization: str | None, rid: str, query: dict[str, str]) -> dict[str, Any] | bytes:
        end_user_id = query.get("end_user_id")
        feature_key = query.get("feature_key")
        if not end_user_id or len(end_user_id) > 255 or not feature_key:
            auth.context(authorization, rid, scopes)  # a bad key is 401 before a bad query is 400
            if not end_user_id or len(end_user_id) > 255:
                raise InvalidRequest("end_user_id is required (1 to 255 characters)", "end_user_id")
            raise InvalidRequest("feature_key is required", "feature_key")
        key_hash = hash_key(bearer(authorization))
        units = query.get("units", "1")

        def work() -> dict[str, Any] | bytes:
            real_now = now_us()
            if cache is not None:
                generation = cache.generation
            # One statement reads the key's principal and everything the check needs.
            with db.reader() as tx:
                snap = tx.check_snapshot(key_hash, end_user_id, feature_key, real_now, horizon=cache is not None)
            ctx = auth.authorize(snap, rid, scopes, real_now)
            if cache is None:
                result = entitlements.evaluate(snap, ctx, end_user_id, feature_key, units)
            else:
                result, until = entitlements.evaluate_until(snap, ctx, end_user_id, feature_key, units)
            if result is entitlements.NEEDS_WRITE:
                with db.transaction() as tx:
                    ensure_subscription(tx, ctx, end_user_id)
                    result = entitlements.check(tx, ctx, end_user_id, feature_key, units)
            elif cache is not None:
                body = dumps(result)
                offset = snap["clock_offset_us"]
                cache.remember_principal(generation, key_hash, snap)
                cache.put(generation, end_user_id, snap["env_id"], feature_key, units, body, real_now,
                          None if until is None else until - offset)
                return body
            return result  # type: ignore[no-any-return]

        return await db.run(work)

    router, direct = build_router(db, auth, mutations, metrics, settings, check_endpoint)
    app.include_router(router)

    @app.exception_handler(QuotaStackError)
    async def on_domain_error(request: Request, exc: QuotaStackError) -> JSON:
        return error_response(exc, _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSON:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header")]
        param = ".".join(loc) or None
        return error_response(InvalidRequest(f"{param}: {first.get('msg')}" if param else first.get("msg", ""),
                                             param), _request_id(request))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSON:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"),
                                  _request_id(request))
        body = error_body(exc.status_code, "invalid_request_error", "invalid_request", str(exc.detail),
                          None, _request_id(request))
        return JSON(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSON:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(QuotaStackError("internal error: nothing was changed"), _request_id(request))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return Edge(app, check_endpoint, metrics, direct, kept_answer if cache is not None else None)
