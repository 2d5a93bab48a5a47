"""HTTP only: routes, request schemas, auth, idempotency and the one error mapping."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
