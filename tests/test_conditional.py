"""Issue 50.7: LATEST's compare-and-swap on object stores is one conditional request.

S3: against moto's server (pinned in constraints.txt; it enforces If-Match and If-None-Match on
PutObject), reached over HTTP by both pyarrow and boto3 through AWS_ENDPOINT_URL. GCS: no
emulator that enforces ifGenerationMatch is installable here, so the precondition logic is
tested against a fake bucket that enforces generations the way GCS documents them.
"""

from __future__ import annotations

import json

import pytest

from sidserve import conditional
from sidserve.snapshot import LATEST, SUMMARY, PublishConflict, SnapshotRoot

BUCKET = "sidserve-snapshots"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    """A fresh bucket prefix on the emulator; pyarrow and boto3 both go to it."""
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    prefix = request.node.name.replace("[", "-").replace("]", "")
    return client, f"s3://{BUCKET}/{prefix}"


def complete(client, prefix: str, version: str) -> None:
    """A snapshot directory with its summary (what publish requires)."""
    key = prefix.split(f"s3://{BUCKET}/", 1)[1]
    client.put_object(Bucket=BUCKET, Key=f"{key}/snapshots/{version}/{SUMMARY}",
                      Body=json.dumps({"version": version}).encode())


def test_s3_publish_checks_the_expected_version(s3):
    client, uri = s3
    root = SnapshotRoot(uri)
    for v in ("v1", "v2", "v3"):
        complete(client, uri, v)
    root.publish("v1", expected=None)  # nothing published yet: If-None-Match
    assert root.latest() == "v1"
    root.publish("v2", expected="v1")  # If-Match of v1's ETag
    assert root.latest() == "v2"
    with pytest.raises(PublishConflict, match="started from v1, but LATEST now names v2"):
        root.publish("v3", expected="v1")
    with pytest.raises(PublishConflict, match="no published snapshot"):
        root.publish("v3", expected=None)
    assert root.latest() == "v2"
    root.publish("v1")  # a manual re-point (no expected) is unconditional
    assert root.latest() == "v1"


def test_s3_a_publish_between_the_check_and_the_write_fails_the_later_one(s3, monkeypatch):
    """Another run's PUT of LATEST lands after this run checked LATEST and before its own PUT
    is applied (injected inside moto's server, just before it handles this run's PUT).
    Check-then-PUT replaced the other run's version silently; the conditional PUT refuses,
    and LATEST keeps the other run's version."""
    from moto.s3.models import s3_backends
    from moto.s3.responses import S3Response

    client, uri = s3
    root = SnapshotRoot(uri)
    for v in ("v1", "theirs", "mine"):
        complete(client, uri, v)
    root.publish("v1", expected=None)
    latest_key = uri.split(f"s3://{BUCKET}/", 1)[1] + "/" + LATEST
    original = S3Response.put_object
    raced = []

    def put_object(self):
        if self.parse_key_name() == latest_key and not raced:
            raced.append(True)  # once: the other run publishes "theirs" now
            s3_backends[self.current_account][self.partition].put_object(BUCKET, latest_key, b"theirs\n")
        return original(self)

    monkeypatch.setattr(S3Response, "put_object", put_object)
    with pytest.raises(PublishConflict, match="changed between this run's check"):
        root.publish("mine", expected="v1")
    assert raced  # the interleaving did happen
    assert root.latest() == "theirs"


def test_s3_object_conditions_are_enforced_by_the_emulator(s3):
    client, uri = s3
    obj = conditional.for_uri(uri + "/x")
    assert obj.read() == conditional.Versioned(None, None)
    obj.write(b"a", None)
    with pytest.raises(conditional.Conflict):
        obj.write(b"b", None)  # If-None-Match: * on an existing object
    first = obj.read()
    assert first.data == b"a"
    obj.write(b"b", first.token)
    with pytest.raises(conditional.Conflict):
        obj.write(b"c", first.token)  # a stale ETag
    assert obj.read().data == b"b"


class FakeGCSBucket:
    """Generations as GCS documents them: every write makes a new one; ifGenerationMatch=0
    means "only if absent"; a mismatch is HTTP 412."""

    class PreconditionFailed(Exception):
        code = 412

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.next_generation = 1000

    def get_blob(self, key):
        return None if key not in self.objects else self.blob(key, self.objects[key][1])

    def blob(self, key, generation=None):
        bucket = self

        class Blob:
            def __init__(self):
                self.generation = generation

            def download_as_bytes(self, if_generation_match=None):
                data, gen = bucket.objects[key]
                if if_generation_match is not None and if_generation_match != gen:
                    raise FakeGCSBucket.PreconditionFailed(key)
                return data

            def upload_from_string(self, data, if_generation_match=None):
                gen = bucket.objects.get(key, (None, 0))[1]
                if if_generation_match is not None and if_generation_match != gen:
                    raise FakeGCSBucket.PreconditionFailed(key)
                bucket.next_generation += 1
                bucket.objects[key] = (data, bucket.next_generation)

        return Blob()


def test_gcs_object_writes_only_on_the_generation_it_read():
    bucket = FakeGCSBucket()
    obj = conditional.GCSObject("b", "root/LATEST", bucket_handle=bucket)
    assert obj.read() == conditional.Versioned(None, None)
    obj.write(b"v1\n", None)  # ifGenerationMatch=0: only if absent
    with pytest.raises(conditional.Conflict):
        obj.write(b"v9\n", None)
    seen = obj.read()
    other = conditional.GCSObject("b", "root/LATEST", bucket_handle=bucket)
    other.write(b"theirs\n", other.read().token)  # another writer, after our read
    with pytest.raises(conditional.Conflict):
        obj.write(b"mine\n", seen.token)
    assert obj.read().data == b"theirs\n"


def test_uris_without_a_conditional_write(tmp_path):
    assert conditional.for_uri(str(tmp_path / "LATEST")) is None
    assert conditional.for_uri("hdfs://nn/x/LATEST") is None
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        conditional.for_uri("s3://b/x/LATEST?endpoint_override=localhost:9000")
