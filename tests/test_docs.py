"""The docs are served by the API, and every code sample in them runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from .serving import OPERATOR_KEY

DOCS = Path(__file__).resolve().parents[1] / "docs"


def sandbox_key(base_url: str) -> str:
    created = httpx.post(f"{base_url}/v1/tenants", json={"name": "docs"},
                         headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert created.status_code == 201
    return str(created.json()["api_keys"][0]["key"])


def test_the_quickstart_runs_as_written(server: Any) -> None:
    text = (DOCS / "quickstart.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    namespace: dict[str, Any] = {"BASE_URL": server.base_url, "KEY": sandbox_key(server.base_url)}
    for block in blocks:
        exec(compile(block, "docs/quickstart.md", "exec"), namespace)  # noqa: S102 - our own docs


def test_llms_txt_links_every_page_and_each_is_served(server: Any) -> None:
    index = httpx.get(f"{server.base_url}/llms.txt")
    assert index.status_code == 200
    assert index.text == (DOCS / "llms.txt").read_text()
    links = re.findall(r"\]\((/docs/[^)]+\.md)\)", index.text)
    pages = {f"/docs/{p.name}" for p in DOCS.glob("*.md")}
    assert set(links) == pages
    for link in links:
        page = httpx.get(f"{server.base_url}{link}")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/markdown")


def test_an_unknown_page_is_a_404_in_the_error_envelope(server: Any) -> None:
    for path in ("/docs/nope.md", "/docs/..%2Fpyproject.md"):
        response = httpx.get(f"{server.base_url}{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
