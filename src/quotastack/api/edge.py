"""The outermost ASGI layer: request ids, Server-Timing, metrics, and the check's fast path.

The entitlement check is every customer's hot path, so it skips the framework: this layer
answers ``GET /v1/entitlements/check`` itself (same service call, same error envelope as the
routed endpoint) and hands every other request to the FastAPI app.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response

from ..domain.errors import InvalidRequest, QuotaStackError
from .render import dumps, error_of, error_response

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
CHECK_PATH = "/v1/entitlements/check"
log = logging.getLogger("quotastack")


_REQUEST_PREFIX = "req_" + os.urandom(6).hex()
_request_numbers = itertools.count(1)


def request_id() -> str:
    """Unique without a system call per request: a random prefix per process, then a counter."""
    return f"{_REQUEST_PREFIX}{next(_request_numbers):08x}"


BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)


class Metrics:
    """Requests by route and status, and their time in the server, for ``GET /metrics``.

    A request adds to plain counters (a Prometheus client's counter and histogram cost several
    times more, with a lock per value; this process's event loop is the only writer), which
    ``collect`` turns into the two metric families at scrape time.
    """

    def __init__(self) -> None:
        # (route, status) -> [count per bucket, …, count above the last bucket, sum of seconds]
        self._stats: dict[tuple[str, int], list[float]] = {}
        self.extra: list[Callable[[], Iterable[Metric]]] = []
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]

    def observe(self, route: str, status: int, seconds: float) -> None:
        stats = self._stats.get((route, status))
        if stats is None:
            stats = self._stats[(route, status)] = [0] * (len(BUCKETS) + 2)
        stats[bisect_left(BUCKETS, seconds)] += 1
        stats[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("quotastack_requests", "HTTP requests by route and status",
                                       labels=["route", "status"])
        duration = HistogramMetricFamily("quotastack_request_duration_seconds",
                                         "Time spent in the server per request, by route", labels=["route"])
        by_route: dict[str, list[float]] = {}
        for (route, status), stats in list(self._stats.items()):
            requests.add_metric([route, str(status)], sum(stats[:-1]))
            total = by_route.setdefault(route, [0] * len(stats))
            for i, value in enumerate(stats):
                total[i] += value
        for route, total in by_route.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip((*(floatToGoString(b) for b in BUCKETS), "+Inf"), total[:-1]):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric([route], buckets, total[-1])
        yield requests
        yield duration
        for more in self.extra:
            yield from more()


def parse_query(raw: bytes) -> dict[str, str]:
    """``dict(parse_qsl(…, keep_blank_values=True))``, without its cost when nothing is escaped."""
    text = raw.decode("latin-1")
    if "%" in text or "+" in text:
        return dict(parse_qsl(text, keep_blank_values=True))
    return dict(field.partition("=")[::2] for field in text.split("&") if field)  # type: ignore[misc]


def _timing(start_ns: int) -> tuple[bytes, float]:
    elapsed = time.perf_counter_ns() - start_ns
    return f"app;dur={elapsed / 1e6:.3f}".encode(), elapsed / 1e9


Endpoint = Callable[[Request], Awaitable[Response]]


class Edge:
    """``direct`` maps (method, path) of the hottest fixed paths to their route functions: the
    same functions the framework routes to, called without walking its route table, which
    costs more than the rest of a usage request on SQLite.
    """

    def __init__(self, app: ASGIApp, check: Callable[..., Awaitable[dict[str, Any] | bytes]], metrics: Metrics,
                 direct: dict[tuple[str, str], Endpoint] | None = None,
                 kept: Callable[[str | None, dict[str, str]], bytes | None] | None = None) -> None:
        self.app = app
        self.check = check
        self.metrics = metrics
        self.direct = direct or {}
        # The check's answers kept between checks (checks.CheckCache), looked up before ``check``.
        self.kept = kept

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start_ns = time.perf_counter_ns()
        rid = request_id()
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            # No id or key contains NUL (PostgreSQL could not even store one): refuse it here.
            bad = InvalidRequest("the path or query contains a NUL character")
            seconds = await self._send(send, bad.status, dumps(error_of(bad, rid)), rid, start_ns, None)
            self.metrics.observe("unmatched", bad.status, seconds)
            return
        if scope["path"] == CHECK_PATH and scope["method"] == "GET":
            await self._check(scope, send, rid, start_ns)
            return
        scope.setdefault("state", {})["request_id"] = rid
        endpoint = self.direct.get((scope["method"], scope["path"]))
        status = 500
        started = complete = False

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal status, started, complete
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                timing, _ = _timing(start_ns)
                message["headers"] = [*message.get("headers", ()), (b"request-id", rid.encode()),
                                      (b"server-timing", timing)]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            if endpoint is not None:
                try:
                    response = await endpoint(Request(scope, receive))
                except QuotaStackError as exc:
                    response = error_response(exc, rid)
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:
            # The framework answers a bug with 500 internal_error (and logs it), then re-raises
            # it for the server; the server would then drop the keep-alive connection under the
            # client's next request. An answered request is over: keep the connection.
            if complete:
                return
            if started:
                raise
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            bug = QuotaStackError("internal error: nothing was changed")
            await self._send(send, bug.status, dumps(error_of(bug, rid)), rid, start_ns, None)
        finally:
            route = scope["path"] if endpoint is not None else getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, status, _timing(start_ns)[1])

    async def _check(self, scope: Scope, send: Any, rid: str, start_ns: int) -> None:
        try:
            query = parse_query(scope["query_string"])
            auth = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value.decode("latin-1")
                    break
            answer = None if self.kept is None else self.kept(auth, query)
            if answer is None:
                answer = await self.check(auth, rid, query)
            body = answer if isinstance(answer, bytes) else dumps(answer)
            status, retry_after = 200, None
        except QuotaStackError as exc:
            status, body = exc.status, dumps(error_of(exc, rid))
            retry_after = getattr(exc, "retry_after_seconds", None)
        except UnicodeDecodeError:
            exc2 = InvalidRequest("malformed query string")
            status, body, retry_after = exc2.status, dumps(error_of(exc2, rid)), None
        except Exception:
            # A bug: the same envelope as every other route's 500, never the server's bare text.
            log.exception("internal error on GET %s", CHECK_PATH)
            bug = QuotaStackError("internal error: nothing was changed")
            status, body, retry_after = bug.status, dumps(error_of(bug, rid)), None
        seconds = await self._send(send, status, body, rid, start_ns, retry_after)
        self.metrics.observe(CHECK_PATH, status, seconds)

    @staticmethod
    async def _send(send: Any, status: int, body: bytes, rid: str, start_ns: int,
                    retry_after: int | None) -> float:
        """Send a whole JSON response with the headers every response carries."""
        timing, seconds = _timing(start_ns)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"request-id", rid.encode()), (b"server-timing", timing)]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return seconds
