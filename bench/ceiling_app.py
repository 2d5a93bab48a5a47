"""The ceiling: a bare ASGI app on the same server stack as ``quotastack serve``.

uvicorn, one worker, uvloop + httptools (what ``loop="auto"``/``http="auto"`` resolve to when both
are installed, as they are in the venv), no access log, no lifespan. It answers every request with
a constant JSON body the size of a typical check response, plus the ``request-id`` and
``server-timing`` headers the service sends, so the client does the same work per response, and
an ``x-echo`` header with the query string (the load generator pairs responses with requests by
the end user id they name).

    python bench/ceiling_app.py --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import argparse
import time

BODY = (b'{"allowed":true,"balance":999999000,"end_user_id":"user_012345","feature_key":"api_calls",'
        b'"unlimited":false,"reason":null,"resets_at":"2027-11-20T00:00:00Z","units":1}')
LENGTH = str(len(BODY)).encode()
RID = b"req_00000000000000000000"


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    start = time.perf_counter_ns()
    timing = f"app;dur={(time.perf_counter_ns() - start) / 1e6:.3f}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", LENGTH),
                            (b"request-id", RID), (b"server-timing", timing),
                            (b"x-echo", scope["query_string"])]})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    print(f"ceiling on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                access_log=False, lifespan="off", log_level="warning")


if __name__ == "__main__":
    main()
