"""Alembic migrations of the asset repository (applied by :mod:`esper_core.storage.db`)."""
