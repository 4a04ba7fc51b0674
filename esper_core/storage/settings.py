"""Where the storage tiers are and how long to wait for them: the recipe's ``storage`` section, with
``ESPER_DATABASE_URL`` / ``ESPER_REDIS_URL`` taking precedence and ``ESPER_SIGNING_KEY`` enabling
HMAC signatures on shared entries.

The environment wins over the recipe so one recipe can run on a laptop (no services) and on a
cluster (services named by the job's environment) unchanged, and so secrets embedded in URLs need
not be written into recipes, which end up in run directories and reports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.extras import require_extra
from esper_core.recipe.schema import StorageConfig

DATABASE_ENV = "ESPER_DATABASE_URL"
REDIS_ENV = "ESPER_REDIS_URL"
SIGNING_KEY_ENV = "ESPER_SIGNING_KEY"
MIN_KEY_BYTES = 16
DATABASE_FILE = "esper.db"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def sqlite_url(workspace: str | Path) -> str:
    """The default asset repository: ``<workspace>/esper.db``."""
    return f"sqlite:///{(Path(workspace) / DATABASE_FILE).resolve()}"


@dataclass(frozen=True)
class StorageSettings:
    """Resolved storage configuration (see :meth:`resolve`)."""

    workspace: Path
    database_url: str
    redis_url: str | None = None
    signing_key: bytes | None = None
    memory_bytes: int = StorageConfig().memory_bytes
    redis_deadline_s: float = StorageConfig().redis_deadline_ms / 1000
    database_deadline_s: float = StorageConfig().database_deadline_ms / 1000
    breaker_failures: int = StorageConfig().breaker_failures
    breaker_reset_s: float = StorageConfig().breaker_reset_s
    namespace: str = "esper"
    """Prefix of every Redis key (lets tests and tenants share one Redis without touching each other)."""

    @classmethod
    def resolve(cls, cfg: StorageConfig, env: Mapping[str, str] | None = None) -> StorageSettings:
        """Settings from ``cfg`` and the environment; raises ``ConfigError`` (located) for bad values."""
        env = os.environ if env is None else env
        workspace = Path(cfg.workspace)
        database, database_from = _pick(env, DATABASE_ENV, cfg.database_url, "storage.database_url")
        redis_url, redis_from = _pick(env, REDIS_ENV, cfg.redis_url, "storage.redis_url")
        if database is not None:
            _check_database(database, database_from)
        if redis_url is not None and not redis_url.startswith(_REDIS_SCHEMES):
            raise ConfigError(_problem(redis_from, "storage.redis_url",
                                       "not a Redis URL (expected redis://HOST:PORT[/DB], rediss:// or unix://)"))
        if redis_url is not None:
            _require(redis_from, "storage.redis_url", "redis", f"{redis_url.split('://')[0]}:// URLs")
            _check_redis(redis_url, redis_from)
        if cfg.artifacts_url:  # checked before the run starts, not at its first checkpoint
            _require("storage.artifacts_url", "storage.artifacts_url", "s3", "s3:// URLs")
        return cls(workspace=workspace, database_url=database or sqlite_url(workspace), redis_url=redis_url,
                   signing_key=signing_key(env), memory_bytes=cfg.memory_bytes,
                   redis_deadline_s=cfg.redis_deadline_ms / 1000, database_deadline_s=cfg.database_deadline_ms / 1000,
                   breaker_failures=cfg.breaker_failures, breaker_reset_s=cfg.breaker_reset_s)


def signing_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """``ESPER_SIGNING_KEY`` as bytes, ``None`` when unset; ``ConfigError`` when too short to be a key."""
    key = (os.environ if env is None else env).get(SIGNING_KEY_ENV) or None
    if key is not None and len(key.encode()) < MIN_KEY_BYTES:
        raise ConfigError(Problem(SIGNING_KEY_ENV, f"the signing key must be at least {MIN_KEY_BYTES} bytes"))
    return None if key is None else key.encode()


def _pick(env: Mapping[str, str], name: str, configured: str | None, field: str) -> tuple[str | None, str]:
    """The value and where it came from (an environment variable or the recipe field)."""
    if env.get(name):
        return env[name], name
    return configured or None, field


def _problem(source: str, field: str, message: str) -> Problem:
    if source == field:  # from the recipe: the trainer re-locates RECIPE_FIELD problems to the field's line
        return Problem(RECIPE_FIELD, message, field=field)
    return Problem(source, message)


def _check_database(url: str, source: str) -> None:
    from esper_core.storage.db import normalise_url  # imports SQLAlchemy: only when a URL is configured

    try:
        parsed = normalise_url(url)
    except ValueError as exc:
        raise ConfigError(_problem(source, "storage.database_url", str(exc))) from None
    if parsed.drivername == "postgresql+psycopg":  # the driver plain postgresql:// URLs get
        _require(source, "storage.database_url", "postgres", "postgresql:// URLs")


def _check_redis(url: str, source: str) -> None:
    """A port and database number redis-py can use: it raised a bare ValueError for a port that is
    not a number at the first connection, and read a database that is not one as database 0 (another
    tenant's, perhaps)."""
    from urllib.parse import urlsplit

    from esper_core.redact import redacted_url

    if not url.startswith(("redis://", "rediss://")):
        return  # unix:// names a socket path
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError when it is not a number in 0..65535)
    except ValueError:
        raise ConfigError(_problem(source, "storage.redis_url", f"{redacted_url(url)}: the port must be a number "
                                   "from 0 to 65535")) from None
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ConfigError(_problem(source, "storage.redis_url", f"{redacted_url(url)}: the database "
                                   f"({database!r}) must be a number, as in redis://HOST:PORT/0"))


def _require(source: str, field: str, extra: str, feature: str) -> None:
    """Stop before any tier is built when the URL's client library is an extra that is not installed."""
    where = _problem(source, field, "")
    require_extra(extra, feature, source=where.source, field=where.field)
