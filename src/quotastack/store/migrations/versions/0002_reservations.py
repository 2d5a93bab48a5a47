"""Reservations, the credits they hold per block, and refunds.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Instant = sa.BigInteger
Minor = sa.BigInteger


def upgrade() -> None:
    op.create_table(
        "reservations",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("end_user_id", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("charged_feature_key", sa.Text, nullable=False),
        sa.Column("units", Minor, nullable=False),
        sa.Column("amount", Minor, nullable=False),  # held at creation, in the charged feature
        sa.Column("committed_amount", Minor, nullable=False),
        sa.Column("status", sa.Text, nullable=False),  # held | committed | released | expired
        sa.Column("expires_at_us", Instant, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.Column("ended_at_us", Instant),
    )
    op.create_index("reservations_user", "reservations",
                    ["env_id", "end_user_id", "charged_feature_key", "status"])
    op.create_index("reservations_due", "reservations", ["env_id", "status", "expires_at_us"])
    op.create_index("reservations_env", "reservations", ["env_id", "seq"])
    op.create_table(
        "reservation_holds",
        sa.Column("reservation_id", sa.Text, nullable=False),
        sa.Column("block_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),  # the order the block was drawn in
        sa.Column("amount", Minor, nullable=False),  # still held from this block
        sa.PrimaryKeyConstraint("reservation_id", "block_id"),
    )
    op.create_table(
        "refunds",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("end_user_id", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("usage_id", sa.Text),
        sa.Column("reservation_id", sa.Text),
        sa.Column("requested", Minor, nullable=False),
        sa.Column("amount", Minor, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_index("refunds_env", "refunds", ["env_id", "seq"])
    with op.batch_alter_table("usage_events") as batch:
        batch.add_column(sa.Column("reservation_id", sa.Text))
