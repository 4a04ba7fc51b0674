"""Run artifacts on S3-compatible object storage (``storage.artifacts_url: s3://bucket/prefix``).

A run directory is mirrored object by object under ``s3://bucket/prefix/<run name>/``, each object
carrying the sha256 of its bytes as metadata: :mod:`.objects` talks to the store (boto3, bounded
timeouts and retries), :mod:`.publish` uploads after each local atomic commit and never fails a run,
:mod:`.fetch` downloads a run or one checkpoint into a local cache, refusing any object whose bytes
do not match their recorded sha256. The local run directory is always the source of truth; the
store is a copy that ``esper sync`` can complete later.
"""
