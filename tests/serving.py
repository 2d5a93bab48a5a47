"""A real QuotaStack HTTP server on loopback, in a background thread, for tests."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from quotastack.api import create_app
from quotastack.api.app import Settings
from quotastack.store import open_database

OPERATOR_KEY = "test-operator-key"
T = TypeVar("T")


@dataclass
class Running:
    base_url: str
    app: Any
    db: Any
    loop: asyncio.AbstractEventLoop  # the server's event loop, for running work on it

    def on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the server's event loop, among its requests, and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)


class _Server(uvicorn.Server):
    loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


def engines() -> list[str]:
    """The engines the suite runs on: both, unless QUOTASTACK_TEST_ENGINES narrows them."""
    return os.environ.get("QUOTASTACK_TEST_ENGINES", "sqlite,postgresql").split(",")


def database_url(engine: str, tmp_dir: Path) -> str:
    if engine == "sqlite":
        return f"sqlite:///{tmp_dir / 'quotastack.db'}"
    url = os.environ.get("QUOTASTACK_TEST_POSTGRES_URL")
    if not url:
        raise RuntimeError("PostgreSQL tests need QUOTASTACK_TEST_POSTGRES_URL: run them through "
                           "./scripts/test (which starts a throwaway server), or set "
                           "QUOTASTACK_TEST_ENGINES=sqlite to run the SQLite half only")
    return url


@contextmanager
def serve(db_url: str, settings: Settings | None = None) -> Iterator[Running]:
    db = open_database(db_url)
    app = create_app(db, settings or Settings(operator_key=OPERATOR_KEY))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = _Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        assert server.loop is not None
        yield Running(f"http://127.0.0.1:{port}", app, db, server.loop)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        db.close()
