"""Fixtures for the API tests: one real HTTP server on loopback, a fresh tenant per test.

The server is uvicorn in a background thread (tests/serving.py), serving the real app on a real
SQLite file and, in a second run of every test, on PostgreSQL; tests talk to it over HTTP with
httpx. Every reply is checked for the headers every response must carry
(``Request-Id: req_…`` and ``Server-Timing: app;dur=…``), so no test can forget them.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from .sandbox import Sandbox
from .serving import OPERATOR_KEY, database_url, engines, serve
from .serving import Running as Server

REQUEST_ID = re.compile(r"^req_[0-9a-f]{20}$")
SERVER_TIMING = re.compile(r"^app;dur=\d+\.\d{3}$")
# The servers speak plain HTTP on loopback; one TLS context for all clients saves loading the CA
# bundle for each of them (30 ms a client).
TLS = ssl.create_default_context()
# How each ledger entry type moves (balance, reserved), API.md §8: a reserve takes credits from the
# balance into the reserved total, a release gives them back, a commit charges them out of it.
EFFECTS = {"grant": (1, 0), "refund": (1, 0), "rollover": (1, 0),
           "use": (-1, 0), "expire": (-1, 0), "void": (-1, 0),
           "reserve": (-1, 1), "release": (1, -1), "commit": (0, -1)}


@pytest.fixture(scope="session", params=engines())
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server per engine for the whole session; each test makes its own tenant."""
    with serve(database_url(request.param, tmp_path_factory.mktemp("api"))) as running:
        yield running


@pytest.fixture
def sb(server: Server) -> Iterator[Sandbox]:
    """A fresh tenant's sandbox for timelines; the ledger must add up when the test is done."""
    sandbox = Sandbox(server.base_url)
    yield sandbox
    sandbox.assert_conserved()
    sandbox.http.close()


# ---- talking to it ------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON (exact Decimals for non-integers), or None
    text: str
    headers: httpx.Headers

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"


def reply_of(response: httpx.Response) -> Reply:
    assert REQUEST_ID.match(response.headers.get("Request-Id", "")), response.headers
    assert SERVER_TIMING.match(response.headers.get("Server-Timing", "")), response.headers
    body = None
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json(parse_float=Decimal)
    return Reply(response.status_code, body, response.text, response.headers)


class Api:
    """One API key's view of the server: every call returns a checked ``Reply``."""

    def __init__(self, base_url: str, key: str | None) -> None:
        self.key = key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=30, verify=TLS)

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = None,
             params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             content: bytes | None = None) -> Reply:
        headers = dict(headers or {})
        if key is not None:
            headers["Idempotency-Key"] = key
        if body is not None:
            content = orjson.dumps(body, default=str)
        if content is not None:
            headers.setdefault("Content-Type", "application/json")
        return reply_of(self.http.request(method, path, content=content, params=params, headers=headers))

    def get(self, path: str, **params: Any) -> Reply:
        return self.call("GET", path, params=params or None)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.call("POST", path, body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Reply:
        return self.call("DELETE", path, **kwargs)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200, **kwargs: Any) -> Any:
        """The parsed body of a call that must answer ``status``."""
        reply = self.call(method, path, body, **kwargs)
        assert reply.status == status, (reply.status, reply.text)
        return reply.body

    def close(self) -> None:
        self.http.close()


@dataclass
class Tenant:
    id: str
    sandbox: Api
    live: Api
    created: dict[str, Any]


def new_tenant(base_url: str, name: str = "acme") -> Tenant:
    operator = Api(base_url, OPERATOR_KEY)
    try:
        created = operator.ok("POST", "/v1/tenants", {"name": name}, 201)
    finally:
        operator.close()
    keys = created["api_keys"]
    return Tenant(created["id"], Api(base_url, keys[0]["key"]), Api(base_url, keys[1]["key"]), created)


@pytest.fixture
def tenant(server: Server) -> Iterator[Tenant]:
    """A fresh tenant: tests share the server, never data."""
    t = new_tenant(server.base_url)
    yield t
    t.sandbox.close()
    t.live.close()


@pytest.fixture
def api(tenant: Tenant) -> Api:
    """The fresh tenant's sandbox admin key, for tests that need only one environment."""
    return tenant.sandbox


@pytest.fixture
def anonymous(server: Server) -> Iterator[Api]:
    client = Api(server.base_url, None)
    yield client
    client.close()


# ---- assertions shared by the test files -----------------------------------------------------------

def assert_error(reply: Reply, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """The one error envelope, exactly: five fields, and the request id of the response."""
    assert reply.status == status, (reply.status, reply.text)
    assert reply.headers["content-type"] == "application/json", reply.headers
    assert set(reply.body) == {"error"}, reply.body
    error = reply.body["error"]
    assert set(error) == {"type", "code", "message", "param", "request_id"}, error
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["request_id"] == reply.headers["Request-Id"], (error, reply.headers)
    return error  # type: ignore[no-any-return]


def ledger(api: Api, **filters: Any) -> list[dict[str, Any]]:
    """Every ledger entry matching ``filters``, newest first, following the cursor."""
    entries: list[dict[str, Any]] = []
    params = {"limit": 500, **filters}
    while True:
        page = api.ok("GET", "/v1/ledger", params=params)
        entries += page["data"]
        if not page["has_more"]:
            return entries
        params["starting_after"] = page["next_cursor"]


def balance_of(api: Api, end_user_id: str, feature_key: str) -> tuple[Decimal, Decimal]:
    """``(balance, reserved)`` of one feature, from GET /v1/balances."""
    data = api.ok("GET", f"/v1/balances/{end_user_id}", params={"feature_key": feature_key})["data"]
    assert [d["feature_key"] for d in data] == [feature_key]
    return Decimal(data[0]["balance"]), Decimal(data[0]["reserved"])


def assert_conserved(api: Api, end_user_id: str, feature_key: str) -> Decimal:
    """The ledger adds up to the balance and to the reserved total (API.md §8); returns the balance.

    Summed over both columns this is the identity grants + refunds + rollovers − uses − expiries −
    voids − commits = balance + reserved. While a subscription is paused its plan credits are
    ``frozen``: still on the ledger, not in the balance.
    """
    # Balances first: the first read naming an end user may start their default-plan subscription.
    [data] = api.ok("GET", f"/v1/balances/{end_user_id}", params={"feature_key": feature_key})["data"]
    balance, reserved = Decimal(data["balance"]), Decimal(data["reserved"])
    held = balance + Decimal(data.get("frozen") or 0)
    entries = ledger(api, end_user_id=end_user_id, feature_key=feature_key)
    balance_sum = sum((EFFECTS[e["type"]][0] * Decimal(e["amount"]) for e in entries), Decimal(0))
    reserved_sum = sum((EFFECTS[e["type"]][1] * Decimal(e["amount"]) for e in entries), Decimal(0))
    assert (balance_sum, reserved_sum) == (held, reserved), (balance_sum, reserved_sum, data)
    if entries:  # the newest entry's running totals agree
        assert (entries[0]["balance_after"], entries[0]["reserved_after"]) == (held, reserved), entries[0]
    return balance


# ---- catalog shortcuts -------------------------------------------------------------------------------

def feature(api: Api, key: str, **fields: Any) -> dict[str, Any]:
    return api.ok("POST", "/v1/features", {"key": key, **fields}, 201)  # type: ignore[no-any-return]


def variant(api: Api, entitlements: list[dict[str, Any]], plan: str = "pro", key: str | None = None,
            default: bool = False, **fields: Any) -> dict[str, Any]:
    """A plan variant with ``entitlements``, creating its plan when it does not exist yet."""
    found = api.get(f"/v1/plans/{plan}")
    if found.status == 404:
        found = api.post("/v1/plans", {"key": plan, "default": default})
        assert found.status == 201, found.text
    body = {"key": key or f"{plan}_monthly", "entitlements": entitlements, **fields}
    return api.ok("POST", f"/v1/plans/{found.body['id']}/variants", body, 201)  # type: ignore[no-any-return]


def subscribe(api: Api, end_user_id: str, variant_id: str, **fields: Any) -> dict[str, Any]:
    body = {"end_user_id": end_user_id, "plan_variant_id": variant_id, **fields}
    return api.ok("POST", "/v1/subscriptions", body, 201)  # type: ignore[no-any-return]


def grant(api: Api, end_user_id: str, feature_key: str, amount: Any, **fields: Any) -> dict[str, Any]:
    body = {"end_user_id": end_user_id, "feature_key": feature_key, "amount": amount, **fields}
    return api.ok("POST", "/v1/grants", body, 201)  # type: ignore[no-any-return]


def use(api: Api, end_user_id: str, feature_key: str, units: Any, **kwargs: Any) -> Reply:
    return api.post("/v1/usage", {"end_user_id": end_user_id, "feature_key": feature_key, "units": units},
                    **kwargs)


# ---- instants ----------------------------------------------------------------------------------------------

def rfc3339(moment: datetime) -> str:
    """As the API writes instants: fractional seconds only when there are some, no trailing zeros."""
    fraction = f".{moment.microsecond:06d}".rstrip("0") if moment.microsecond else ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def instant(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def shifted(timestamp: str, **delta: float) -> str:
    return rfc3339(instant(timestamp) + timedelta(**delta))
