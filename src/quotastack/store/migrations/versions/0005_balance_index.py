"""A covering index for the balance sum on the hot path (no table reads for a check).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.drop_index("blocks_balance", "blocks")
    op.create_index("blocks_balance", "blocks", ["env_id", "end_user_id", "feature_key", "status",
                                                 "effective_at_us", "expires_at_us", "remaining"])
