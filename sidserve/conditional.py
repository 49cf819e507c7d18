"""Compare-and-swap of one small object on an object store (a snapshot root's LATEST).

pyarrow's filesystems have no conditional write, so a check followed by a PUT leaves a window
in which another publisher's PUT is silently replaced. S3 and GCS close it in the write
itself: S3's PutObject with ``If-Match: <etag>`` (or ``If-None-Match: *`` for "only if absent"),
GCS's upload with ``ifGenerationMatch=<generation>`` (0 for "only if absent"). ``read`` returns
the object's bytes with its version token (ETag, generation); ``write(data, token)`` succeeds
only if the object still carries that token, else ``Conflict``: check and write are one request.

S3 goes through boto3 (``pip install 'sidserve[s3]'``), which reads the same credentials and
endpoint settings as pyarrow (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...); GCS through
google-cloud-storage (``pip install 'sidserve[gcs]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

PRECONDITION_FAILED = 412  # HTTP status of a failed If-Match / ifGenerationMatch
CONDITIONAL_CONFLICT = 409  # S3: a concurrent conditional write to the same key won


class Conflict(Exception):
    """The object changed since it was read (another writer won)."""


@dataclass(frozen=True)
class Versioned:
    data: bytes | None  # None: no such object
    token: Any  # ETag (S3) or generation (GCS) of what was read; None when absent


class S3Object:
    """One S3 key, read with its ETag and written with If-Match / If-None-Match."""

    def __init__(self, bucket: str, key: str, client: Any = None):
        if client is None:
            try:
                import boto3
            except ImportError as e:
                raise ValueError(f"s3://{bucket}/{key}: publishing with a compare-and-swap needs boto3 "
                                 "(pip install 'sidserve[s3]')") from e
            client = boto3.client("s3")
        self.bucket, self.key, self.client = bucket, key, client

    def read(self) -> Versioned:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return Versioned(None, None)
        return Versioned(r["Body"].read(), r["ETag"])

    def write(self, data: bytes, token: Any) -> None:
        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)
        except self.client.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (PRECONDITION_FAILED, CONDITIONAL_CONFLICT):
                raise Conflict(f"s3://{self.bucket}/{self.key} changed since it was read") from e
            raise


class GCSObject:
    """One GCS object, read with its generation and written with ifGenerationMatch."""

    def __init__(self, bucket: str, key: str, bucket_handle: Any = None):
        if bucket_handle is None:
            try:
                from google.cloud import storage
            except ImportError as e:
                raise ValueError(f"gs://{bucket}/{key}: publishing with a compare-and-swap needs "
                                 "google-cloud-storage (pip install 'sidserve[gcs]')") from e
            bucket_handle = storage.Client().bucket(bucket)
        self.name, self.key, self.bucket = bucket, key, bucket_handle

    def read(self) -> Versioned:
        blob = self.bucket.get_blob(self.key)
        if blob is None:
            return Versioned(None, None)
        # the bytes of exactly that generation (a newer one makes this read fail, not mix)
        return Versioned(blob.download_as_bytes(if_generation_match=blob.generation), blob.generation)

    def write(self, data: bytes, token: Any) -> None:
        try:
            self.bucket.blob(self.key).upload_from_string(data, if_generation_match=0 if token is None else token)
        except Exception as e:  # google.api_core.exceptions.PreconditionFailed carries code 412
            if getattr(e, "code", None) == PRECONDITION_FAILED:
                raise Conflict(f"gs://{self.name}/{self.key} changed since it was read") from e
            raise


def for_uri(uri: str) -> S3Object | GCSObject | None:
    """The conditional-write handle of ``s3://`` and ``gs://`` URIs; None for any other
    scheme (a local path has its own lock, see SnapshotRoot.publish)."""
    parts = urlparse(uri)
    if parts.query:
        raise ValueError(f"{uri}: query parameters are not supported on a snapshot root; set the endpoint "
                         "with AWS_ENDPOINT_URL (boto3 and pyarrow both read it)")
    key = parts.path.lstrip("/")
    if parts.scheme == "s3":
        return S3Object(parts.netloc, key)
    if parts.scheme in ("gs", "gcs"):
        return GCSObject(parts.netloc, key)
    return None
