"""Alembic environment: migrations always run on a connection handed in by
:func:`esper_core.storage.db.migrate` (inside its migration lock), never from a config file URL."""

from __future__ import annotations

from alembic import context

from esper_core.storage.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite cannot ALTER most things
with context.begin_transaction():
    context.run_migrations()
