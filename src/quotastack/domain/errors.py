"""The error tree. Every failure a client can see is one of these, with a stable code.

    QuotaStackError                 (500 internal_error)
    ├── InvalidRequest              (400 invalid_request)
    │   └── InvalidAmount           (400 invalid_amount)
    ├── Unauthenticated             (401 unauthenticated)
    ├── Forbidden                   (403 forbidden)
    │   └── ForbiddenInLive         (403 forbidden_in_live)
    ├── NotFound                    (404 not_found)
    ├── InsufficientBalance         (402 insufficient_balance)
    ├── InvalidState                (409 invalid_state)
    ├── SubscriptionExists          (409 subscription_exists)
    ├── IdempotencyKeyInUse         (409 idempotency_key_in_use)
    ├── IdempotencyKeyReused        (422 idempotency_key_reused)
    └── RateLimited                 (429 rate_limited)

The HTTP layer maps an error to its envelope from ``status``, ``type`` and ``code`` alone,
so adding a domain error never touches the API.
"""

from __future__ import annotations


class QuotaStackError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"

    def __init__(self, message: str = "internal error", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(QuotaStackError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidAmount(InvalidRequest):
    code = "invalid_amount"


class Unauthenticated(QuotaStackError):
    status = 401
    type = "authentication_error"
    code = "unauthenticated"


class Forbidden(QuotaStackError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ForbiddenInLive(Forbidden):
    code = "forbidden_in_live"


class NotFound(QuotaStackError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class InsufficientBalance(QuotaStackError):
    status = 402
    type = "balance_error"
    code = "insufficient_balance"


class InvalidState(QuotaStackError):
    status = 409
    type = "state_error"
    code = "invalid_state"


class SubscriptionExists(InvalidState):
    code = "subscription_exists"


class IdempotencyKeyInUse(QuotaStackError):
    status = 409
    type = "idempotency_error"
    code = "idempotency_key_in_use"


class IdempotencyKeyReused(QuotaStackError):
    status = 422
    type = "idempotency_error"
    code = "idempotency_key_reused"


class RateLimited(QuotaStackError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
