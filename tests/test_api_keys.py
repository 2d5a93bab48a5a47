"""API keys: minting, scopes, revocation, and every way to be unauthenticated."""

from __future__ import annotations

from .conftest import Api, Server, Tenant, assert_error, feature


def mint(api: Api, *scopes: str, name: str = "k") -> dict:
    return api.ok("POST", "/v1/api_keys", {"name": name, "scopes": list(scopes)}, 201)  # type: ignore[no-any-return]


def as_key(server: Server, key: str) -> Api:
    return Api(server.base_url, key)


def test_a_minted_key_is_shown_once_with_its_environment_and_scopes(tenant: Tenant) -> None:
    sandbox = mint(tenant.sandbox, "usage:write", "read", name="backend")
    assert sandbox["key"].startswith("qs_test_") and sandbox["environment"] == "sandbox"
    assert sandbox["id"].startswith("key_") and sandbox["name"] == "backend"
    assert sandbox["scopes"] == ["usage:write", "read"]
    assert sandbox["key_hint"] == sandbox["key"][:8] + "…" + sandbox["key"][-4:]
    live = mint(tenant.live, "read")
    assert live["key"].startswith("qs_live_") and live["environment"] == "live"


def test_a_revoked_key_is_refused_at_once(server: Server, tenant: Tenant) -> None:
    minted = mint(tenant.sandbox, "read", "entitlements:read")
    client = as_key(server, minted["key"])
    try:
        assert client.get("/v1/features").status == 200
        revoked = tenant.sandbox.ok("DELETE", f"/v1/api_keys/{minted['id']}")
        assert revoked["id"] == minted["id"] and revoked["revoked_at"] is not None
        assert_error(client.get("/v1/features"), 401, "unauthenticated")
        assert_error(client.get("/v1/entitlements/check", end_user_id="u1", feature_key="f"), 401, "unauthenticated")
    finally:
        client.close()
    again = tenant.sandbox.ok("DELETE", f"/v1/api_keys/{minted['id']}")
    assert again["revoked_at"] == revoked["revoked_at"]


def test_a_key_can_revoke_itself(server: Server, tenant: Tenant) -> None:
    minted = mint(tenant.sandbox, "keys:write")
    client = as_key(server, minted["key"])
    try:
        assert client.delete(f"/v1/api_keys/{minted['id']}").status == 200
        assert_error(client.delete(f"/v1/api_keys/{minted['id']}"), 401, "unauthenticated")
    finally:
        client.close()


def test_revoking_another_tenants_or_environments_key_is_404(server: Server, tenant: Tenant) -> None:
    live_key = tenant.created["api_keys"][1]
    assert_error(tenant.sandbox.delete(f"/v1/api_keys/{live_key['id']}"), 404, "not_found")
    assert_error(tenant.sandbox.delete("/v1/api_keys/key_nope"), 404, "not_found")
    assert tenant.live.get("/v1/features").status == 200  # still valid


def test_a_key_lacking_the_scope_is_forbidden(server: Server, tenant: Tenant) -> None:
    feature(tenant.sandbox, "api_calls")
    reader = as_key(server, mint(tenant.sandbox, "read")["key"])
    writer = as_key(server, mint(tenant.sandbox, "usage:write")["key"])
    checker = as_key(server, mint(tenant.sandbox, "entitlements:read")["key"])
    try:
        assert reader.get("/v1/features").status == 200
        error = assert_error(reader.post("/v1/features", {"key": "other"}), 403, "forbidden")
        assert error["type"] == "permission_error"
        assert_error(reader.post("/v1/grants", {"end_user_id": "u1", "feature_key": "api_calls", "amount": 1}),
                     403, "forbidden")
        assert_error(writer.get("/v1/features"), 403, "forbidden")
        assert_error(writer.get("/v1/entitlements/check", end_user_id="u1", feature_key="api_calls"),
                     403, "forbidden")
        assert checker.get("/v1/entitlements/check", end_user_id="u1", feature_key="api_calls").status == 200
        assert checker.get("/v1/entitlements", end_user_id="u1").status == 200
        assert_error(checker.get("/v1/ledger"), 403, "forbidden")
        # A 403 changes nothing: the feature "other" was never created.
        assert_error(tenant.sandbox.get("/v1/features/other"), 404, "not_found")
    finally:
        for client in (reader, writer, checker):
            client.close()


def test_a_non_admin_key_cannot_mint_scopes_it_lacks(server: Server, tenant: Tenant) -> None:
    minter = as_key(server, mint(tenant.sandbox, "keys:write", "read")["key"])
    try:
        assert_error(minter.post("/v1/api_keys", {"name": "x", "scopes": ["admin"]}), 403, "forbidden", "scopes")
        assert_error(minter.post("/v1/api_keys", {"name": "x", "scopes": ["read", "usage:write"]}),
                     403, "forbidden", "scopes")
        minted = minter.ok("POST", "/v1/api_keys", {"name": "x", "scopes": ["read"]}, 201)
        assert minted["scopes"] == ["read"]
    finally:
        minter.close()
    reader = as_key(server, mint(tenant.sandbox, "read")["key"])
    try:
        assert_error(reader.post("/v1/api_keys", {"name": "x", "scopes": ["read"]}), 403, "forbidden")
    finally:
        reader.close()


def test_unknown_or_missing_scopes_are_invalid_requests(tenant: Tenant) -> None:
    assert_error(tenant.sandbox.post("/v1/api_keys", {"name": "x", "scopes": ["superuser"]}),
                 400, "invalid_request", "scopes")
    assert_error(tenant.sandbox.post("/v1/api_keys", {"name": "x", "scopes": []}), 400, "invalid_request", "scopes")
    assert_error(tenant.sandbox.post("/v1/api_keys", {"scopes": ["read"]}), 400, "invalid_request", "name")


def test_requests_without_a_valid_key_are_unauthenticated(server: Server, tenant: Tenant) -> None:
    sandbox_key = tenant.created["api_keys"][0]["key"]
    for header in (None, "", "Basic abc", "Bearer", f"Token {sandbox_key}", "Bearer qs_test_unknown",
                   "Bearer qs_live_unknown", "Bearer sk_something", f"Bearer {sandbox_key}x"):
        client = Api(server.base_url, None)
        headers = {} if header is None else {"Authorization": header}
        try:
            for method, path in (("GET", "/v1/features"), ("POST", "/v1/features"),
                                 ("GET", "/v1/entitlements/check?end_user_id=u&feature_key=f")):
                body = {"key": "f"} if method == "POST" else None
                error = assert_error(client.call(method, path, body, headers=headers), 401, "unauthenticated")
                assert error["type"] == "authentication_error"
        finally:
            client.close()
    assert_error(tenant.sandbox.get("/v1/features/f"), 404, "not_found")  # no 401 request created it


def test_listing_keys_never_shows_a_key(tenant: Tenant) -> None:
    # GET /v1/api_keys answered 500: the table had no seq to order by.
    minted = mint(tenant.sandbox, "read")
    listed = tenant.sandbox.ok("GET", "/v1/api_keys")
    assert [k["id"] for k in listed["data"]][0] == minted["id"]
    assert len(listed["data"]) == 2
    assert all("key" not in k for k in listed["data"])
    assert {k["environment"] for k in listed["data"]} == {"sandbox"}
