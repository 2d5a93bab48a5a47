"""Persistence: migrations, the SQL unit of work, and the database adapters."""

from __future__ import annotations

from .database import open_database

__all__ = ["open_database"]
