"""Snapshots and artifacts: one writer publishes, names read from data are checked."""

import json
import threading
from pathlib import Path

import pytest

from sidserve.artifact import read_artifact, safe_name, write_artifact
from sidserve.files import try_lock
from sidserve.snapshot import LATEST, SUMMARY, PublishConflict, SnapshotRoot


def complete(root: SnapshotRoot, *versions: str) -> SnapshotRoot:
    """Snapshot directories with their summary (what makes a snapshot publishable)."""
    for v in versions:
        d = Path(root.path) / "snapshots" / v
        d.mkdir(parents=True, exist_ok=True)
        (d / SUMMARY).write_text(json.dumps({"version": v}))
    return root


def test_the_second_of_two_runs_from_the_same_snapshot_fails_naming_both(tmp_path):
    root = complete(SnapshotRoot(str(tmp_path)), "v0", "night-a", "manual-b", "first")
    root.publish("v0", expected=None)
    started_from = root.latest()
    root.publish("night-a", expected=started_from)  # the first run to finish wins
    with pytest.raises(PublishConflict, match=r"started from v0, but LATEST now names night-a"):
        root.publish("manual-b", expected=started_from)
    assert root.latest() == "night-a"
    root.publish("manual-b", expected="night-a")  # rebuilt on the new snapshot: fine
    with pytest.raises(PublishConflict, match="started from no published snapshot"):
        SnapshotRoot(str(tmp_path)).publish("first", expected=None)


def test_concurrent_publishers_from_one_snapshot_exactly_one_wins(tmp_path):
    root = complete(SnapshotRoot(str(tmp_path)), "v0", *(f"run-{i}" for i in range(8)))
    root.publish("v0")
    barrier = threading.Barrier(8)
    outcome = {}

    def run(i):
        barrier.wait()
        try:
            root.publish(f"run-{i}", expected="v0")
            outcome[i] = "published"
        except PublishConflict:
            outcome[i] = "conflict"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcome.items() if o == "published"]
    assert len(winners) == 1 and root.latest() == f"run-{winners[0]}"
    lock = try_lock(str(tmp_path / f".{LATEST}.lock"))  # the lock is released (its file stays)
    assert lock is not None
    lock.release()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs", "a/b", "..", ".", "", "a\\b", " v1", "v\x00"])
def test_names_read_from_data_must_be_plain(name, tmp_path):
    with pytest.raises(ValueError, match="not a plain name"):
        safe_name(name, "x")
    (tmp_path / LATEST).write_text(name + "\n")
    if name.strip() not in ("", "v1"):  # empty: nothing published; surrounding whitespace is trimmed
        with pytest.raises(ValueError, match="LATEST names version"):
            SnapshotRoot(str(tmp_path)).latest()
    with pytest.raises(ValueError, match="not a plain name"):
        SnapshotRoot(str(tmp_path)).snapshot_dir(name)


def test_a_manifest_cannot_point_outside_its_artifact(tmp_path):
    (tmp_path / "secret").write_bytes(b"x")
    art = tmp_path / "model"
    write_artifact(str(art), {"config.json": b"{}"})
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["../secret"] = manifest["files"].pop("config.json")
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest file name '\.\./secret' is not a plain name"):
        read_artifact(str(art))
    with pytest.raises(ValueError, match="artifact file name"):
        write_artifact(str(tmp_path / "m2"), {"../x": b""})


def test_an_artifact_is_never_replaced_in_place_by_accident(fitted, tmp_path):
    from sidserve import load_tokenizer

    uri = str(tmp_path / "model")
    fitted.save_pretrained(uri)
    with pytest.raises(ValueError, match=r"already holds an artifact \(v[0-9a-f]+\); artifacts are immutable"):
        fitted.save_pretrained(uri)
    assert load_tokenizer(uri).version == fitted.version


def test_an_overwrite_killed_half_way_leaves_no_mixed_model(fitted, small_config, small_catalog, tmp_path,
                                                            monkeypatch):
    import sidserve.artifact as artifact
    from sidserve import SemanticIdTokenizer, load_tokenizer

    uri = str(tmp_path / "model")
    fitted.save_pretrained(uri)
    other = SemanticIdTokenizer(small_config.replace(epochs=1, seed=11)).fit(small_catalog.slice(0, 600))
    real, written = artifact.write_bytes, []

    def dies_after_one_file(fs, path, data):
        if written:
            raise OSError("killed")
        written.append(path)
        real(fs, path, data)

    monkeypatch.setattr(artifact, "write_bytes", dies_after_one_file)
    with pytest.raises(OSError, match="killed"):
        other.save_pretrained(uri, overwrite=True)
    monkeypatch.undo()
    # one new file beside old ones, and no manifest: every reader refuses, none loads a mix
    with pytest.raises(ValueError, match="is not an artifact: no manifest.json"):
        load_tokenizer(uri)
    other.save_pretrained(uri, overwrite=True)
    assert load_tokenizer(uri).version == other.version


def test_the_service_follows_a_model_replaced_at_the_same_uri(fitted, small_config, small_catalog, tmp_path):
    import asyncio

    from sidserve import SemanticIdTokenizer
    from sidserve.serving.core import TokenizeService
    from sidserve.serving.telemetry import PrometheusTelemetry

    uri = str(tmp_path / "model")
    fitted.save_pretrained(uri)
    other = SemanticIdTokenizer(small_config.replace(epochs=1, seed=11)).fit(small_catalog.slice(0, 600))

    async def scenario():
        service = TokenizeService(PrometheusTelemetry())
        await service.reconfigure({"model_uri": uri, "snapshot_root": "", "snapshot_poll_s": 0})
        assert service.state.model_version == fitted.version
        assert await service.check_latest() is False  # unchanged: nothing reloaded
        other.save_pretrained(uri, overwrite=True)
        assert await service.check_latest() is True  # same URI, new manifest version
        assert service.state.model_version == other.version
        fitted.save_pretrained(uri, overwrite=True)
        await service.reconfigure({"model_uri": uri, "snapshot_root": "", "snapshot_poll_s": 0})
        assert service.state.model_version == fitted.version  # reconfigure re-reads it too
        service.stop()

    asyncio.run(scenario())


def test_retention_keeps_the_newest_and_the_published_and_clears_dead_staging(tmp_path):
    import os
    import time

    root = SnapshotRoot(str(tmp_path))
    now = time.time()
    for age, version in enumerate(["v5", "v4", "v3", "v2", "v1"]):  # v5 newest
        d = tmp_path / "snapshots" / version / "items"
        d.mkdir(parents=True)
        complete(root, version)
        for path in (tmp_path / "snapshots" / version / SUMMARY, tmp_path / "snapshots" / version):
            os.utime(path, (now - 3600 * age, now - 3600 * age))
    root.publish("v1")  # an old snapshot can be the published one (a rollback)
    for name, age_h in (("died", 30), ("running", 1)):
        f = tmp_path / "_staging" / name / "part" / "x.parquet"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
        for p in (f, f.parent, f.parent.parent):
            os.utime(p, (now - 3600 * age_h, now - 3600 * age_h))
    assert root.prune(None) == {"snapshots": [], "staging": ["died"]}  # no retention: snapshots stay
    deleted = root.prune(2)
    assert sorted(deleted["snapshots"]) == ["v2", "v3"]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["v1", "v4", "v5"]
    assert [p.name for p in (tmp_path / "_staging").iterdir()] == ["running"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        root.prune(0)


@pytest.mark.parametrize("content, needle", [(b"", "is empty"), (b"\n", "is empty"),
                                             (b"2026120", "not a complete snapshot")])
def test_an_empty_or_truncated_latest_is_an_error_not_a_fresh_start(tmp_path, content, needle):
    """Issue 50.3: a LATEST that is there but empty or cut short used to read as "never
    published": the next run started a new dedup key space and dropped every reservation."""
    root = complete(SnapshotRoot(str(tmp_path)), "20261207T010203Z-abcdef")
    root.publish("20261207T010203Z-abcdef")
    (tmp_path / LATEST).write_bytes(content)
    with pytest.raises(ValueError, match=needle):
        root.latest()
    with pytest.raises(ValueError, match=needle):  # a run that builds on it fails before publishing
        root.publish("20261207T010203Z-abcdef", expected=None)
    root.publish("20261207T010203Z-abcdef")  # the repair: re-point it by hand
    assert root.latest() == "20261207T010203Z-abcdef"
    assert SnapshotRoot(str(tmp_path / "new")).latest() is None  # no LATEST at all: nothing published


def test_latest_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """LATEST is replaced by rename after an fsync of its data and then of its directory: a
    write that fails half-way leaves the previous LATEST, and no temporary file is left."""
    import os

    root = complete(SnapshotRoot(str(tmp_path)), "v1", "v2", "v3")
    root.publish("v1")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    root.publish("v2", expected="v1")
    assert root.latest() == "v2" and len(synced) == 2  # the file, then the directory

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        root.publish("v3", expected="v2")
    assert root.latest() == "v2"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_an_incomplete_snapshot_is_never_published(tmp_path):
    root = complete(SnapshotRoot(str(tmp_path)), "v1")
    (tmp_path / "snapshots" / "half").mkdir()
    with pytest.raises(ValueError, match="half.*no summary.json"):
        root.publish("half")
    root.publish("v1")
    assert root.latest() == "v1"


def test_retention_never_lets_a_refused_or_incomplete_snapshot_take_a_rollback_targets_place(tmp_path):
    """Issue 50.4: refused (--max-churn) and incomplete (a run that died) snapshots stayed under
    snapshots/, counted as the newest by mtime, and pushed the last good rollback target out."""
    import os
    import time

    from sidserve.snapshot import REFUSED

    root = SnapshotRoot(str(tmp_path))
    now = time.time()

    def make(version, hours_ago, summary=True, refused=False):
        d = tmp_path / "snapshots" / version
        (d / "items").mkdir(parents=True)
        if summary:
            complete(root, version)
            os.utime(d / SUMMARY, (now - 3600 * hours_ago,) * 2)
        if refused:
            root.refuse(version, "churn above --max-churn")
        os.utime(d, (now - 3600 * hours_ago,) * 2)

    make("good-old", 50)
    make("good-prev", 30)
    make("published", 20)
    make("refused-old", 25, refused=True)
    make("died-old", 22, summary=False)
    make("refused-new", 2, refused=True)  # newer than every target: kept for inspection
    make("died-new", 1, summary=False)
    root.publish("published")
    deleted = root.prune(2)
    assert sorted(deleted["snapshots"]) == ["died-old", "good-old", "refused-old"]
    left = sorted(os.listdir(tmp_path / "snapshots"))
    assert left == ["died-new", "good-prev", "published", "refused-new"]  # the 2 newest targets
    assert json.loads((tmp_path / "snapshots" / "refused-new" / REFUSED).read_text())["reason"]


def test_an_explicit_version_that_exists_is_refused_before_anything_is_written(tmp_path):
    """Issue 50.4: `version` naming an existing snapshot (the published one, say) had its part
    files overwritten in place."""
    from sidserve.jobs.assign import AssignJobConfig, run_assignment

    root = complete(SnapshotRoot(str(tmp_path / "root")), "v1")
    root.publish("v1")
    before = sorted(p.name for p in (tmp_path / "root" / "snapshots" / "v1").iterdir())
    with pytest.raises(ValueError, match="'v1' already exists.*immutable"):
        run_assignment(AssignJobConfig(items=str(tmp_path / "none"), model=str(tmp_path / "no-model"),
                                       output=root.uri, version="v1"))
    assert sorted(p.name for p in (tmp_path / "root" / "snapshots" / "v1").iterdir()) == before
    assert root.latest() == "v1"
