"""What was used of a window's allowance under earlier variants, carried across plan changes.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("allowance_windows") as batch:
        batch.add_column(sa.Column("used", sa.BigInteger, nullable=False, server_default="0"))
