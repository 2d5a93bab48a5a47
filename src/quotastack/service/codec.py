"""JSON for text columns: Decimals are written as exact JSON numbers and read back as Decimals."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson

from ..domain.amounts import format_decimal


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(format_decimal(value))
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps_bytes(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_SORT_KEYS)


def dumps(value: Any) -> str:
    if type(value) is dict and not value:  # most metadata
        return "{}"
    return dumps_bytes(value).decode()


def integer(text: str) -> int | Decimal:
    """JSON integers beyond 64 bits as Decimals: exact, and writable by orjson."""
    value = int(text)
    return value if -(2**63) <= value < 2**63 else Decimal(text)


def loads(text: str | bytes | None) -> Any:
    if text == "{}":  # most metadata: skip the parser
        return {}
    return None if text is None else json.loads(text, parse_float=Decimal, parse_int=integer)
