"""Every route of the public API. Routes parse and authorise; services do the work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path as FilePath
from typing import Any

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import generate_latest
from pydantic import BaseModel

from ..domain import periods
from ..domain.errors import IdempotencyKeyInUse, InvalidRequest, NotFound, QuotaStackError
from ..service import (
    catalog, clock, credits, entitlements, queries, refunds, reservations, subscriptions, summaries, tenants, usage,
)
from ..service.context import Ctx
from ..service.ports import Database, Tx
from ..service.subscriptions import ensure_subscription
from . import schemas
from .auth import Authenticator, StalePrincipal, now_us
from .edge import Metrics
from .mutations import Mutations, fingerprint, idempotency_key, parse_json, validate
from .render import JSON, error_of

Limit = Query(50, ge=1, le=500)
After = Query(None, max_length=255)
DOCS = FilePath(__file__).resolve().parents[3] / "docs"


# Nested request models, for the OpenAPI document's components (see app.py).
COMPONENTS: dict[str, Any] = {}


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    COMPONENTS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _instant(value: str | None, param: str) -> int | None:
    return None if value is None else periods.parse_rfc3339(value, param)


def build_router(db: Database, auth: Authenticator, mutations: Mutations, metrics: Metrics,
                 settings: Any, check: Callable[..., Awaitable[dict[str, Any]]],
                 ) -> tuple[APIRouter, dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]]:
    """The router, and the hot fixed-path mutations the Edge may call directly (see edge.py)."""
    r = APIRouter()

    def rid(request: Request) -> str:
        return str(request.scope["state"]["request_id"])

    def ctx_for(request: Request, *scopes: str) -> Ctx:
        return auth.context(request.headers.get("authorization"), rid(request), scopes)

    async def mutate(request: Request, scope: str, model: type[BaseModel] | None,
                     work: Callable[[Tx, Ctx, dict[str, Any]], Any], status: int = 200,
                     object_ids: tuple[str, ...] = ()) -> Response:
        raw, method, path = await request.body(), request.method, request.scope["path"]

        def unit() -> Any:
            # Authentication, parsing and the unit of work in one call of db.run: on PostgreSQL
            # that is one hop to a store thread, whose connection reads the key and then runs
            # the transaction; the event loop never waits on the database.
            # A kept principal (PostgreSQL) is confirmed inside the unit of work; if it was stale,
            # everything is undone and run again with the key read afresh.
            header = request.headers.get("authorization")
            ctx, confirm = auth.unit_context(header, rid(request), (scope,))

            def afresh() -> Ctx:
                """The key read now: its own refusal (401, 403) comes before any other answer.
                This request's rate-limit token is already taken."""
                if confirm is not None and auth.unconfirmed is not None:
                    auth.unconfirmed.forget(confirm[0])
                return auth.context(header, rid(request), (scope,), take=False)

            try:
                data = validate(model, parse_json(raw)) if model else _empty(raw)
                key = idempotency_key(request.headers.get("idempotency-key"))
                if model is schemas.UsageIn:
                    key = _usage_key(key, data)
            except QuotaStackError:
                if confirm is not None:  # answered before the unit of work could confirm the key
                    afresh()
                raise
            # The fingerprint matters only to a stored key (hashing a batch's body is not free).
            print_ = fingerprint(method, path, data) if key is not None else ""
            try:
                return mutations.execute(ctx, key, print_, lambda tx: work(tx, ctx, data), status, method,
                                         path, list(object_ids), confirm)
            except IdempotencyKeyInUse:
                if confirm is not None:  # this process's claim answers before the unit of work
                    afresh()
                raise
            except StalePrincipal:
                fresh = afresh()  # confirmed by nothing else
                return mutations.execute(fresh, key, print_, lambda tx: work(tx, fresh, data), status, method,
                                         path, list(object_ids))

        outcome = await db.run(unit)
        headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
        return JSON(outcome.body, status_code=outcome.status, headers=headers)

    async def read(request: Request, fn: Callable[[Tx, Ctx], Any], *, settle: bool = False,
                   scopes: tuple[str, ...] = ("read",)) -> Response:
        def work() -> Any:
            ctx = ctx_for(request, *scopes)
            with (db.transaction() if settle else db.reader()) as tx:
                return fn(tx, ctx)

        return JSON(await db.run(work))

    # ---- service endpoints (no key) -------------------------------------------------------------

    @r.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz", tags=["service"])
    async def readyz() -> Response:
        def probe() -> None:
            with db.reader() as tx:
                tx.get("tenants", id="")

        try:
            await db.run(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSON({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSON({"status": "ready", "database": getattr(db, "kind", "unknown")})

    @r.get("/metrics", tags=["service"])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @r.get("/llms.txt", tags=["service"], response_class=PlainTextResponse)
    async def llms_txt() -> Response:
        return _doc_file(FilePath(settings.docs_dir) if settings.docs_dir else DOCS, "llms.txt")

    @r.get("/docs/{page}.md", tags=["service"], response_class=PlainTextResponse)
    async def doc_page(page: str) -> Response:
        return _doc_file(FilePath(settings.docs_dir) if settings.docs_dir else DOCS, f"{page}.md")

    # ---- tenants and keys -----------------------------------------------------------------------

    @r.post("/v1/tenants", status_code=201, tags=["tenants"], openapi_extra=_body_schema(schemas.TenantIn))
    async def create_tenant(request: Request) -> Response:
        auth.operator(request.headers.get("authorization"))
        data = validate(schemas.TenantIn, parse_json(await request.body()))

        def work() -> Any:
            with db.transaction() as tx:
                return tenants.create_tenant(tx, data["name"], now_us())

        return JSON(await db.run(work), status_code=201)

    @r.post("/v1/api_keys", status_code=201, tags=["tenants"], openapi_extra=_body_schema(schemas.ApiKeyIn))
    async def create_key(request: Request) -> Response:
        return await mutate(request, "keys:write", schemas.ApiKeyIn,
                            lambda tx, ctx, d: tenants.create_key(tx, ctx, d["name"], d["scopes"]), 201)

    @r.get("/v1/api_keys", tags=["tenants"])
    async def list_keys(request: Request, limit: int = Limit, starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.api_keys(tx, ctx, limit, starting_after))

    @r.delete("/v1/api_keys/{key_id}", tags=["tenants"])
    async def revoke_key(request: Request, key_id: str) -> Response:
        return await mutate(request, "keys:write", None,
                            lambda tx, ctx, d: tenants.revoke_key(tx, ctx, key_id), object_ids=(key_id,))

    # ---- catalog --------------------------------------------------------------------------------

    @r.post("/v1/features", status_code=201, tags=["catalog"], openapi_extra=_body_schema(schemas.FeatureIn))
    async def create_feature(request: Request) -> Response:
        return await mutate(request, "catalog:write", schemas.FeatureIn, catalog.create_feature, 201)

    @r.get("/v1/features", tags=["catalog"])
    async def list_features(request: Request, limit: int = Limit, starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.features(tx, ctx, limit, starting_after))

    @r.get("/v1/features/{key}", tags=["catalog"])
    async def get_feature(request: Request, key: str) -> Response:
        return await read(request, lambda tx, ctx: catalog.get_feature(tx, ctx, key))

    @r.post("/v1/features/{key}", tags=["catalog"], openapi_extra=_body_schema(schemas.FeatureUpdate))
    async def update_feature(request: Request, key: str) -> Response:
        return await mutate(request, "catalog:write", schemas.FeatureUpdate,
                            lambda tx, ctx, d: catalog.update_feature(tx, ctx, key, d))

    @r.post("/v1/plans", status_code=201, tags=["catalog"], openapi_extra=_body_schema(schemas.PlanIn))
    async def create_plan(request: Request) -> Response:
        return await mutate(request, "catalog:write", schemas.PlanIn, catalog.create_plan, 201)

    @r.get("/v1/plans", tags=["catalog"])
    async def list_plans(request: Request, limit: int = Limit, starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.plans(tx, ctx, limit, starting_after))

    @r.get("/v1/plans/{plan_id}", tags=["catalog"])
    async def get_plan(request: Request, plan_id: str) -> Response:
        return await read(request, lambda tx, ctx: catalog.get_plan(tx, ctx, plan_id))

    @r.post("/v1/plans/{plan_id}/variants", status_code=201, tags=["catalog"],
            openapi_extra=_body_schema(schemas.VariantIn))
    async def create_variant(request: Request, plan_id: str) -> Response:
        return await mutate(request, "catalog:write", schemas.VariantIn,
                            lambda tx, ctx, d: catalog.create_variant(tx, ctx, plan_id, d), 201, (plan_id,))

    @r.get("/v1/plans/{plan_id}/variants", tags=["catalog"])
    async def list_variants(request: Request, plan_id: str, limit: int = Limit,
                            starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.variants(
            tx, ctx, catalog.find_plan(tx, ctx, plan_id)["id"], limit, starting_after))

    @r.get("/v1/plans/{plan_id}/variants/{variant_id}", tags=["catalog"])
    async def get_variant(request: Request, plan_id: str, variant_id: str) -> Response:
        return await read(request, lambda tx, ctx: catalog.get_variant(tx, ctx, variant_id, plan_id))

    @r.get("/v1/plan_variants/{variant_id}", tags=["catalog"])
    async def get_variant_by_id(request: Request, variant_id: str) -> Response:
        return await read(request, lambda tx, ctx: catalog.get_variant(tx, ctx, variant_id))

    @r.post("/v1/packs", status_code=201, tags=["catalog"], openapi_extra=_body_schema(schemas.PackIn))
    async def create_pack(request: Request) -> Response:
        return await mutate(request, "catalog:write", schemas.PackIn, catalog.create_pack, 201)

    @r.get("/v1/packs", tags=["catalog"])
    async def list_packs(request: Request, limit: int = Limit, starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.packs(tx, ctx, limit, starting_after))

    @r.get("/v1/packs/{key}", tags=["catalog"])
    async def get_pack(request: Request, key: str) -> Response:
        return await read(request, lambda tx, ctx: catalog.get_pack(tx, ctx, key))

    @r.post("/v1/packs/{key}/purchase", status_code=201, tags=["credits"],
            openapi_extra=_body_schema(schemas.PurchaseIn))
    async def purchase_pack(request: Request, key: str) -> Response:
        return await mutate(request, "credits:write", schemas.PurchaseIn,
                            lambda tx, ctx, d: credits.purchase_pack(tx, ctx, key, d), 201)

    # ---- subscriptions ----------------------------------------------------------------------------

    @r.post("/v1/subscriptions", status_code=201, tags=["subscriptions"],
            openapi_extra=_body_schema(schemas.SubscriptionIn))
    async def create_subscription(request: Request) -> Response:
        return await mutate(request, "subscriptions:write", schemas.SubscriptionIn,
                            subscriptions.create_subscription, 201)

    @r.get("/v1/subscriptions", tags=["subscriptions"])
    async def list_subscriptions(request: Request, end_user_id: str | None = Query(None, max_length=255),
                                 status: str | None = Query(None), limit: int = Limit,
                                 starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.subscriptions(tx, ctx, end_user_id, status, limit,
                                                                         starting_after))

    @r.get("/v1/subscriptions/{subscription_id}", tags=["subscriptions"])
    async def get_subscription(request: Request, subscription_id: str) -> Response:
        return await read(request, lambda tx, ctx: subscriptions.get_subscription(tx, ctx, subscription_id))

    @r.post("/v1/subscriptions/{subscription_id}/change", tags=["subscriptions"],
            openapi_extra=_body_schema(schemas.ChangeIn))
    async def change_subscription(request: Request, subscription_id: str) -> Response:
        return await mutate(request, "subscriptions:write", schemas.ChangeIn,
                            lambda tx, ctx, d: subscriptions.change(tx, ctx, subscription_id, d),
                            object_ids=(subscription_id,))

    @r.post("/v1/subscriptions/{subscription_id}/pause", tags=["subscriptions"])
    async def pause_subscription(request: Request, subscription_id: str) -> Response:
        return await mutate(request, "subscriptions:write", None,
                            lambda tx, ctx, d: subscriptions.pause(tx, ctx, subscription_id),
                            object_ids=(subscription_id,))

    @r.post("/v1/subscriptions/{subscription_id}/resume", tags=["subscriptions"])
    async def resume_subscription(request: Request, subscription_id: str) -> Response:
        return await mutate(request, "subscriptions:write", None,
                            lambda tx, ctx, d: subscriptions.resume(tx, ctx, subscription_id),
                            object_ids=(subscription_id,))

    @r.post("/v1/subscriptions/{subscription_id}/cancel", tags=["subscriptions"],
            openapi_extra=_body_schema(schemas.CancelIn))
    async def cancel_subscription(request: Request, subscription_id: str) -> Response:
        return await mutate(request, "subscriptions:write", schemas.CancelIn,
                            lambda tx, ctx, d: subscriptions.cancel(tx, ctx, subscription_id, d),
                            object_ids=(subscription_id,))

    @r.post("/v1/subscriptions/{subscription_id}/renew", tags=["subscriptions"])
    async def renew_subscription(request: Request, subscription_id: str) -> Response:
        return await mutate(request, "subscriptions:write", None,
                            lambda tx, ctx, d: subscriptions.renew(tx, ctx, subscription_id),
                            object_ids=(subscription_id,))

    # ---- credits ----------------------------------------------------------------------------------

    @r.post("/v1/grants", status_code=201, tags=["credits"], openapi_extra=_body_schema(schemas.GrantIn))
    async def create_grant(request: Request) -> Response:
        return await mutate(request, "credits:write", schemas.GrantIn, credits.grant, 201)

    @r.post("/v1/grants/{block_id}/void", tags=["credits"])
    async def void_grant(request: Request, block_id: str) -> Response:
        return await mutate(request, "credits:write", None,
                            lambda tx, ctx, d: credits.void(tx, ctx, block_id), object_ids=(block_id,))

    @r.get("/v1/grants/{block_id}", tags=["credits"])
    async def get_grant(request: Request, block_id: str) -> Response:
        return await read(request, lambda tx, ctx: credits.get_block(tx, ctx, block_id))

    @r.get("/v1/balances/{end_user_id:path}", tags=["credits"])
    async def get_balances(request: Request, end_user_id: str = Path(min_length=1, max_length=255),
                           feature_key: str | None = None, at: str | None = None) -> Response:
        at_us = _instant(at, "at")
        return await read(request, lambda tx, ctx: credits.balances(tx, ctx, end_user_id, feature_key, at_us),
                          settle=True)

    # ---- entitlements -------------------------------------------------------------------------------

    @r.get("/v1/entitlements/check", tags=["entitlements"])
    async def check_entitlement(request: Request, end_user_id: str = Query(..., max_length=255),
                                feature_key: str = Query(...), units: str = Query("1")) -> Response:
        """Answered by the Edge's fast path; this route documents it and serves as its twin."""
        answer = await check(request.headers.get("authorization"), rid(request),
                             {"end_user_id": end_user_id, "feature_key": feature_key, "units": units})
        # A kept answer comes rendered already (see checks.py).
        return Response(answer, media_type="application/json") if isinstance(answer, bytes) else JSON(answer)

    @r.get("/v1/entitlements", tags=["entitlements"])
    async def list_entitlements(request: Request, end_user_id: str = Query(..., min_length=1, max_length=255),
                                ) -> Response:
        def work() -> Any:
            ctx = ctx_for(request, "entitlements:read", "read")
            with db.reader() as tx:
                result = entitlements.entitlements(tx, ctx, end_user_id)
            if result is entitlements.NEEDS_WRITE:
                with db.transaction() as tx:
                    ensure_subscription(tx, ctx, end_user_id)
                    result = entitlements.entitlements(tx, ctx, end_user_id)
            return result

        return JSON(await db.run(work))

    # ---- usage --------------------------------------------------------------------------------------

    @r.post("/v1/usage", status_code=201, tags=["usage"], openapi_extra=_body_schema(schemas.UsageIn))
    async def record_usage(request: Request) -> Response:
        return await mutate(request, "usage:write", schemas.UsageIn, usage.record_usage, 201)

    @r.post("/v1/usage/batch", tags=["usage"], openapi_extra=_body_schema(schemas.UsageBatchIn))
    async def record_usage_batch(request: Request) -> Response:
        return await mutate(request, "usage:write", schemas.UsageBatchIn,
                            lambda tx, ctx, d: _batch(mutations, tx, ctx, d["events"]))

    @r.get("/v1/usage/summary", tags=["usage"])
    async def usage_summary(request: Request, end_user_id: str = Query(..., max_length=255),
                            feature_key: str = Query(...), from_: str | None = Query(None, alias="from"),
                            to: str | None = None) -> Response:
        lo, hi = _instant(from_, "from"), _instant(to, "to")
        return await read(request, lambda tx, ctx: summaries.summary(tx, ctx, end_user_id, feature_key, lo, hi))

    @r.get("/v1/usage/{usage_id}", tags=["usage"])
    async def get_usage(request: Request, usage_id: str) -> Response:
        return await read(request, lambda tx, ctx: queries.usage_event(tx, ctx, usage_id))

    # ---- reservations and refunds ------------------------------------------------------------------

    @r.post("/v1/reservations", status_code=201, tags=["reservations"],
            openapi_extra=_body_schema(schemas.ReservationIn))
    async def create_reservation(request: Request) -> Response:
        return await mutate(request, "reservations:write", schemas.ReservationIn, reservations.reserve, 201)

    @r.post("/v1/reservations/{reservation_id}/commit", tags=["reservations"],
            openapi_extra=_body_schema(schemas.CommitIn))
    async def commit_reservation(request: Request, reservation_id: str) -> Response:
        return await mutate(request, "reservations:write", schemas.CommitIn,
                            lambda tx, ctx, d: reservations.commit(tx, ctx, reservation_id, d),
                            object_ids=(reservation_id,))

    @r.post("/v1/reservations/{reservation_id}/release", tags=["reservations"])
    async def release_reservation(request: Request, reservation_id: str) -> Response:
        return await mutate(request, "reservations:write", None,
                            lambda tx, ctx, d: reservations.release(tx, ctx, reservation_id),
                            object_ids=(reservation_id,))

    @r.post("/v1/reservations/{reservation_id}/extend", tags=["reservations"],
            openapi_extra=_body_schema(schemas.ExtendIn))
    async def extend_reservation(request: Request, reservation_id: str) -> Response:
        return await mutate(request, "reservations:write", schemas.ExtendIn,
                            lambda tx, ctx, d: reservations.extend(tx, ctx, reservation_id, d),
                            object_ids=(reservation_id,))

    @r.get("/v1/reservations/{reservation_id}", tags=["reservations"])
    async def get_reservation(request: Request, reservation_id: str) -> Response:
        return await read(request, lambda tx, ctx: reservations.get(tx, ctx, reservation_id))

    @r.get("/v1/reservations", tags=["reservations"])
    async def list_reservations(request: Request, end_user_id: str | None = Query(None, max_length=255),
                                status: str | None = None, limit: int = Limit,
                                starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.reservations(tx, ctx, end_user_id, status, limit,
                                                                        starting_after), settle=True)

    @r.post("/v1/refunds", status_code=201, tags=["credits"], openapi_extra=_body_schema(schemas.RefundIn))
    async def create_refund(request: Request) -> Response:
        return await mutate(request, "credits:write", schemas.RefundIn, refunds.refund, 201)

    # ---- sandbox clock ------------------------------------------------------------------------------

    @r.get("/v1/test_clock", tags=["sandbox"])
    async def get_test_clock(request: Request) -> Response:
        return await read(request, clock.get_clock)

    @r.post("/v1/test_clock/advance", tags=["sandbox"], openapi_extra=_body_schema(schemas.ClockAdvanceIn))
    async def advance_test_clock(request: Request) -> Response:
        return await mutate(request, "admin", schemas.ClockAdvanceIn, clock.advance)

    # ---- ledger, events, audit ------------------------------------------------------------------------

    @r.get("/v1/ledger", tags=["ledger"])
    async def list_ledger(request: Request, end_user_id: str | None = Query(None, max_length=255),
                          feature_key: str | None = None, type: str | None = None,
                          from_: str | None = Query(None, alias="from"), to: str | None = None,
                          reservation_id: str | None = None, usage_id: str | None = None,
                          limit: int = Limit, starting_after: str | None = After) -> Response:
        if type is not None and type not in queries.LEDGER_TYPES:
            raise InvalidRequest(f"type must be one of {', '.join(queries.LEDGER_TYPES)}", "type")
        lo, hi = _instant(from_, "from"), _instant(to, "to")
        filters = {"end_user_id": end_user_id, "feature_key": feature_key, "type": type,
                   "reservation_id": reservation_id, "usage_id": usage_id}

        def fn(tx: Tx, ctx: Ctx) -> Any:
            queries.settle_end_user(tx, ctx, end_user_id)
            return queries.ledger(tx, ctx, filters, lo, hi, limit, starting_after)

        return await read(request, fn, settle=True)

    @r.get("/v1/ledger/{entry_id}", tags=["ledger"])
    async def get_ledger_entry(request: Request, entry_id: str) -> Response:
        return await read(request, lambda tx, ctx: queries.ledger_entry(tx, ctx, entry_id))

    @r.get("/v1/events", tags=["events"])
    async def list_events(request: Request, type: str | None = None, limit: int = Limit,
                          starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.events(tx, ctx, type, limit, starting_after))

    @r.get("/v1/events/{event_id}", tags=["events"])
    async def get_event(request: Request, event_id: str) -> Response:
        return await read(request, lambda tx, ctx: queries.event(tx, ctx, event_id))

    @r.get("/v1/audit_log", tags=["ledger"])
    async def list_audit(request: Request, limit: int = Limit, starting_after: str | None = After) -> Response:
        return await read(request, lambda tx, ctx: queries.audit_log(tx, ctx, limit, starting_after))

    direct = {("POST", "/v1/usage"): record_usage, ("POST", "/v1/usage/batch"): record_usage_batch,
              ("POST", "/v1/reservations"): create_reservation, ("POST", "/v1/grants"): create_grant}
    return r, direct


def _empty(raw: bytes) -> dict[str, Any]:
    data = parse_json(raw)
    if data not in ({}, None):
        raise InvalidRequest("this call takes no body")
    return {}


def _usage_key(header_key: str | None, data: dict[str, Any]) -> str | None:
    body_key = data.pop("idempotency_key", None)
    if header_key is not None and body_key is not None and header_key != body_key:
        raise InvalidRequest("the Idempotency-Key header and idempotency_key differ", "idempotency_key")
    return header_key or body_key


def _batch(mutations: Mutations, tx: Tx, ctx: Ctx, events: list[Any]) -> dict[str, Any]:
    """Each event stands alone, as if sent alone: its own outcome, its own idempotency key.

    Events run grouped by end user, in the order of their ids (each end user's events in the
    order sent): a batch locks end users in that order and keeps the locks until it commits, so
    two batches can never wait on each other in a cycle. ``usage.record_batch`` records the plain
    events (valid, no idempotency key) of most end users together; the rest go one by one through
    ``_batch_event``, each in its own savepoint. Results come back in the order sent.
    """
    slots: list[dict[str, Any] | None] = [None] * len(events)

    users = [str(raw.get("end_user_id", "")) if isinstance(raw, dict) else "" for raw in events]
    plain: list[tuple[int, str, dict[str, Any] | None]] = []
    for i in sorted(range(len(events)), key=users.__getitem__):
        data = schemas.plain_usage(events[i])
        if data is None and isinstance(events[i], dict) and events[i].get("idempotency_key") is None:
            try:
                data = validate(schemas.UsageIn, events[i])
            except QuotaStackError:
                data = None  # _batch_event reports it
            else:
                data.pop("idempotency_key", None)
        plain.append((i, users[i], data))
    outcomes = usage.record_batch(tx, ctx, plain, lambda i: _batch_event(mutations, tx, ctx, i, events[i]))
    for i, (kind, value) in outcomes.items():
        if kind == "slow":
            slots[i] = value
        elif kind == "ok":
            slots[i] = {"status": 201, "usage": value}
        else:
            slots[i] = _refused(value, i, ctx)
    return {"object": "usage_batch", "results": slots}


def _refused(exc: QuotaStackError, i: int, ctx: Ctx) -> dict[str, Any]:
    if exc.param is not None:
        exc.param = f"events[{i}].{exc.param}"
    return {"status": exc.status, "error": error_of(exc, ctx.request_id)["error"]}


def _batch_event(mutations: Mutations, tx: Tx, ctx: Ctx, i: int, raw: Any) -> dict[str, Any]:
    try:
        with tx.savepoint():
            data = validate(schemas.UsageIn, raw)
            key = _usage_key(None, data)
            print_ = fingerprint("POST", "/v1/usage", data)
            with mutations.claim(ctx, key):
                outcome = mutations.once(tx, ctx, key, print_, lambda t: usage.record_usage(t, ctx, data), 201)
    except QuotaStackError as exc:
        return _refused(exc, i, ctx)
    entry: dict[str, Any] = {"status": outcome.status}
    if outcome.status >= 300:
        # A stored outcome (402…) names its param as a single usage would: point it at the event.
        error = orjson.loads(outcome.body)["error"]
        if error["param"] is not None:
            error["param"] = f"events[{i}].{error['param']}"
        entry["error"] = error
    else:
        entry["usage"] = outcome.result if outcome.result is not None else orjson.Fragment(outcome.body)
    if outcome.replayed:
        entry["replayed"] = True
    return entry


def _doc_file(root: FilePath, name: str) -> Response:
    path = (root / name).resolve()
    if path.parent != root.resolve() or not path.is_file():
        raise NotFound(f"no document {name!r}")
    return PlainTextResponse(path.read_text(encoding="utf-8"), media_type="text/markdown; charset=utf-8")
