"""Subscription time: the next instant something is due, and each entitlement's current window.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        # The earliest boundary not yet processed (period end or a reset window's end); NULL
        # while paused or ended. Requests process it before answering.
        batch.add_column(sa.Column("next_due_us", sa.BigInteger))
    op.create_index("subscriptions_due", "subscriptions", ["env_id", "next_due_us"])
    op.execute("UPDATE subscriptions SET next_due_us = current_period_end_us WHERE live = true")
    op.create_table(
        "allowance_windows",
        sa.Column("subscription_id", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("window_start_us", sa.BigInteger, nullable=False),
        sa.Column("window_end_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "feature_key"),
    )
