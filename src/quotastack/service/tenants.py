"""Tenants, their two environments, and API keys (stored only as SHA-256 hashes)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

from ..domain.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from ..domain.ids import new_id, new_secret
from . import views
from .codec import dumps, loads
from .context import Ctx
from .ports import Tx

SCOPES = ("admin", "catalog:write", "subscriptions:write", "credits:write", "usage:write",
          "reservations:write", "entitlements:read", "read", "webhooks:write", "keys:write")
ENVIRONMENTS = {"sandbox": "qs_test_", "live": "qs_live_"}


@lru_cache(maxsize=4096)  # a check or usage call hashes the caller's key: once per key is enough
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _mint_key(tx: Tx, env_id: int, environment: str, name: str, scopes: list[str],
              now_us: int) -> dict[str, Any]:
    key = ENVIRONMENTS[environment] + new_secret(24)
    # Keys are numbered per environment for ordering; a race for a number fails on the unique
    # index and the transaction is retried.
    row = {"id": new_id("key"), "seq": tx.next_key_seq(env_id), "env_id": env_id, "name": name,
           "key_hash": hash_key(key),
           "key_hint": key[:8] + "…" + key[-4:], "scopes": dumps(scopes), "created_at_us": now_us,
           "revoked_at_us": None}
    tx.insert("api_keys", row)
    return key_view(row, environment) | {"key": key}


def key_view(row: Any, environment: str) -> dict[str, Any]:
    return {"id": row["id"], "object": "api_key", "name": row["name"], "environment": environment,
            "scopes": loads(row["scopes"]), "key_hint": row["key_hint"],
            "created_at": views.ts(row["created_at_us"]), "revoked_at": views.ts(row["revoked_at_us"])}


def create_tenant(tx: Tx, name: str, now_us: int) -> dict[str, Any]:
    if not name or len(name) > 255:
        raise InvalidRequest("name must be 1 to 255 characters", "name")
    tenant = {"id": new_id("ten"), "name": name, "created_at_us": now_us}
    tx.insert("tenants", tenant)
    keys = []
    for environment in ENVIRONMENTS:
        tx.insert("environments", {"tenant_id": tenant["id"], "kind": environment, "clock_offset_us": 0})
        env = tx.get("environments", tenant_id=tenant["id"], kind=environment)
        assert env is not None
        keys.append(_mint_key(tx, env["id"], environment, f"{environment} admin", ["admin"], now_us))
    return {"id": tenant["id"], "object": "tenant", "name": name,
            "created_at": views.ts(now_us), "api_keys": keys}


def authenticate(tx: Tx, key: str) -> dict[str, Any]:
    """The key's tenant, environment, scopes and clock; Unauthenticated if unknown or revoked."""
    if not key.startswith(("qs_test_", "qs_live_")):
        raise Unauthenticated("unknown API key")
    row = tx.key_principal(hash_key(key))
    if row is None or row["revoked_at_us"] is not None:
        raise Unauthenticated("unknown or revoked API key")
    return dict(row)


def create_key(tx: Tx, ctx: Ctx, name: str, scopes: list[str]) -> dict[str, Any]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise InvalidRequest(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}", "scopes")
    if not scopes:
        raise InvalidRequest("a key needs at least one scope", "scopes")
    if "admin" not in ctx.scopes and not set(scopes) <= ctx.scopes:
        raise Forbidden("a key can only create keys with scopes it holds itself", "scopes")
    return _mint_key(tx, ctx.env_id, ctx.environment, name, sorted(set(scopes), key=SCOPES.index),
                     ctx.now_us)


def revoke_key(tx: Tx, ctx: Ctx, key_id: str) -> dict[str, Any]:
    row = tx.get("api_keys", env_id=ctx.env_id, id=key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    if row["revoked_at_us"] is None:
        tx.update("api_keys", {"id": key_id}, {"revoked_at_us": ctx.now_us})
    row = tx.get("api_keys", id=key_id)
    return key_view(row, ctx.environment)
