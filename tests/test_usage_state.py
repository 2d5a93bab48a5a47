"""``Tx.usage_state``: a usage's one read says what the separate reads it replaced say.

A usage reads the feature, its pool, the live subscription, whether a default plan applies, the
plan's terms for the feature and its pool, and the account (blocks, held reservations) in one
statement. Here it is compared, on both engines, with the reads that each of those has of its
own, on an end user with all of them at once.
"""

from __future__ import annotations

from typing import Any

from quotastack.service.tenants import hash_key

from .conftest import Api, Server, feature, grant, subscribe, variant


def state(server: Server, api: Api, user: str, key: str) -> tuple[Any, list[Any], dict[str, Any]]:
    with server.db.reader() as tx:
        env_id = tx.key_principal(hash_key(str(api.key)))["env_id"]
        head, blocks = tx.usage_state(env_id, user, key)
        feature_row = tx.get("features", env_id=env_id, key=key)
        pool = feature_row["credit_pool"] if feature_row else None
        sub = tx.live_subscription(env_id, user)
        held_blocks, held = tx.account_states(env_id, [user], [pool or key])
        separate = {
            "feature": feature_row, "pool": tx.get("features", env_id=env_id, key=pool) if pool else None,
            "sub": sub, "default": tx.default_variant(env_id),
            "own": tx.entitlement(sub["variant_id"], key) if sub else None,
            "pooled": tx.entitlement(sub["variant_id"], pool) if sub and pool else None,
            "blocks": held_blocks, "held": held,
        }
    return head, blocks, separate


def test_usage_state_reads_what_the_separate_reads_do(server: Server, api: Api) -> None:
    feature(api, "credits", precision=2)
    feature(api, "images", credit_pool="credits", credits_per_unit="2.5")
    pro = variant(api, [{"feature_key": "images", "enabled": True, "overage": "allow"},
                        {"feature_key": "credits", "amount": 100, "reset": {"every": 1, "unit": "month"}}])
    subscribe(api, "u1", pro["id"])
    grant(api, "u1", "credits", 5, expires_at="2999-01-01T00:00:00Z")
    grant(api, "u1", "credits", 7, priority=10)
    assert api.post("/v1/reservations", {"end_user_id": "u1", "feature_key": "credits", "units": 3,
                                         "ttl_seconds": 600}).status == 201

    head, blocks, separate = state(server, api, "u1", "images")
    assert head is not None
    fcols = ("key", "type", "precision", "unit", "credit_pool", "credits_per_unit")
    assert {c: head[f"f_{c}"] for c in fcols} == {c: separate["feature"][c] for c in fcols}
    assert {c: head[f"p_{c}"] for c in fcols} == {c: separate["pool"][c] for c in fcols}
    assert (head["s_id"], head["s_variant_id"], head["s_next_due_us"]) == (
        separate["sub"]["id"], separate["sub"]["variant_id"], separate["sub"]["next_due_us"])
    assert head["default_plan"] == 0
    assert {c[3:]: v for c, v in head.items() if c.startswith("eo_")} == dict(separate["own"])
    assert {c[3:]: v for c, v in head.items() if c.startswith("ep_")} == dict(separate["pooled"])
    assert [dict(b) for b in blocks] == [dict(b) for b in separate["blocks"]] and len(blocks) == 3
    (held,) = separate["held"]
    assert (head["held_reserved"], head["held_first_expiry_us"]) == (held["reserved"], held["first_expiry_us"])


def test_usage_state_of_an_end_user_with_nothing_yet(server: Server, api: Api) -> None:
    feature(api, "tokens")
    head, blocks, separate = state(server, api, "nobody", "tokens")
    assert head is not None and blocks == [] and separate["blocks"] == []
    assert head["s_id"] is None and head["default_plan"] == 0
    assert head["eo_variant_id"] is None and head["ep_variant_id"] is None
    assert head["held_reserved"] == 0 and head["held_first_expiry_us"] is None
    variant(api, [{"feature_key": "tokens", "amount": 10}], plan="free", default=True)
    head, _, separate = state(server, api, "nobody", "tokens")
    assert head["default_plan"] == 1 and separate["default"] is not None
    assert state(server, api, "nobody", "missing")[:2] == (None, [])
