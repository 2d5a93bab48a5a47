"""Which error wins when a request has several faults: the key is judged before the body.

On PostgreSQL, authentication, parsing and the unit of work run together in one hop to a store
thread; these cases pin the order that had when authentication ran first on the event loop.
"""

from __future__ import annotations

from .conftest import Api, Server, assert_error


def test_no_key_and_a_malformed_body_is_401_not_400(anonymous: Api) -> None:
    reply = anonymous.call("POST", "/v1/usage", content=b"{not json", key="k-401")
    assert_error(reply, 401, "unauthenticated")


def test_a_key_without_the_scope_and_an_invalid_body_is_403_not_400(server: Server, api: Api) -> None:
    reader = Api(server.base_url, api.ok("POST", "/v1/api_keys", {"name": "r", "scopes": ["read"]}, 201)["key"])
    try:
        assert_error(reader.post("/v1/usage", {"end_user_id": "u", "units": -1}), 403, "forbidden")
        assert_error(reader.call("POST", "/v1/usage", content=b"[", key="k-403"), 403, "forbidden")
    finally:
        reader.close()


def test_a_rejected_request_stores_nothing_so_the_key_works_once_fixed(api: Api) -> None:
    api.ok("POST", "/v1/features", {"key": "tokens"}, 201)
    api.ok("POST", "/v1/grants", {"end_user_id": "u", "feature_key": "tokens", "amount": 10}, 201)
    assert_error(api.call("POST", "/v1/usage", content=b"{bad", key="k-fix"), 400, "invalid_request")
    used = api.ok("POST", "/v1/usage", {"end_user_id": "u", "feature_key": "tokens", "units": 3}, 201, key="k-fix")
    assert used["balance"] == 7
