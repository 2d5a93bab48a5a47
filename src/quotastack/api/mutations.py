"""Running a mutation: auth, body, idempotency, the unit of work, the audit record.

The idempotency record is written in the same transaction as the change it guards, so a crash
leaves both or neither. Outcomes of real work (success, ``402``, ``409 invalid_state``) are
stored and replayed; requests rejected before any work (``400``, ``401``, ``403``, ``404``)
are not, so fixing and retrying with the same key works.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from ..domain.errors import IdempotencyKeyInUse, IdempotencyKeyReused, InvalidRequest, QuotaStackError
from ..domain.ids import new_id
from ..service.codec import dumps as dumps_column
from ..service.codec import integer
from ..service.context import Ctx
from ..service.ports import Database, Tx
from .auth import Confirm, StalePrincipal
from .render import dumps, error_of

STORED_CODES = frozenset({"insufficient_balance", "invalid_state", "subscription_exists"})
Work = Callable[[Tx], Any]


def parse_json(raw: bytes) -> Any:
    """The body, with every non-integer number an exact Decimal.

    Refused as 400, not left to fail later: nesting too deep to handle, text that no JSON
    encoder can write back (a lone surrogate), and NUL characters (PostgreSQL stores no NUL in
    text). Integers too big for 64 bits become Decimals, so an amount is "out of range"
    (``invalid_amount``) and any other field a wrong type.
    """
    if not raw.strip():
        return {}
    if b"\\u0000" in raw:
        raise InvalidRequest("the body contains a NUL character (\\u0000)")
    try:
        data = json.loads(raw, parse_float=Decimal, parse_int=integer, parse_constant=_no_constant)
        orjson.dumps(data, default=str)
    except (ValueError, UnicodeDecodeError, RecursionError, orjson.JSONEncodeError) as exc:
        raise InvalidRequest(f"malformed JSON body: {exc}") from None
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def validate(model: type[BaseModel], data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data).model_dump(exclude_unset=getattr(model, "partial", False))
    except ValidationError as exc:
        raise invalid_from(exc) from None


def invalid_from(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ""
    for part in first["loc"]:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "missing field"
    return InvalidRequest(f"{param}: {message}" if param else message, param or None)


def idempotency_key(header: str | None) -> str | None:
    if header is None:
        return None
    if not 1 <= len(header) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", "Idempotency-Key")
    return header


def fingerprint(method: str, path: str, data: Any) -> str:
    canonical = orjson.dumps([method, path, data], default=str, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class Outcome:
    __slots__ = ("status", "body", "replayed", "result")

    def __init__(self, status: int, body: bytes, replayed: bool, result: Any = None) -> None:
        self.status, self.body, self.replayed, self.result = status, body, replayed, result


class Mutations:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._running: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    @contextmanager
    def claim(self, ctx: Ctx, key: str | None) -> Iterator[None]:
        """Refuse a key that a request of this process is still working on."""
        if key is None:
            yield
            return
        slot = (ctx.env_id, key)
        with self._lock:
            if slot in self._running:
                raise IdempotencyKeyInUse("a request with this Idempotency-Key is still being processed",
                                          "Idempotency-Key")
            self._running.add(slot)
        try:
            yield
        finally:
            with self._lock:
                self._running.discard(slot)

    def once(self, tx: Tx, ctx: Ctx, key: str | None, print_: str, work: Work, status: int) -> Outcome:
        """Do ``work`` once per key, inside ``tx``; a repeat returns the stored outcome."""
        if key is None:
            result = work(tx)
            return Outcome(status, dumps(result), False, result)
        if not tx.try_lock_key(ctx.env_id, key):
            raise IdempotencyKeyInUse("a request with this Idempotency-Key is still being processed",
                                      "Idempotency-Key")
        stored = tx.get("idempotency_keys", env_id=ctx.env_id, key=key)
        if stored is not None:
            if stored["fingerprint"] != print_:
                raise IdempotencyKeyReused("this Idempotency-Key was used with a different method, path "
                                           "or body", "Idempotency-Key")
            return Outcome(int(stored["status"]), bytes(stored["body"]), True)
        try:
            with tx.savepoint():
                result = work(tx)
            outcome = Outcome(status, dumps(result), False, result)
        except QuotaStackError as exc:
            if exc.code not in STORED_CODES:
                raise
            outcome = Outcome(exc.status, dumps(error_of(exc, ctx.request_id)), False)
        tx.insert("idempotency_keys", {"env_id": ctx.env_id, "key": key, "fingerprint": print_,
                                       "status": outcome.status, "body": outcome.body,
                                       # Real time, not the sandbox clock: retention is real.
                                       "created_at_us": time.time_ns() // 1000})
        return outcome

    def execute(self, ctx: Ctx, key: str | None, print_: str, work: Work, status: int, method: str,
                path: str, object_ids: list[str], confirm: Confirm | None = None) -> Outcome:
        """Run ``work`` in one unit of work, with its idempotency and audit records.

        ``confirm``: the kept principal ``ctx`` was made from (``auth.Unconfirmed``). The key's
        principal is read again with the unit of work's first read, and on any outcome the unit
        of work raises ``StalePrincipal`` (rolling back) unless it is still the same.
        """
        with self.claim(ctx, key), self.db.transaction() as tx:
            later = tx.key_principal_later(confirm[0]) if confirm is not None else None
            try:
                outcome = self.once(tx, ctx, key, print_, work, status)
            except QuotaStackError:
                if later is not None and confirm is not None:
                    _confirm(later(), confirm[1])
                raise
            if not outcome.replayed and outcome.status < 300:
                # The path's object and the result's id are often the same object: name it once.
                ids = list(dict.fromkeys(object_ids + ids_in(outcome.result)))
                audit(tx, ctx, method, path, ids, outcome.status)
            if later is not None and confirm is not None:
                _confirm(later(), confirm[1])
        return outcome


def _confirm(current: Any, kept: dict[str, Any]) -> None:
    if current is None or dict(current) != kept:
        raise StalePrincipal


def ids_in(result: Any) -> list[str]:
    if isinstance(result, dict) and isinstance(result.get("id"), str):
        return [result["id"]]
    if isinstance(result, dict) and isinstance(result.get("results"), list):
        return [r["usage"]["id"] for r in result["results"] if isinstance(r.get("usage"), dict)]
    return []


def audit(tx: Tx, ctx: Ctx, method: str, path: str, object_ids: list[str], status: int) -> None:
    tx.insert("audit_log", {"id": new_id("aud"), "env_id": ctx.env_id, "key_id": ctx.key_id,
                            "method": method, "path": path, "object_ids": dumps_column(object_ids),
                            "status": status, "request_id": ctx.request_id, "created_at_us": ctx.now_us})
