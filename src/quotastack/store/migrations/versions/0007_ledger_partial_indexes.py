"""The ledger's usage and reservation indexes hold only entries that name one.

Most entries have no ``reservation_id`` (every usage's), many no ``usage_id`` (grants, expiries,
reserves); indexing their NULLs cost each an index write and was never read: these indexes serve
``usage_id = …`` and ``reservation_id = …`` only (refunds, ``GET /v1/ledger?usage_id=`` and
``?reservation_id=``), which imply NOT NULL, so SQLite and PostgreSQL use the partial index.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    for column in ("usage_id", "reservation_id"):
        name = f"ledger_{column.removesuffix('_id')}"
        op.drop_index(name, "ledger_entries")
        op.create_index(name, "ledger_entries", [column], sqlite_where=sa.text(f"{column} IS NOT NULL"),
                        postgresql_where=sa.text(f"{column} IS NOT NULL"))
