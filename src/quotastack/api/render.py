"""JSON out: exact Decimals as JSON numbers, and the one error envelope."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from fastapi.responses import Response

from ..domain.amounts import format_decimal
from ..domain.errors import QuotaStackError


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(format_decimal(value))
    raise TypeError(f"cannot render {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default)


def error_body(status: int, err_type: str, code: str, message: str, param: str | None,
               request_id: str) -> dict[str, Any]:
    return {"error": {"type": err_type, "code": code, "message": message, "param": param,
                      "request_id": request_id}}


def error_of(exc: QuotaStackError, request_id: str) -> dict[str, Any]:
    return error_body(exc.status, exc.type, exc.code, exc.message, exc.param, request_id)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else dumps(content)


def error_response(exc: QuotaStackError, request_id: str) -> JSON:
    headers = {}
    if hasattr(exc, "retry_after_seconds"):
        headers["Retry-After"] = str(exc.retry_after_seconds)
    return JSON(error_of(exc, request_id), status_code=exc.status, headers=headers)
