"""`quotastack demo` end to end: a real server subprocess, the seed's calls, a short trace replay.

Uses the Azure LLM inference trace 2023 (conversation), Azure/AzurePublicDataset, CC-BY-4.0.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "azure_llm_2023_conv.csv"


def count(output: str, label: str) -> int:
    """The number on the results line that starts with ``label`` (e.g. "   refused      16   (…)")."""
    match = re.search(rf"^\s*{label}\s+([\d,]+)", output, re.MULTILINE)
    assert match, f"no {label!r} line in the output:\n{output}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.skipif(not TRACE.is_file(), reason=f"trace not found: {TRACE}")
def test_demo_replays_a_short_trace_and_the_ledger_is_conserved() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "quotastack.cli", "demo", "--limit", "300", "--users", "20",
         "--data", str(TRACE)],
        capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    output = result.stdout

    assert result.returncode == 0, output + result.stderr
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"

    # The seed's three calls, with their responses.
    assert "POST /v1/subscriptions" in output
    assert "GET /v1/entitlements/check?end_user_id=user_123&feature_key=tokens" in output
    assert "POST /v1/usage" in output

    sent, accepted, refused = (count(output, label) for label in ("events sent", "accepted", "refused"))
    assert sent == 300
    assert accepted + refused == sent
    assert accepted > 0 and refused > 0, "the allowance should let some requests through and refuse others"

    assert "errors                   0" in output
    assert "conservation: holds for all 21 end users" in output
    assert "check, server (Server-Timing)" in output
