"""The check's query parser agrees with the standard library's on every input."""

from __future__ import annotations

from urllib.parse import parse_qsl

from hypothesis import given
from hypothesis import strategies as st

from quotastack.api.edge import parse_query

PIECES = st.sampled_from(["a", "end_user_id", "feature_key", "=", "&", "%20", "%", "+", "é", "u_1", "", "%zz"])


@given(st.lists(PIECES, max_size=12).map("".join))
def test_parse_query_is_parse_qsl(text: str) -> None:
    raw = text.encode("latin-1", errors="ignore") if all(ord(c) < 256 for c in text) else text.encode()
    assert parse_query(raw) == dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


def test_the_plain_case_and_the_escaped_case() -> None:
    assert parse_query(b"end_user_id=user_1&feature_key=api_calls&units=2") == {
        "end_user_id": "user_1", "feature_key": "api_calls", "units": "2"}
    assert parse_query(b"end_user_id=a%2Fb+c&feature_key=") == {"end_user_id": "a/b c", "feature_key": ""}
    assert parse_query(b"a&b=1&a=2") == {"a": "2", "b": "1"}
