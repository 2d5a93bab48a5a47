"""The core schema: tenants, keys, catalog, subscriptions, blocks, ledger, usage, events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

# A surrogate ``seq`` orders rows by insertion (cursor pagination, creation order in the
# burn-down); on SQLite it must be INTEGER to alias the rowid.
Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Instant = sa.BigInteger  # microseconds since the epoch, UTC
Minor = sa.BigInteger  # an amount in minor units of its feature


def seq() -> sa.Column:
    return sa.Column("seq", Seq, primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_table(
        "environments",
        sa.Column("id", Seq, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),  # sandbox | live
        sa.Column("clock_offset_us", Instant, nullable=False, server_default="0"),
        sa.UniqueConstraint("tenant_id", "kind"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("key_hint", sa.Text, nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.Column("revoked_at_us", Instant),
    )
    op.create_index("api_keys_env", "api_keys", ["env_id", "created_at_us"])
    op.create_table(
        "features",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("unit", sa.Text),
        sa.Column("precision", sa.Integer, nullable=False),
        sa.Column("credit_pool", sa.Text),
        sa.Column("credits_per_unit", sa.Text),  # exact decimal, as text
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.UniqueConstraint("env_id", "key"),
    )
    op.create_table(
        "plans",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("is_default", sa.Boolean, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.UniqueConstraint("env_id", "key"),
    )
    op.create_table(
        "plan_variants",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("plan_id", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("price", sa.Text),  # {"amount": "20", "currency": "USD"}
        sa.Column("billing_period", sa.Text, nullable=False),
        sa.Column("trial_period", sa.Text),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.UniqueConstraint("env_id", "key"),
    )
    op.create_index("plan_variants_plan", "plan_variants", ["plan_id", "seq"])
    op.create_table(
        "variant_entitlements",
        sa.Column("variant_id", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("amount", Minor),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("unlimited", sa.Boolean, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("max_balance", Minor),
        sa.Column("overage", sa.Text, nullable=False),
        sa.Column("reset", sa.Text),
        sa.Column("rollover", sa.Text),
        sa.Column("pricing", sa.Text),
        sa.PrimaryKeyConstraint("variant_id", "feature_key"),
    )
    op.create_table(
        "packs",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("amount", Minor, nullable=False),
        sa.Column("price", sa.Text),
        sa.Column("expires_after", sa.Text),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.UniqueConstraint("env_id", "key"),
    )
    op.create_table(
        "end_users",
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("end_user_id", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.PrimaryKeyConstraint("env_id", "end_user_id"),
    )
    op.create_table(
        "subscriptions",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("end_user_id", sa.Text, nullable=False),
        sa.Column("plan_id", sa.Text, nullable=False),
        sa.Column("variant_id", sa.Text, nullable=False),
        sa.Column("is_default_plan", sa.Boolean, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("live", sa.Boolean, nullable=False),  # status not in (canceled, expired)
        sa.Column("anchor_us", Instant, nullable=False),
        sa.Column("current_period_start_us", Instant, nullable=False),
        sa.Column("current_period_end_us", Instant, nullable=False),
        sa.Column("trial_end_us", Instant),
        sa.Column("cancel_at_period_end", sa.Boolean, nullable=False),
        sa.Column("paused_at_us", Instant),
        sa.Column("auto_renew", sa.Boolean, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),
        sa.Column("scheduled_change", sa.Text),
        sa.Column("ended_at_us", Instant),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_index("subscriptions_user", "subscriptions", ["env_id", "end_user_id", "live"])
    op.create_index("subscriptions_env", "subscriptions", ["env_id", "seq"])
    op.create_table(
        "blocks",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("end_user_id", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("original_amount", Minor, nullable=False),
        sa.Column("remaining", Minor, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("effective_at_us", Instant, nullable=False),
        sa.Column("expires_at_us", Instant),
        sa.Column("source", sa.Text, nullable=False),  # plan | manual | promo | purchase | rollover
        # scheduled: its grant entry is due at effective_at; active; expired; voided
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("subscription_id", sa.Text),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_index("blocks_balance", "blocks", ["env_id", "end_user_id", "feature_key", "status"])
    op.create_index("blocks_due", "blocks", ["env_id", "status", "expires_at_us"])
    op.create_table(
        "usage_events",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("end_user_id", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("charged_feature_key", sa.Text, nullable=False),
        sa.Column("units", Minor, nullable=False),
        sa.Column("amount", Minor, nullable=False),
        sa.Column("overage", Minor, nullable=False),
        sa.Column("timestamp_us", Instant, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_index("usage_events_user", "usage_events",
                    ["env_id", "end_user_id", "feature_key", "timestamp_us"])
    op.create_table(
        "ledger_entries",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("end_user_id", sa.Text, nullable=False),
        sa.Column("feature_key", sa.Text, nullable=False),
        sa.Column("block_id", sa.Text),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("amount", Minor, nullable=False),
        sa.Column("balance_after", Minor, nullable=False),
        sa.Column("reserved_after", Minor, nullable=False),
        sa.Column("usage_id", sa.Text),
        sa.Column("reservation_id", sa.Text),
        sa.Column("subscription_id", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_index("ledger_env", "ledger_entries", ["env_id", "seq"])
    op.create_index("ledger_user", "ledger_entries", ["env_id", "end_user_id", "feature_key", "seq"])
    op.create_index("ledger_block", "ledger_entries", ["block_id"])
    op.create_index("ledger_usage", "ledger_entries", ["usage_id"])
    op.create_index("ledger_reservation", "ledger_entries", ["reservation_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
        sa.PrimaryKeyConstraint("env_id", "key"),
    )
    op.create_index("idempotency_keys_age", "idempotency_keys", ["created_at_us"])
    op.create_table(
        "events",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_index("events_env", "events", ["env_id", "seq"])
    op.create_table(
        "audit_log",
        seq(),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("env_id", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.Text),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("object_ids", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("created_at_us", Instant, nullable=False),
    )
    op.create_index("audit_log_env", "audit_log", ["env_id", "seq"])
