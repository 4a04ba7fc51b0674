"""An S3-compatible bucket prefix as a store of verified objects.

Every object is written with its sha256 in the object's metadata (``x-amz-meta-sha256``), computed
from the local bytes before the upload; a download is hashed as it arrives and refused when it does
not match, so a corrupted, truncated or replaced object is never used. What to compare against is
recorded by the uploader, not computed by the server (an ETag is not a content hash for multipart
uploads). Credentials come from boto3's usual sources (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
profiles, instance roles) and are never logged; the endpoint from the URL's ``?endpoint_url=``, then
``storage.s3_endpoint_url``, then ``AWS_ENDPOINT_URL`` (read by boto3 itself).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from esper_core.errors import ConfigError, Problem
from esper_core.extras import require_extra
from esper_core.redact import redacted_text, redacted_url

SHA_KEY = "sha256"
CHUNK = 1 << 20


class ObjectError(Exception):
    """The store could not be reached or refused a request (the caller decides what that means)."""


class IntegrityError(Exception):
    """An object whose bytes do not match the sha256 recorded when it was uploaded."""


@dataclass(frozen=True)
class Location:
    """``s3://bucket/prefix[?endpoint_url=URL&region=NAME]``, parsed."""

    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def parse(cls, url: str, source: str, field: str | None = None, endpoint_url: str | None = None) -> Location:
        """Raises a located :class:`ConfigError` for anything that is not an ``s3://`` URL with a bucket."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(Problem(source, f"{redacted_url(url)!r} is not an s3://BUCKET/PREFIX URL", field=field))
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - {"endpoint_url", "region"})
        if unknown:
            raise ConfigError(Problem(source, f"unknown URL parameter(s) {', '.join(unknown)} (known: endpoint_url, "
                                      "region)", field=field))
        return cls(parts.netloc, parts.path.strip("/"), query.get("endpoint_url") or endpoint_url,
                   query.get("region"))

    def child(self, name: str) -> Location:
        return Location(self.bucket, f"{self.prefix}/{name}".strip("/"), self.endpoint_url, self.region)

    def key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def url(self, relpath: str = "") -> str:
        """The object's address for messages (the endpoint is left out: it may carry a host name; a password
        written into the bucket's place, ``s3://KEY:SECRET@bucket``, is shown as ``***``)."""
        key = self.key(relpath) if relpath else self.prefix
        return redacted_url(f"s3://{self.bucket}/{key}".rstrip("/"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class ObjectStore:
    """Objects under one :class:`Location`. ``timeout_s`` bounds each connect and read; ``attempts``
    is the number of tries per request (boto3's standard retry mode, so a down store costs at most
    about ``attempts * timeout_s``)."""

    def __init__(self, location: Location, timeout_s: float = 3.0, attempts: int = 2) -> None:
        require_extra("s3", "s3:// URLs", source=location.url())
        import boto3
        from botocore.config import Config

        self.location = location
        config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                        retries={"mode": "standard", "total_max_attempts": attempts})
        self._client = boto3.client("s3", endpoint_url=location.endpoint_url, region_name=location.region,
                                    config=config)

    def put(self, relpath: str, path: Path, sha256: str | None = None) -> str:
        """Upload ``path`` as ``relpath`` with its sha256 as metadata; returns the sha256."""
        digest = sha256 or sha256_file(path)
        with path.open("rb") as body:
            self._call("put_object", Bucket=self.location.bucket, Key=self.location.key(relpath), Body=body,
                       Metadata={SHA_KEY: digest})
        return digest

    def recorded_sha256(self, relpath: str) -> str | None:
        """The sha256 recorded with the object, or ``None`` when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=self.location.key(relpath))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ObjectError(_describe(exc)) from None
        except Exception as exc:  # connection errors, timeouts
            raise ObjectError(_describe(exc)) from None
        return head.get("Metadata", {}).get(SHA_KEY)

    def list(self, relprefix: str = "") -> Iterator[str]:
        """Paths (relative to the location) of the objects under ``relprefix``."""
        base = self.location.key("")
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.key(relprefix)):
                for item in page.get("Contents", []):
                    yield item["Key"][len(base):]
        except Exception as exc:
            raise ObjectError(_describe(exc)) from None

    def get(self, relpath: str, destination: Path) -> str:
        """Download ``relpath`` to ``destination`` (atomically), verified against its recorded sha256;
        raises :class:`IntegrityError` (and leaves ``destination`` untouched) when it does not match."""
        response = self._call("get_object", Bucket=self.location.bucket, Key=self.location.key(relpath))
        recorded = response.get("Metadata", {}).get(SHA_KEY)
        if not recorded:
            raise IntegrityError("has no recorded sha256 (not uploaded by Esper)")
        destination.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, temp = tempfile.mkstemp(prefix=f".{destination.name}-", suffix=".part", dir=destination.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                for block in _chunks(response["Body"]):
                    digest.update(block)
                    handle.write(block)
            if digest.hexdigest() != recorded:
                raise IntegrityError(f"sha256 {digest.hexdigest()[:12]}... does not match the sha256 recorded at "
                                     f"upload ({recorded[:12]}...): corrupted or replaced")
            os.replace(temp, destination)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return recorded

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(**kwargs)
        except Exception as exc:  # botocore's connection, timeout and client errors alike
            raise ObjectError(_describe(exc)) from None


def _chunks(body: Any) -> Iterator[bytes]:
    """An object's body in blocks. A connection that breaks mid-object (botocore's streaming and
    read-timeout errors come out of the read, not the request) is an :class:`ObjectError` like one
    that fails before the first byte."""
    try:
        yield from body.iter_chunks(CHUNK)
    except Exception as exc:
        raise ObjectError(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    """One line about a failure. botocore messages name the operation and may quote the endpoint URL as
    given, user info and all (``http://user:pw@host``): its password is shown as ``***``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {redacted_text(lines[0]) if lines else 'no message'}"
