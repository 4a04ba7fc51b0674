"""Events: refuse TRUNCATE (PostgreSQL), and refuse any inserted line whose stored sha256 is not the
line's own (both backends), so the repository's copy of a run's history can only grow, verbatim.

The UPDATE and DELETE triggers of 0001 cover row changes; TRUNCATE is a statement of its own in
PostgreSQL that row triggers never see. The digest check runs in the database, not in Esper, so a
row written by any other client (psql, the sqlite3 shell) is held to it too. SQLite has no sha256
function: Esper registers ``esper_sha256`` on each of its connections (``esper_core.storage.db``),
so another SQLite client cannot insert events at all, which is the safe side.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_UPGRADE = {
    "sqlite": [
        "CREATE TRIGGER events_sha256_matches BEFORE INSERT ON events "
        "WHEN NEW.sha256 IS NOT esper_sha256(NEW.line) "
        "BEGIN SELECT RAISE(ABORT, 'events: sha256 does not match the line'); END",
    ],
    "postgresql": [
        "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION esper_events_append_only()",
        "CREATE FUNCTION esper_events_sha256_matches() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.sha256 IS DISTINCT FROM encode(sha256(convert_to(NEW.line, 'UTF8')), 'hex') THEN "
        "RAISE EXCEPTION 'events: sha256 does not match the line'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER events_sha256_matches BEFORE INSERT ON events "
        "FOR EACH ROW EXECUTE FUNCTION esper_events_sha256_matches()",
    ],
}
_DOWNGRADE = {
    "sqlite": ["DROP TRIGGER events_sha256_matches"],
    "postgresql": ["DROP TRIGGER events_sha256_matches ON events", "DROP FUNCTION esper_events_sha256_matches()",
                   "DROP TRIGGER events_no_truncate ON events"],
}


def upgrade() -> None:
    for statement in _UPGRADE.get(op.get_bind().dialect.name, []):
        op.execute(statement)


def downgrade() -> None:
    for statement in _DOWNGRADE.get(op.get_bind().dialect.name, []):
        op.execute(statement)
