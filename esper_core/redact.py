"""URLs as Esper shows them: never with a secret in them.

Database, Redis and artifact-store URLs may carry a password in their user info
(``postgresql://user:pw@host/db``), in a query parameter (``?password=pw``, as libpq and redis-py
accept) or in a URL nested in a query parameter (``s3://bucket/run?endpoint_url=http://user:pw@host``).
Anything Esper prints, logs or records goes through :func:`redacted_url` first, and a client library's
error text, which may quote such a URL, through :func:`redacted_text`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd", "pass", "secret", "token", "sslpassword", "api_key",
                               "apikey", "access_key", "secret_key", "aws_secret_access_key"})
"""Query parameters whose value is a secret (compared without case)."""


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
"""A URL inside a message: a scheme, ``://``, then everything up to a space or a quote."""


def redacted_url(url: str) -> str:
    """``url`` with the password of its user info and every secret query parameter replaced by ``***``,
    and so are those of a URL given as a query parameter's value (``?endpoint_url=http://user:pw@host``:
    boto3 takes the user info as given, and its errors quote the endpoint). Hosts and ports stay visible."""
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
    shown = [(key, "***" if key.lower() in SECRET_PARAMETERS else redacted_text(value)) for key, value in pairs]
    if netloc == parts.netloc and shown == pairs:
        return url  # nothing secret: as given (rebuilding would also drop the empty host of sqlite:////path)
    query = "&".join(f"{key}={value}" for key, value in shown)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redacted_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redacted_url`: for messages Esper did not
    write (botocore's "Could not connect to the endpoint URL: ..." quotes the endpoint as given)."""
    return _URL_IN_TEXT.sub(lambda match: redacted_url(match.group(0)), text)
