"""The subscription state machine: every status × action pair."""

import pytest

from quotastack.domain.errors import InvalidState
from quotastack.domain.lifecycle import ACTIONS, STATUSES, at_period_end, resumed_status, transition

EXPECTED = {
    "trialing": {"change": "trialing", "pause": "paused", "resume": None, "cancel": "canceled",
                 "renew": "active", "period_end": "active"},
    "active": {"change": "active", "pause": "paused", "resume": None, "cancel": "canceled",
               "renew": "active", "period_end": "active"},
    "paused": {"change": None, "pause": None, "resume": "active", "cancel": "canceled", "renew": None,
               "period_end": None},
    "canceled": dict.fromkeys(ACTIONS),
    "expired": dict.fromkeys(ACTIONS),
}


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("action", ACTIONS)
def test_every_status_and_action(status: str, action: str) -> None:
    expected = EXPECTED[status][action]
    if expected is None:
        with pytest.raises(InvalidState) as err:
            transition(status, action)
        assert err.value.code == "invalid_state"
    else:
        assert transition(status, action) == expected


@pytest.mark.parametrize(("status", "cancel", "renew", "after"), [
    ("active", False, True, "active"),
    ("active", False, False, "expired"),
    ("active", True, True, "canceled"),
    ("active", True, False, "canceled"),
    ("trialing", False, False, "active"),
    ("trialing", True, True, "canceled"),
])
def test_what_the_end_of_a_period_does(status: str, cancel: bool, renew: bool, after: str) -> None:
    assert at_period_end(status, cancel, renew) == after


def test_a_paused_subscription_has_no_period_end() -> None:
    with pytest.raises(InvalidState):
        at_period_end("paused", False, True)


def test_resume_returns_to_the_trial_while_it_has_time_left() -> None:
    assert resumed_status(2_000, 1_000) == "trialing"
    assert resumed_status(2_000, 2_000) == "active"
    assert resumed_status(None, 1_000) == "active"
