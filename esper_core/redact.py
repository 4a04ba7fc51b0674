"""URLs as Esper shows them: never with a secret in them.

Database, Redis and artifact-store URLs may carry a password in their user info
(``postgresql://user:pw@host/db``) or in a query parameter (``?password=pw``, as libpq and redis-py
accept). Anything Esper prints, logs or records goes through :func:`redacted_url` first.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd", "pass", "secret", "token", "sslpassword", "api_key",
                               "apikey", "access_key", "secret_key", "aws_secret_access_key"})
"""Query parameters whose value is a secret (compared without case)."""


def redacted_url(url: str) -> str:
    """``url`` with the password of its user info and every secret query parameter replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: show nothing of it that could be a secret
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        if ":" in credentials:
            netloc = f"{credentials.split(':', 1)[0]}:***@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(f"{key}=***" if key.lower() in SECRET_PARAMETERS else f"{key}={value}" for key, value in pairs)
    if netloc == parts.netloc and not any(key.lower() in SECRET_PARAMETERS for key, _ in pairs):
        return url  # nothing secret: as given (rebuilding would also drop the empty host of sqlite:////path)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
