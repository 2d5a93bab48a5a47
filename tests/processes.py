"""QuotaStack as a separate server process (``quotastack serve``), for races and crashes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from .serving import OPERATOR_KEY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``quotastack serve`` in its own process group, so that a kill takes its workers too."""

    def __init__(self, db_url: str, workers: int = 1, port: int | None = None,
                 sweep_interval_seconds: float = 1) -> None:
        self.db_url = db_url
        self.sweep_interval_seconds = sweep_interval_seconds
        self.workers = workers
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = os.environ | {"QUOTASTACK_DATABASE_URL": self.db_url, "QUOTASTACK_OPERATOR_KEY": OPERATOR_KEY,
                            "QUOTASTACK_SWEEP_INTERVAL_SECONDS": str(self.sweep_interval_seconds)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quotastack.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers), "--log-level", "warning"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    # Every worker must be up, not just the first to answer.
                    time.sleep(0.3 * (self.workers > 1))
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"quotastack serve did not start (exit {self.proc.poll()})")
            time.sleep(0.05)

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, mid-request if a request is running."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def server_process(db_url: str, workers: int = 1) -> Iterator[ServerProcess]:
    server = ServerProcess(db_url, workers)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def new_tenant(base_url: str, name: str = "t") -> httpx.Client:
    created = httpx.post(f"{base_url}/v1/tenants", json={"name": name},
                         headers={"Authorization": f"Bearer {OPERATOR_KEY}"}, timeout=10)
    assert created.status_code == 201, created.text
    return httpx.Client(base_url=base_url, timeout=30,
                        headers={"Authorization": f"Bearer {created.json()['api_keys'][0]['key']}"})
