"""The background sweep as ``quotastack worker``: due work gets written with nobody asking."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import ServerProcess, new_tenant
from .serving import database_url, engines


@pytest.mark.parametrize("engine", engines())
def test_the_worker_releases_an_expired_reservation_that_no_request_touches(engine: str, tmp_path: Path) -> None:
    url = database_url(engine, tmp_path)
    server = ServerProcess(url, sweep_interval_seconds=0)
    server.start()
    try:
        api = new_tenant(server.base_url, "worker")
        assert api.post("/v1/features", json={"key": "credits"}).status_code == 201
        assert api.post("/v1/grants", json={"end_user_id": "w", "feature_key": "credits", "amount": 50}).status_code == 201
        held = api.post("/v1/reservations", json={"end_user_id": "w", "feature_key": "credits", "units": 20,
                                                  "ttl_seconds": 1}).json()
        time.sleep(1.2)  # the reservation's own TTL has to pass in real time
        assert api.get("/v1/events", params={"type": "reservation.expired"}).json()["data"] == []
        done = subprocess.run([sys.executable, "-m", "quotastack.cli", "worker", "--once"], timeout=60,
                              env=os.environ | {"QUOTASTACK_DATABASE_URL": url}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        expired = api.get("/v1/events", params={"type": "reservation.expired"}).json()["data"]
        assert [e["data"]["reservation_id"] for e in expired] == [held["id"]]
        releases = api.get("/v1/ledger", params={"reservation_id": held["id"], "type": "release"}).json()["data"]
        assert [e["amount"] for e in releases] == [20]
    finally:
        server.stop()
