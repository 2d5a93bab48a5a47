"""The subscription state machine, as a table.

Statuses: ``trialing``, ``active``, ``paused``, ``canceled``, ``expired``. The last two are final.
Actions come from the API (change, pause, resume, cancel, renew) or from time (``period_end``,
whose outcome depends on the subscription: see ``at_period_end``).
"""

from __future__ import annotations

from .errors import InvalidState

STATUSES = ("trialing", "active", "paused", "canceled", "expired")
LIVE = frozenset({"trialing", "active", "paused"})
ACTIONS = ("change", "pause", "resume", "cancel", "renew", "period_end")

# (status, action) -> status after it. A pair that is missing is not allowed (409 invalid_state).
# ``cancel`` is listed with its immediate outcome; cancel at period end keeps the status and
# sets ``cancel_at_period_end``. ``resume`` returns to ``trialing`` while the trial has time left
# (the service decides, see ``resumed_status``).
TRANSITIONS: dict[tuple[str, str], str] = {
    ("trialing", "change"): "trialing",
    ("trialing", "pause"): "paused",
    ("trialing", "cancel"): "canceled",
    ("trialing", "renew"): "active",  # ends the trial: the paid period starts now
    ("trialing", "period_end"): "active",  # the trial ends into the first paid period
    ("active", "change"): "active",
    ("active", "pause"): "paused",
    ("active", "cancel"): "canceled",
    ("active", "renew"): "active",
    ("active", "period_end"): "active",  # renewed; or canceled/expired, see at_period_end
    ("paused", "resume"): "active",
    ("paused", "cancel"): "canceled",
}


def transition(status: str, action: str) -> str:
    """The status after ``action``, or InvalidState when ``status`` does not allow it."""
    after = TRANSITIONS.get((status, action))
    if after is None:
        raise InvalidState(f"a {status} subscription cannot {action.replace('_', ' ')}")
    return after


def at_period_end(status: str, cancel_at_period_end: bool, auto_renew: bool) -> str:
    """What the end of the current period makes of a live subscription."""
    after = transition(status, "period_end")
    if status == "trialing":
        return "canceled" if cancel_at_period_end else after
    if cancel_at_period_end:
        return "canceled"
    return after if auto_renew else "expired"


def resumed_status(trial_end_us: int | None, resumed_at_us: int) -> str:
    return "trialing" if trial_end_us is not None and trial_end_us > resumed_at_us else "active"
