"""`quotastack demo` end to end: a real server subprocess, the seed's calls, a short trace replay.

Uses the Azure LLM inference trace 2023 (conversation), Azure/AzurePublicDataset, CC-BY-4.0,
and the Mooncake conversation trace (FAST 2025), kvcache-ai/Mooncake, Apache-2.0.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .serving import database_url, engines

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE = DATA / "azure_llm_2023_conv.csv"
MOONCAKE = DATA / "mooncake_conversation_trace.jsonl"


def count(output: str, label: str) -> int:
    """The number on the results line that starts with ``label`` (e.g. "   refused      16   (…)")."""
    match = re.search(rf"^\s*{label}\s+([\d,]+)", output, re.MULTILINE)
    assert match, f"no {label!r} line in the output:\n{output}"
    return int(match.group(1).replace(",", ""))


def run_demo(*args: str) -> str:
    """Runs ``quotastack demo ARGS``; asserts it exits 0 within 30 s and returns its output."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "quotastack.cli", "demo", *args],
                            capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"
    return result.stdout


@pytest.mark.skipif(not AZURE.is_file(), reason=f"trace not found: {AZURE}")
def test_demo_replays_a_short_trace_and_the_ledger_is_conserved() -> None:
    output = run_demo("--limit", "300", "--users", "20", "--data", str(AZURE))

    # The seed's three calls, with their responses.
    assert "POST /v1/subscriptions" in output
    assert "GET /v1/entitlements/check?end_user_id=user_123&feature_key=tokens" in output
    assert "POST /v1/usage" in output

    sent, accepted, refused = (count(output, label) for label in ("requests", "accepted", "refused"))
    assert sent == 300
    assert accepted + refused == sent
    assert accepted > 0 and refused > 0, "the allowance should let some requests through and refuse others"

    assert count(output, "errors") == 0
    assert "conservation: holds for all 21 end users" in output
    assert "check, server (Server-Timing)" in output


@pytest.mark.skipif(not MOONCAKE.is_file(), reason=f"trace not found: {MOONCAKE}")
@pytest.mark.parametrize("engine", engines())
def test_demo_replays_mooncake_bursts_with_reservations(engine: str, tmp_path: Path) -> None:
    database = ["--database", database_url(engine, tmp_path), "--workers", "2"] if engine == "postgresql" else []
    output = run_demo("--trace", "mooncake", "--limit", "300", "--users", "20", "--data", str(MOONCAKE),
                      *database)

    sent, accepted, refused, released = (count(output, label)
                                         for label in ("requests", "accepted", "refused", "released"))
    assert sent == 300
    assert accepted + refused + released == sent
    assert accepted > 0, "the allowance should let requests through"
    assert released > 0, "about 2% of requests fail to generate and release their reservation"
    assert refused > 0, "the allowance should refuse some reservations"

    assert count(output, "errors") == 0
    assert "reserved: 0 for every end user" in output
    assert "conservation: holds for all 21 end users" in output
    assert "reserve, server (Server-Timing)" in output
    assert "commit, client side" in output
