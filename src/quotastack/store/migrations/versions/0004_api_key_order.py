"""API keys get a ``seq`` per environment, so they list newest first with cursors like the rest.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger))
    op.execute(
        "UPDATE api_keys SET seq = (SELECT COUNT(*) FROM api_keys older WHERE older.env_id = api_keys.env_id "
        "AND (older.created_at_us < api_keys.created_at_us OR (older.created_at_us = api_keys.created_at_us "
        "AND older.id <= api_keys.id)))")
    op.create_index("api_keys_seq", "api_keys", ["env_id", "seq"], unique=True)
