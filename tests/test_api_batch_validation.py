"""A batch event's quick validation (``schemas.plain_usage``) agrees with ``UsageIn`` itself.

The batch validates most events without building the model; every event it does not pass goes
through the model, so an event it passes must be one the model passes, given exactly as the
model gives it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from quotastack.api import schemas
from quotastack.api.mutations import validate
from quotastack.domain.errors import QuotaStackError

# JSON values as the body's parser makes them: ints, exact Decimals, text, booleans, null.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.decimals(allow_nan=False, allow_infinity=False, places=3), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
texts = st.one_of(st.text(min_size=0, max_size=3), st.sampled_from(
    ["", "u1", "api_calls", "a.b:c-d_e", "bad key", "key\n", "é", "x" * 100, "x" * 101, "x" * 255, "x" * 256]))
fields = {
    "end_user_id": st.one_of(texts, json_values),
    "feature_key": st.one_of(texts, json_values),
    "units": json_values,
    "idempotency_key": st.one_of(st.none(), texts, json_values),
    "timestamp": st.one_of(st.none(), texts, json_values),
    "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), json_values, max_size=3), json_values),
    "extra": json_values,
}
# Events near valid ones (the model's own rules met, or missed by one field), and anything at all.
near_valid = st.fixed_dictionaries(
    {"end_user_id": st.one_of(st.text(min_size=1, max_size=6), texts),
     "feature_key": st.one_of(st.from_regex(r"[A-Za-z0-9_.:\-]{1,6}", fullmatch=True), texts),
     "units": json_values},
    optional={"idempotency_key": st.one_of(st.none(), texts), "timestamp": st.one_of(st.none(), texts, json_values),
              "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
              "extra": json_values})
events = st.one_of(near_valid, st.fixed_dictionaries({}, optional=fields))


def _by_the_model(event: Any) -> dict[str, Any] | None:
    try:
        data = validate(schemas.UsageIn, event)
    except QuotaStackError:
        return None
    return data


@settings(max_examples=1500, deadline=None)
@given(events)
def test_an_event_passed_quickly_is_one_the_model_passes_unchanged(event: dict[str, Any]) -> None:
    quick = schemas.plain_usage(event)
    if quick is None:
        return
    by_model = _by_the_model(event)
    assert by_model is not None, event
    assert by_model.pop("idempotency_key") is None
    assert quick == by_model
    assert list(quick) == list(by_model)


def test_the_usual_events_are_passed_quickly() -> None:
    """The quick path must actually serve the common shapes, or the batch gains nothing."""
    usual = [
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1},
        {"end_user_id": "u1", "feature_key": "api_calls", "units": "2.5"},
        {"end_user_id": "u1", "feature_key": "api_calls", "units": Decimal("2.5"), "idempotency_key": None},
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "timestamp": "2026-01-01T00:00:00Z",
         "metadata": {"model": "m", "n": [1, Decimal("0.5")]}},
    ]
    for event in usual:
        expected = _by_the_model(event)
        assert expected is not None
        expected.pop("idempotency_key")
        assert schemas.plain_usage(event) == expected


def test_events_the_model_must_judge_are_left_to_it() -> None:
    for event in [
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "idempotency_key": "k"},
        {"end_user_id": "u1", "feature_key": "api_calls"},
        {"end_user_id": "u1", "feature_key": "api calls", "units": 1},
        {"end_user_id": "u1", "feature_key": "api_calls\n", "units": 1},
        {"end_user_id": "", "feature_key": "api_calls", "units": 1},
        {"end_user_id": 7, "feature_key": "api_calls", "units": 1},
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "colour": "red"},
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "metadata": []},
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "timestamp": 5},
        ["u1", "api_calls", 1],
    ]:
        assert schemas.plain_usage(event) is None, event
