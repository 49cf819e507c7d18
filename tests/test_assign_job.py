"""Batch assignment to versioned snapshots on a local Ray."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog
from sidserve.jobs.assign import AssignJobConfig, run_assignment
from sidserve.jobs.assign.dedup import FINAL_SCHEMA, assign_dedup
from sidserve.jobs.assign.encode import plan_units
from sidserve.jobs.assign.job import encoder_cpus
from sidserve.jobs.assign.resolve import RESOLVED_SCHEMA, resolve_group
from sidserve.jobs.assign.shuffle import (
    MANIFEST_SCHEMA,
    by_part,
    index_manifest,
    item_parts,
    read_segments,
    scatter,
)
from sidserve.jobs.assign.stats import partial_stats, reduce_stats
from sidserve.metrics import churn
from sidserve.snapshot import ITEMS_SCHEMA, SnapshotRoot

# a small codebook so that SID collisions are common and dedup has work to do
CFG = dict(modality_dims={"text": 16, "image": 8}, behavior_dim=8, codebook_size=4, num_behavior_experts=1,
           hidden_dim=32, latent_dim=8, expert_hidden_dim=32, epochs=2, batch_size=256)


# unit: dedup and resolution on hand-made rows -------------------------------------------

def _rows(schema, **cols):
    n = len(next(iter(cols.values())))
    return pa.table({name: cols.get(name, pa.nulls(n, f.type)) for name, f in zip(schema.names, schema)},
                    schema=schema)


def test_assign_dedup_keeps_unchanged_and_fills_lowest_free():
    t = _rows(RESOLVED_SCHEMA,
              item_id=pa.array(["a", "b", "c", "d", "e", "f"]),
              sid_str=pa.array(["1-1", "1-1", "1-1", "1-1", "2-2", "3-3"]),
              kind=pa.array(["cur"] * 6),
              # a kept 0->? no: a unchanged with dedup 2; b unchanged with dedup 0; c moved in; d new
              prev_sid_str=pa.array(["1-1", "1-1", "9-9", None, "2-2", "8-8"]),
              prev_dedup=pa.array([2, 0, 0, None, 5, 1], pa.int32()))
    out = {r["item_id"]: r for r in assign_dedup(t).to_pylist()}
    assert out["a"]["dedup"] == 2 and out["b"]["dedup"] == 0  # unchanged SID: dedup kept
    assert (out["c"]["dedup"], out["d"]["dedup"]) == (1, 3)  # lowest free suffixes, item_id order
    assert out["e"]["dedup"] == 5  # a lone unchanged item keeps its suffix too
    assert out["f"]["dedup"] == 0  # changed lone item starts at 0
    assert out["a"]["group_size"] == 4 and out["f"]["group_size"] == 1


def test_resolve_group_rejects_duplicates_and_attaches_previous():
    cur = _rows(RESOLVED_SCHEMA, item_id=pa.array(["x", "y", "y", "z"]), kind=pa.array(["cur"] * 4),
                sid_str=pa.array(["1", "2", "2", "3"]))
    prev = _rows(RESOLVED_SCHEMA, item_id=pa.array(["x", "y", "gone"]), kind=pa.array(["prev"] * 3),
                 prev_sid_str=pa.array(["1", "2", "7"]), prev_dedup=pa.array([0, 1, 0], pa.int32()))
    out = resolve_group(pa.concat_tables([cur, prev])).to_pylist()
    by_kind = {}
    for r in out:
        by_kind.setdefault(r["kind"], []).append(r)
    cur_rows = {(r["item_id"], r["reason"]) for r in by_kind["cur"]}
    assert cur_rows == {("x", None), ("y", "item_id: duplicate (2 rows)"), ("z", None)}
    x = next(r for r in by_kind["cur"] if r["item_id"] == "x")
    assert (x["prev_sid_str"], x["prev_dedup"]) == ("1", 0)
    # removed: in the previous snapshot, not accepted now ("y" is rejected as a duplicate)
    assert sorted(r["item_id"] for r in by_kind["removed"]) == ["gone", "y"]


def test_resolve_and_dedup_on_random_rows_follow_the_rules():
    """Bigger random buckets, checked against the rules themselves: duplicates rejected
    with their count, previous SID/dedup attached by item_id, removed = previous items
    not accepted now; then (sid, dedup) unique, unchanged items keep their dedup and the
    others take the lowest free suffixes of their group in item_id order."""
    rng = np.random.default_rng(7)
    n = 3000
    ids = [f"i{k}" for k in rng.integers(0, 2600, n)]  # some ids repeat
    sids = [f"{a}-{b}" for a, b in rng.integers(0, 12, (n, 2))]  # 144 SIDs: many collisions
    cur = _rows(RESOLVED_SCHEMA, item_id=pa.array(ids), sid_str=pa.array(sids), kind=pa.array(["cur"] * n),
                reason=pa.array([None if k % 50 else "text_emb: NaN or inf value" for k in range(n)], pa.string()))
    prev_ids = [f"i{k}" for k in rng.permutation(3000)[:2000]]
    prev_sids = [sids[ids.index(i)] if i in ids and rng.random() < 0.7 else f"{rng.integers(12)}-{rng.integers(12)}"
                 for i in prev_ids]
    prev_dedup, seen = [], {}
    for sid in prev_sids:  # a valid previous snapshot: (sid, dedup) unique
        prev_dedup.append(seen.get(sid, 0) * 2)  # even suffixes: leaves gaps to fill
        seen[sid] = seen.get(sid, 0) + 1
    prev = _rows(RESOLVED_SCHEMA, item_id=pa.array(prev_ids), kind=pa.array(["prev"] * len(prev_ids)),
                 prev_sid_str=pa.array(prev_sids), prev_dedup=pa.array(prev_dedup, pa.int32()))
    resolved = resolve_group(pa.concat_tables([prev, cur])).to_pylist()

    count = {i: ids.count(i) for i in set(ids)}
    old = dict(zip(prev_ids, zip(prev_sids, prev_dedup)))
    cur_rows = [r for r in resolved if r["kind"] == "cur"]  # in input order
    assert len(cur_rows) == n
    for given, r in zip(cur.to_pylist(), cur_rows, strict=True):
        assert r["item_id"] == given["item_id"]
        k = count[r["item_id"]]  # a bad row keeps its own reason; a good duplicate gets one
        assert r["reason"] == (given["reason"] or (f"item_id: duplicate ({k} rows)" if k > 1 else None))
        assert (r["prev_sid_str"], r["prev_dedup"]) == old.get(r["item_id"], (None, None))
    accepted = [r for r in cur_rows if r["reason"] is None]
    assert sorted(r["item_id"] for r in resolved if r["kind"] == "removed") == \
        sorted(set(prev_ids) - {r["item_id"] for r in accepted})

    final = assign_dedup(pa.Table.from_pylist(accepted, schema=RESOLVED_SCHEMA)).to_pylist()
    assert len(final) == len(accepted)
    assert len({(r["sid_str"], r["dedup"]) for r in final}) == len(final)
    groups = {}
    for r in final:
        groups.setdefault(r["sid_str"], []).append(r)
    for rows in groups.values():
        assert all(r["group_size"] == len(rows) for r in rows)
        kept = [r for r in rows if r["prev_sid_str"] == r["sid_str"]]
        assert all(r["dedup"] == r["prev_dedup"] for r in kept)
        taken = {r["dedup"] for r in kept}
        moved = sorted((r for r in rows if r["prev_sid_str"] != r["sid_str"]), key=lambda r: r["item_id"])
        free = [d for d in range(len(rows) + len(taken)) if d not in taken][:len(moved)]
        assert [r["dedup"] for r in moved] == free
    assert any(len(rows) > 3 for rows in groups.values()) and any(r["dedup"] % 2 for r in final)


def test_reserved_keys_stay_taken_and_are_not_counted_as_items():
    t = _rows(RESOLVED_SCHEMA,
              item_id=pa.array(["gone", "a", "new"]),
              sid_str=pa.array(["1-1", "1-1", "1-1"]),
              kind=pa.array(["removed", "cur", "cur"]),
              prev_sid_str=pa.array(["1-1", "1-1", None]),
              prev_dedup=pa.array([0, 1, None], pa.int32()),
              prev_nights=pa.array([3, 0, None], pa.int32()))
    out = {r["item_id"]: r for r in assign_dedup(t).to_pylist()}
    assert out["gone"]["dedup"] == 0 and out["a"]["dedup"] == 1  # the reservation and the kept item
    assert out["new"]["dedup"] == 2  # 0 is reserved for "gone": the new item does not get it
    assert out["a"]["group_size"] == 2  # items of the SID; the reservation is not one


def test_resolve_group_ages_reservations_and_returns_their_keys():
    cur = _rows(RESOLVED_SCHEMA, item_id=pa.array(["back", "dup", "dup"]), kind=pa.array(["cur"] * 3),
                sid_str=pa.array(["1", "2", "2"]))
    prev = _rows(RESOLVED_SCHEMA, item_id=pa.array(["back", "dup", "away"]), kind=pa.array(["prev"] * 3),
                 prev_sid_str=pa.array(["1", "2", "3"]), prev_dedup=pa.array([4, 0, 1], pa.int32()),
                 prev_nights=pa.array([2, 0, 5], pa.int32()))  # "back" was reserved for 2 nights
    out = resolve_group(pa.concat_tables([cur, prev])).to_pylist()
    back = next(r for r in out if r["item_id"] == "back" and r["kind"] == "cur")
    assert (back["prev_sid_str"], back["prev_dedup"]) == ("1", 4)  # its reserved key comes back
    removed = {r["item_id"]: r for r in out if r["kind"] == "removed"}
    assert set(removed) == {"dup", "away"}  # rejected tonight, or still absent
    assert (removed["dup"]["sid_str"], removed["dup"]["prev_dedup"], removed["dup"]["prev_nights"]) == ("2", 0, 1)
    assert removed["away"]["prev_nights"] == 6


def test_churn_statistics_by_hand():
    t = _rows(FINAL_SCHEMA,
              item_id=pa.array(["a", "b", "c", "d", "e"]),
              sid=pa.array([[0, 1], [0, 1], [2, 3], [1, 1], [3, 3]], pa.list_(pa.int32())),
              sid_str=pa.array(["0-1", "0-1", "2-3", "1-1", "3-3"]),
              path=pa.array(["full"] * 4 + ["content_only"]),
              popularity=pa.array([0.0, 5.0, 50.0, 5.0, float("nan")]),
              prev_sid_str=pa.array(["0-1", "0-0", "2-3", None, "3-3"]),
              group_size=pa.array([2, 2, 1, 1, 1], pa.int64()))
    s = reduce_stats([partial_stats(t, 2, 4).to_pylist()[0]], 2, 4, removed=3)
    # common: a, b, c, e (d is new); changed: b only
    assert s["churn"]["common"] == 4 and s["churn"]["changed"] == 1 and s["churn"]["churn"] == 0.25
    assert s["churn"]["new"] == 1 and s["churn"]["removed"] == 3
    assert s["churn"]["by_popularity"]["1-9"] == {"common": 1, "changed": 1, "churn": 1.0}
    assert s["churn"]["by_popularity"]["0"] == {"common": 1, "changed": 0, "churn": 0.0}
    assert s["collision_rate"] == pytest.approx(2 / 5)
    assert s["utilisation_per_position"] == [1.0, 0.5]  # position 0 uses {0, 1, 2, 3}, position 1 {1, 3}
    assert s["paths"] == {"full": 4, "content_only": 1}


def test_scatter_writes_one_file_and_each_partition_once_and_its_manifest_says_so(tmp_path):
    import pyarrow.fs as pafs

    ids = pa.array([f"item-{i}" for i in range(500)] + [None, None])
    table = pa.table({"item_id": ids, "x": np.arange(502)})
    parts = item_parts(ids, 7)
    assert parts[-2:].tolist() == [0, 0]  # null item_ids go to partition 0
    assert (item_parts(pa.array(["item-3", "item-3"]), 7) == parts[3]).all()  # a key always lands in one place
    fs = pafs.LocalFileSystem()
    manifest = scatter(table, parts, 7, fs, str(tmp_path), "m0").to_pylist()
    assert [p.name for p in tmp_path.iterdir()] == ["m0.arrows"]  # one file per map call, not one per partition
    assert sorted(m["part"] for m in manifest) == sorted(set(parts.tolist()))  # each non-empty partition once
    assert sum(m["rows"] for m in manifest) == 502
    segments = by_part(manifest, 7)
    seen = []
    for p in range(7):
        got = read_segments(fs, segments[p], table.schema)
        assert (parts[got.column("x").to_numpy()] == p).all()  # only its partition's rows
        seen += got.column("x").to_pylist()
    assert sorted(seen) == list(range(502))  # every row exactly once
    assert read_segments(fs, [], table.schema).num_rows == 0
    assert scatter(table.slice(0, 0), parts[:0], 7, fs, str(tmp_path), "m1").num_rows == 0
    assert not (tmp_path / "m1.arrows").exists()
    bad = dict(segments[parts[0]][0], rows=segments[parts[0]][0]["rows"] + 1)
    with pytest.raises(RuntimeError, match="the manifest says"):
        read_segments(fs, [bad], table.schema)
    # the driver hands each reduce task one index entry; through it the task finds its segment list
    two = pa.concat_tables([pa.Table.from_pylist(manifest, MANIFEST_SCHEMA),
                            scatter(table, parts, 7, fs, str(tmp_path), "m2")])
    index = index_manifest(two, 7, fs, str(tmp_path / "index"), "encoded")
    assert [p.name for p in (tmp_path / "index").iterdir()] == ["encoded.arrows"]
    assert all(len(index[p]) == 1 for p in range(7))
    for p in range(7):
        listed = read_segments(fs, index[p], MANIFEST_SCHEMA).drop_columns(["part"]).to_pylist()
        assert listed == by_part(two, 7)[p]
    assert index_manifest(two.slice(0, 0), 7, fs, str(tmp_path / "index"), "none") == [[]] * 7


def test_read_units_cover_every_row_group_once_within_the_row_budget(tmp_path):
    table = pa.table({"item_id": [f"i{k}" for k in range(1000)], "x": np.arange(1000)})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=100)  # 10 row groups of 100
    pq.write_table(table.slice(0, 700), tmp_path / "b.parquet", row_group_size=700)  # one larger than a unit
    units, schema = plan_units(str(tmp_path), 250)
    assert schema.names == ["item_id", "x"]
    a = [u for u in units if u["path"].endswith("a.parquet")]
    b = [u for u in units if u["path"].endswith("b.parquet")]
    assert [u["row_groups"] for u in a] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # at most 250 rows each
    assert all(u["rows"] == 200 for u in a)
    assert b == [{"path": b[0]["path"], "row_groups": [0], "rows": 700}]  # alone; read in slices of 250
    assert sum(u["rows"] for u in units) == 1700


def test_partition_settings_are_checked():
    with pytest.raises(ValueError, match="rows_per_partition"):
        run_assignment(AssignJobConfig(items="x", model="y", output="z", rows_per_partition=0))
    with pytest.raises(ValueError, match="rows_per_task"):
        run_assignment(AssignJobConfig(items="x", model="y", output="z", rows_per_task=0))


# end to end on a local Ray ----------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    ray_session()
    base = tmp_path_factory.mktemp("assign")
    catalog = make_synthetic_catalog(3000, modality_dims=CFG["modality_dims"], behavior_dim=8, n_clusters=16,
                                     seed=5)
    tok = SemanticIdTokenizer(TokenizerConfig(**CFG)).fit(catalog)
    tok.save_pretrained(str(base / "model"))

    rows = catalog.slice(0, 12).to_pylist()
    rows[1]["text_emb"] = rows[1]["text_emb"][:-1]  # missing dimension
    rows[2]["image_emb"] = rows[2]["image_emb"] + [0.5]  # extra dimension
    rows[3]["image_emb"][0] = float("nan")
    rows[4]["behavior_emb"] = [float("inf")] * 8
    rows[5]["item_id"] = None
    rows[6]["item_id"] = rows[7]["item_id"]  # duplicate id
    first = pa.concat_tables([pa.Table.from_pylist(rows, schema=catalog.schema), catalog.slice(12, 2488)])
    os.makedirs(base / "night1")
    pq.write_table(first.slice(0, 1300), base / "night1" / "a.parquet")
    pq.write_table(first.slice(1300), base / "night1" / "b.parquet")

    # night 2: items 12..411 get another item's content (their SID may change),
    # items 2000..2499 disappear, 2500..2999 are new
    second = catalog.slice(12, 2988).to_pylist()
    donors = catalog.slice(1500, 400).to_pylist()
    for r, d in zip(second[:400], donors):
        r["text_emb"], r["image_emb"] = d["text_emb"], d["image_emb"]
    second = [r for r in second if not ("item-00002000" <= r["item_id"] < "item-00002500")]
    os.makedirs(base / "night2")
    pq.write_table(pa.Table.from_pylist(second, schema=catalog.schema), base / "night2" / "a.parquet")

    root = f"file://{base}/snapshots"  # a pyarrow filesystem URI, not a plain path
    # small partitions and encoder calls: several files per partition, several partitions per grouping
    small = dict(model=str(base / "model"), output=root, rows_per_partition=700, rows_per_task=512)
    s1 = run_assignment(AssignJobConfig(items=str(base / "night1"), **small))
    s2 = run_assignment(AssignJobConfig(items=str(base / "night2"), **small))
    return dict(base=base, catalog=catalog, root=root, root_path=str(base / "snapshots"), s1=s1, s2=s2,
                first=first, second=second)


def test_encoder_actors_are_sized_to_the_cluster(world):
    job = dict(items="x", model="y", output="z")
    assert encoder_cpus(AssignJobConfig(**job, num_workers=2)) == 1.0  # the test cluster has 2 CPUs
    assert encoder_cpus(AssignJobConfig(**job, num_workers=4)) == 0.5  # fewer per actor, all placed
    with pytest.raises(ValueError, match="needs 3 CPUs but the cluster has 2"):
        encoder_cpus(AssignJobConfig(**job, num_workers=3, cpus_per_worker=1.0))


def test_schema_counts_and_rejects(world):
    root, s1 = SnapshotRoot(world["root"]), world["s1"]
    items = root.read_items(s1["version"])
    assert items.schema.equals(ITEMS_SCHEMA)
    rejects = root.read_rejects(s1["version"])
    assert s1["input_rows"] == world["first"].num_rows == items.num_rows + rejects.num_rows
    reasons = sorted(rejects.column("reason").to_pylist())
    assert reasons == sorted([
        "text_emb: wrong dimension (expected 16)", "image_emb: wrong dimension (expected 8)",
        "image_emb: NaN or inf value", "behavior_emb: NaN or inf value", "item_id: null",
        "item_id: duplicate (2 rows)", "item_id: duplicate (2 rows)",
    ])
    assert s1["rejects_by_reason"]["item_id: duplicate"] == 2
    assert set(items.column("path").to_pylist()) == {"full", "content_only"}
    assert set(items.column("model_version").to_pylist()) == {s1["model_version"]}
    assert all(s == "-".join(map(str, v)) for s, v in zip(items.column("sid_str").to_pylist()[:50],
                                                          items.column("sid").to_pylist()[:50]))


@pytest.mark.parametrize("which", ["s1", "s2"])
def test_sid_dedup_unique(world, which):
    items = SnapshotRoot(world["root"]).read_items(world[which]["version"])
    keys = list(zip(items.column("sid_str").to_pylist(), items.column("dedup").to_pylist()))
    assert len(set(keys)) == len(keys)
    assert world[which]["collision_rate"] > 0  # K=4: collisions exist, dedup was exercised
    assert len(set(items.column("item_id").to_pylist())) == items.num_rows


def test_dedup_stable_across_snapshots(world):
    root = SnapshotRoot(world["root"])
    a = {r["item_id"]: r for r in root.read_items(world["s1"]["version"]).to_pylist()}
    b = {r["item_id"]: r for r in root.read_items(world["s2"]["version"]).to_pylist()}
    held = root.read_reservations(world["s2"]["version"]).to_pylist()
    # night 2's reservations: exactly night 1's items that are gone (or rejected), with their keys
    assert sorted(r["item_id"] for r in held) == sorted(set(a) - set(b))
    assert all((r["sid_str"], r["dedup"], r["nights_absent"]) == (a[r["item_id"]]["sid_str"],
                                                                  a[r["item_id"]]["dedup"], 1) for r in held)
    assert world["s2"]["reservations"] == len(held)
    reserved = {(r["sid_str"], r["dedup"]) for r in held}
    assert not reserved & {(r["sid_str"], r["dedup"]) for r in b.values()}  # nobody holds a reserved key
    unchanged = [k for k in b if k in a and a[k]["sid_str"] == b[k]["sid_str"]]
    changed = [k for k in b if k in a and a[k]["sid_str"] != b[k]["sid_str"]]
    assert unchanged and changed
    assert all(a[k]["dedup"] == b[k]["dedup"] for k in unchanged)
    # moved/new items took the lowest suffixes not held by unchanged items of their SID
    groups = {}
    for k, r in b.items():
        groups.setdefault(r["sid_str"], []).append(k)
    for sid, members in groups.items():
        kept = {b[k]["dedup"] for k in members if k in unchanged} | {d for s, d in reserved if s == sid}
        others = sorted(b[k]["dedup"] for k in members if k not in unchanged)
        free = [d for d in range(len(members) + len(kept)) if d not in kept][: len(others)]
        assert others == free


def test_churn_matches_reference(world):
    root, s2 = SnapshotRoot(world["root"]), world["s2"]
    a = root.read_items(world["s1"]["version"])
    b = root.read_items(s2["version"])
    ref = churn(a.column("item_id").to_pylist(), np.array(a.column("sid").to_pylist()),
                b.column("item_id").to_pylist(), np.array(b.column("sid").to_pylist()))
    assert s2["churn"]["common"] == ref["common"] and s2["churn"]["changed"] == ref["changed"]
    assert s2["churn"]["new"] == ref["new"] == 500  # items 2500..2999
    # gone: item 0, items 8..11 (night 2 starts at 12) and 2000..2499
    assert s2["churn"]["removed"] == ref["removed"] == 1 + 4 + 500
    assert sum(v["common"] for v in s2["churn"]["by_popularity"].values()) == ref["common"]
    assert s2["previous_version"] == world["s1"]["version"]
    assert root.summary()["version"] == s2["version"]


def test_snapshot_does_not_depend_on_the_partitioning(world, tmp_path):
    """Night 2 again, against the same previous snapshot, with one partition instead of four."""
    import shutil

    s1, s2 = world["s1"], world["s2"]
    assert s1["partitions"] == 4 and s2["partitions"] == 4
    # one staging file per map call, not one per map call x partition: night 2 is one input file
    # of 2488 rows in encoder calls of 512 (5 calls, 20 files the old way); resolve is 4 tasks
    files = s2["staging_files"]
    assert 0 < files["encoded"] <= -(-s2["input_rows"] // 512) and 0 < files["resolved"] <= 4
    assert 0 < files["previous"] <= len(os.listdir(os.path.join(world["root_path"], "snapshots", s1["version"],
                                                                "items"))) + 1  # + its reservations' part
    shutil.copytree(os.path.join(world["root_path"], "snapshots", s1["version"]),
                    tmp_path / "snapshots" / s1["version"])
    (tmp_path / "LATEST").write_text(s1["version"] + "\n")
    s = run_assignment(AssignJobConfig(items=str(world["base"] / "night2"), model=str(world["base"] / "model"),
                                       output=str(tmp_path)))
    assert s["partitions"] == 1 and s["previous_version"] == s1["version"]
    one = SnapshotRoot(str(tmp_path)).read_items(s["version"]).sort_by("item_id")
    four = SnapshotRoot(world["root"]).read_items(s2["version"]).sort_by("item_id")
    for col in ("item_id", "sid", "sid_str", "dedup", "path"):
        assert one.column(col).equals(four.column(col)), col
    for key in ("input_rows", "items", "rejects", "rejects_by_reason", "collision_rate", "churn",
                "utilisation_per_position", "entropy_per_position"):
        assert s[key] == s2[key], key


def test_killed_run_leaves_latest_and_reruns_are_deterministic(world, monkeypatch):
    root = SnapshotRoot(world["root"])
    before = root.latest()

    def killed(self, version, **kw):
        raise RuntimeError("killed before publishing")

    # night 1 again, killed after writing its snapshot and before publishing it
    monkeypatch.setattr(SnapshotRoot, "publish", killed)
    with pytest.raises(RuntimeError, match="killed before publishing"):
        run_assignment(AssignJobConfig(items=str(world["base"] / "night1"), model=str(world["base"] / "model"),
                                       output=world["root"], version="zz-partial"))
    monkeypatch.undo()
    assert root.latest() == before
    assert os.path.isdir(os.path.join(world["root_path"], "snapshots", "zz-partial", "items"))  # written, unread
    assert root.read_items().num_rows == root.read_items(before).num_rows

    # what it wrote is what the first run of night 1 published: same inputs + model, same SIDs
    first = root.read_items(world["s1"]["version"]).sort_by("item_id")
    again = root.read_items("zz-partial").sort_by("item_id")
    # batches Ray may cut differently, and still the same bits: encode is batch-invariant
    for col in ("item_id", "sid", "sid_str", "path", "behavior_weights"):
        assert first.column(col).equals(again.column(col)), col


def test_missing_item_id_column_is_fatal(world, tmp_path):
    pq.write_table(world["catalog"].drop_columns(["item_id"]).slice(0, 10), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="item_id"):
        run_assignment(AssignJobConfig(items=str(tmp_path / "x.parquet"), model=str(world["base"] / "model"),
                                       output=str(tmp_path / "out")))


def test_cli_exits_2_with_a_message(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "jobs/assign.py", "--items", str(tmp_path / "none"), "--model",
                           str(tmp_path / "no-model"), "--output", str(tmp_path / "out")],
                          cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not an artifact" in proc.stderr


def test_a_key_survives_an_absence(world, tmp_path):
    """Night 1 with A; night 2 without A but with B, an item with A's SID; night 3 with A: A
    keeps its key, and B never held it. Without reservations (reserve_nights=0) B takes it on
    night 2; a reservation older than reserve_nights is released."""
    import shutil

    base = world["catalog"].slice(0, 200)
    a_row = world["catalog"].slice(200, 1)
    b_row = a_row.set_column(0, "item_id", pa.array(["zz-item-B"]))  # A's content: A's SID

    def night(name, *parts):
        os.makedirs(tmp_path / name)
        pq.write_table(pa.concat_tables(parts), tmp_path / name / "a.parquet")
        return str(tmp_path / name)

    n1, n2, n3 = night("n1", base, a_row), night("n2", base, b_row), night("n3", base, a_row, b_row)
    model = str(world["base"] / "model")
    root = SnapshotRoot(str(tmp_path / "snap"))

    def key(version, item_id):
        rows = {r["item_id"]: r for r in root.read_items(version).to_pylist()}
        return rows[item_id]["sid_str"], rows[item_id]["dedup"]

    from ray._private.state import actors  # the GCS actor table (the state API needs the dashboard)

    def encoders():
        return {k for k, a in actors().items() if "EncodeAndScatter" in a.get("ActorClassName", "")}

    before = encoders()
    s1 = run_assignment(AssignJobConfig(items=n1, model=model, output=root.uri))
    # 201 rows are one read unit: one encoder actor, not num_workers (2) of them
    assert s1["encoder_actors"] == 1 and len(encoders() - before) == 1
    assert world["s1"]["encoder_actors"] == 2  # the world's nights have several units each
    shutil.copytree(tmp_path / "snap", tmp_path / "snap-after-1")
    s2 = run_assignment(AssignJobConfig(items=n2, model=model, output=root.uri))
    shutil.copytree(tmp_path / "snap", tmp_path / "snap-after-2")
    s3 = run_assignment(AssignJobConfig(items=n3, model=model, output=root.uri))
    a_key = key(s1["version"], a_row.column("item_id")[0].as_py())
    assert key(s2["version"], "zz-item-B")[0] == a_key[0]  # B shares A's SID
    assert key(s2["version"], "zz-item-B") != a_key  # ... but not A's key: it is reserved
    assert [(r["sid_str"], r["dedup"]) for r in root.read_reservations(s2["version"]).to_pylist()] == [a_key]
    assert key(s3["version"], a_row.column("item_id")[0].as_py()) == a_key  # A is back on its key
    assert key(s3["version"], "zz-item-B") == key(s2["version"], "zz-item-B")  # and B kept its own
    assert s3["reservations"] == 0

    # control: the same night 2 with reservations off gives A's key to B
    off = SnapshotRoot(str(tmp_path / "snap-after-1"))
    s2_off = run_assignment(AssignJobConfig(items=n2, model=model, output=off.uri, reserve_nights=0))
    assert {r["item_id"]: (r["sid_str"], r["dedup"]) for r in off.read_items(s2_off["version"]).to_pylist()}[
        "zz-item-B"] == a_key
    assert s2_off["reservations"] == 0 and s2_off["reservations_expired"] == 1

    # expiry: a second night without A, with reserve_nights=1, releases A's key
    again = SnapshotRoot(str(tmp_path / "snap-after-2"))
    s = run_assignment(AssignJobConfig(items=n2, model=model, output=again.uri, reserve_nights=1))
    assert s["reservations"] == 0 and s["reservations_expired"] == 1


# sticky assignment (sidserve/jobs/assign/sticky.py) --------------------------------------

def test_sticky_keeps_a_code_within_delta_and_switches_beyond_it():
    from sidserve.jobs.assign.sticky import parse_sid_str, sticky_codes

    # 3 items x 2 positions, 3 candidates each; K = 5, missing code 5
    computed = np.array([[0, 1], [2, 3], [4, 5]])
    cand = np.array([[[0, 3, 1], [1, 2, 0]], [[2, 0, 1], [3, 4, 1]], [[4, 0, 1], [5, 5, 5]]])
    scores = np.array([[[0.9, 0.85, 0.1], [0.7, 0.6, 0.5]], [[0.9, 0.5, 0.4], [0.8, 0.79, 0.1]],
                       [[0.9, 0.2, 0.1], [np.nan] * 3]])
    previous = np.array([[3, 0], [1, 4], [2, 1]])  # item 2: position 1 is missing now
    codes, kept, unscored = sticky_codes(computed, cand, scores, previous, 0.1, 5)
    # item 0: 3 is 0.05 below the best at position 0 -> kept; 0 is 0.2 below at position 1 -> switch
    # item 1: 1 is 0.5 below -> switch; 4 is 0.01 below -> kept
    # item 2: 2 is not among the candidates, and the 3rd is 0.8 below the best -> 2 is too:
    # replaced, not unscored; a missing position is left alone
    assert codes.tolist() == [[3, 1], [2, 4], [4, 5]]
    assert kept.tolist() == [[True, False], [False, True], [False, False]]
    assert not unscored.any()
    # at delta 0.85 all 3 of item 2's candidates are within it: 2, ranked below them, might be
    # too -> unscored (a larger k could have kept it); kept where the margin allows
    codes, kept, unscored = sticky_codes(computed, cand, scores, previous, 0.85, 5)
    assert unscored.tolist() == [[False, False], [False, False], [True, False]]
    assert kept.tolist() == [[True, True], [True, True], [False, False]]
    # delta 0 reproduces the plain assignment (no candidate ties here); a larger delta keeps more
    assert (sticky_codes(computed, cand, scores, previous, 0.0, 5)[0] == computed).all()
    assert sticky_codes(computed, cand, scores, previous, 0.6, 5)[1].sum() == 4
    # an item without a previous SID, or one of another length, keeps what was computed
    prev = parse_sid_str(["3-0", None, "1-2-3"], 2)
    assert prev.tolist() == [[3, 0], [-1, -1], [-1, -1]]
    assert (sticky_codes(computed, cand, scores, prev, 1.0, 5)[0][1:] == computed[1:]).all()
    with pytest.raises(ValueError, match="delta"):
        sticky_codes(computed, cand, scores, previous, -0.1, 5)


def test_the_staged_candidates_are_those_within_delta_and_decide_as_all_k_do():
    """trim_candidates keeps, per position, the prefix of the k best within delta (what the
    assignment job stages); sticky_from_trimmed on it keeps exactly the codes that a check of
    every candidate's score against delta keeps."""
    from sidserve.jobs.assign.sticky import sticky_from_trimmed, trim_candidates

    rng = np.random.default_rng(0)
    n, L, K, k, missing = 500, 4, 12, 5, 12
    scores_all = rng.normal(size=(n, L, K))
    scores_all[:50, 3] = np.nan  # positions without a code (behavior absent)
    order = np.argsort(-np.nan_to_num(scores_all, nan=-np.inf), axis=-1)
    cand = order[:, :, :k]
    scores = np.take_along_axis(scores_all, cand, -1)
    cand[:50, 3] = missing
    computed = cand[:, :, 0]
    previous = rng.integers(0, K, size=(n, L))
    previous[:20] = -1  # new items
    for delta in (0.0, 0.3, 1.0, 100.0):
        codes, counts = trim_candidates(cand, scores, delta)
        gap = scores[:, :, :1] - scores
        assert (counts == np.nansum(gap <= delta, -1)).all() and (counts[:50, 3] == 0).all()
        assert codes.size == counts.sum() and (codes != missing).all()
        sid, kept, unscored = sticky_from_trimmed(computed, codes, counts, k, previous, missing)
        # by hand: the previous code is kept where it is a candidate within delta of the best
        prev_gap = np.where(cand == previous[:, :, None], gap, np.inf).min(-1)
        eligible = (previous >= 0) & (computed != missing) & (previous != computed)
        assert (kept == (eligible & (prev_gap <= delta))).all()
        assert (sid == np.where(kept, previous, computed)).all()
        # unscored: replaced while all k were within delta
        assert (unscored == (eligible & ~kept & (counts == k))).all()
    assert kept.sum() > 0 and unscored.sum() > 0  # delta 100: everything scored is within
    with pytest.raises(ValueError, match="counts sum"):
        sticky_from_trimmed(computed, codes[1:], counts, k, previous, missing)


def test_candidates_follow_the_codebooks_similarity(world):
    """encode(candidates=k): the best first and equal to the SID; and on a hand-built codebook
    (unit vectors e_0..e_K-1) the candidates are the latent's largest components, scored by
    their cosine, ties to the lower index, in and out of the batch-invariant path."""
    import torch

    from sidserve.tokenizers import invariant
    from sidserve.tokenizers.adc_sid.model.codebook import CosineCodebook

    tok = SemanticIdTokenizer.from_pretrained(str(world["base"] / "model"))
    items = world["catalog"].slice(0, 300)
    enc = tok.encode(items, candidates=3)
    assert enc.candidates.shape == (300, tok.config.sid_length, 3)
    assert (enc.candidates[:, :, 0] == enc.sid).all()
    present = ~np.isnan(enc.candidate_scores)
    assert (np.diff(enc.candidate_scores, axis=-1)[present[:, :, 1:]] <= 0).all()  # best first
    n_b = tok.config.num_behavior_experts
    cold = enc.path == "content_only"
    assert (enc.candidates[cold, -n_b:] == tok.config.missing_code).all() and (~present[cold, -n_b:]).all()
    with pytest.raises(ValueError, match="candidates"):
        tok.encode(items, candidates=tok.config.codebook_size + 1)
    # what the assignment job stages for them: per row, each position's candidates within delta
    from sidserve.jobs.assign.encode import encode_table
    from sidserve.jobs.assign.sticky import trim_candidates

    staged = encode_table(tok, items, candidates=3, delta=0.05)
    codes, counts = trim_candidates(enc.candidates, enc.candidate_scores, 0.05)
    assert staged.column("cand_count").to_pylist() == counts.tolist()
    assert [c for row in staged.column("cand").to_pylist() for c in row] == codes.tolist()
    assert 0 < counts.sum() < 3 * counts.size and (counts[cold, -n_b:] == 0).all()
    # without a margin, every candidate of a position with a code is staged
    every = np.array(encode_table(tok, items, candidates=3).column("cand_count").to_pylist())
    assert (every == np.where(present[:, :, 0], 3, 0)).all()

    book = CosineCodebook(dim=4, codebook_size=4)
    with torch.no_grad():
        book.embed.copy_(torch.eye(4))
    z = torch.tensor([[0.1, 0.7, 0.2, 0.7], [3.0, 0.0, 4.0, 0.0]])  # row 0: a tie between 1 and 3
    for exact in (False, True):
        with invariant.batch_invariant(exact):
            codes, sims = book.top(z, 3)
        assert codes.tolist() == [[1, 3, 2], [2, 0, 1]]
        expect = torch.nn.functional.normalize(z, dim=-1).double().gather(1, codes)
        torch.testing.assert_close(sims.double(), expect, rtol=0, atol=1e-6)


def test_residual_tokenizers_offer_whole_sids_or_are_refused(small_catalog, tmp_path):
    """Residual k-means offers whole alternative SIDs (sticky_unit "path"); rq-vae and ADC-SID
    with residual behavioral codes offer nothing and the assignment job refuses a margin for
    them before any work; independent positions offer per-position candidates."""
    from sidserve.tokenizers.baselines import (
        BaselineConfig,
        OPQConfig,
        OPQTokenizer,
        RQKmeansTokenizer,
        RQVAEConfig,
        RQVAETokenizer,
    )

    dims = dict(modality_dims={"text": 24, "image": 16}, codebook_size=8, num_levels=2, kmeans_iters=5)
    rq = RQKmeansTokenizer(BaselineConfig(**dims)).fit(small_catalog)
    assert rq.sticky_unit == "path"
    enc = rq.encode(small_catalog, candidates=3)
    assert enc.candidates is None and enc.paths.shape == (len(enc), 3, 2)
    assert (enc.paths[:, 0] == rq.encode(small_catalog).sid).all() and (enc.sid == enc.paths[:, 0]).all()
    vae = RQVAETokenizer(RQVAEConfig(epochs=1, latent_dim=8, hidden_dim=16, **dims)).fit(small_catalog)
    assert vae.sticky_unit is None
    with pytest.raises(ValueError, match="residual"):
        vae.encode(small_catalog, candidates=2)
    vae.save_pretrained(str(tmp_path / "vae"))
    with pytest.raises(ValueError, match="model is residual"):
        run_assignment(AssignJobConfig(items="x", model=str(tmp_path / "vae"), output=str(tmp_path / "out"),
                                       sticky_delta=0.1))
    assert not (tmp_path / "out").exists()
    # ADC-SID's positions are independent unless its behavioral codes are residual levels
    for mode in ("parallel", "residual", "residual_input"):
        tok = SemanticIdTokenizer(TokenizerConfig(behavior_quantization=mode))
        assert tok.independent_positions is (mode == "parallel")
        assert tok.sticky_unit == ("position" if mode == "parallel" else None)
    opq = OPQTokenizer(OPQConfig(opq_iters=1, **dims)).fit(small_catalog)
    enc = opq.encode(small_catalog, candidates=2)
    assert (enc.candidates[:, :, 0] == opq.encode(small_catalog).sid).all()
    assert (enc.candidate_scores[:, :, 0] >= enc.candidate_scores[:, :, 1]).all()


def test_the_path_beam_is_exhaustive_when_wide_enough_and_scores_by_hand(small_catalog):
    """rq-kmeans' whole-SID candidates (sticky_unit "path"): with a beam of K^L every path is
    found once, each scored -||x - decode(path)||^2 / ||x||^2 (computed here by hand), the
    encoded SID first and the others best first; a narrower beam keeps the best ones it
    finds, so its best other path is never above the exhaustive one."""
    import itertools

    from sidserve.items import coerce_items
    from sidserve.tokenizers.baselines import BaselineConfig, RQKmeansTokenizer

    rq = RQKmeansTokenizer(BaselineConfig(modality_dims={"text": 24, "image": 16}, codebook_size=4,
                                          num_levels=2, kmeans_iters=5)).fit(small_catalog)
    x = rq.features(coerce_items(small_catalog, rq.config))
    paths, scores = rq._paths(x, 16)
    every = np.array(list(itertools.product(range(4), range(4))))  # (16, 2)
    x64 = x.astype(np.float64)
    by_hand = np.stack([-((x64 - rq.centroids_[0][a].astype(np.float64) - rq.centroids_[1][b].astype(np.float64))
                          ** 2).sum(1) / (x64 ** 2).sum(1) for a, b in every], 1)  # (N, 16)
    assert all(sorted(map(tuple, p.tolist())) == sorted(map(tuple, every.tolist())) for p in paths)
    np.testing.assert_allclose(scores, np.take_along_axis(by_hand, paths[:, :, 0] * 4 + paths[:, :, 1], 1),
                               rtol=1e-9, atol=1e-12)
    assert (paths[:, 0] == rq._encode_features(x)).all()
    assert (np.diff(scores[:, 1:], axis=1) <= 0).all()
    assert (by_hand.max(1) > scores[:, 0] + 1e-9).any()  # greedy is not always the best path
    narrow_paths, narrow = rq._paths(x, 3)
    assert (narrow_paths[:, 0] == paths[:, 0]).all()
    assert (narrow[:, 1] <= scores[:, 1] + 1e-12).all()


def test_sticky_delta_zero_is_the_plain_assignment_even_on_a_tie():
    """An exact tie between the previous code and the best (float32 scores tie now and then)
    goes to the best at delta 0, as in the plain assignment (the job runs delta 0 as it); any
    positive delta keeps the previous code."""
    from sidserve.jobs.assign.sticky import sticky_codes

    computed = np.array([[0, 2]])
    cand = np.array([[[0, 3, 1], [2, 4, 1]]])
    scores = np.array([[[0.9, 0.9, 0.5], [0.8, 0.7, 0.1]]], dtype=np.float32)  # position 0: 0 and 3 tie
    previous = np.array([[3, 4]])
    assert sticky_codes(computed, cand, scores, previous, 0.0, 5)[0].tolist() == [[0, 2]]
    assert sticky_codes(computed, cand, scores, previous, 1e-9, 5)[0].tolist() == [[3, 2]]


def test_sticky_keeps_a_whole_previous_sid_within_delta():
    """sticky_from_paths, by hand: a previous SID among the row's paths within delta is kept
    whole; one beyond delta or absent is replaced; unscored when all k were within delta."""
    from sidserve.jobs.assign.sticky import sticky_from_paths, trim_paths

    computed = np.array([[0, 1, 2], [3, 3, 3], [1, 1, 1], [2, 2, 2]])
    paths = np.array([[[0, 1, 2], [0, 1, 3], [5, 5, 5]],
                      [[3, 3, 3], [0, 0, 0], [1, 1, 1]],
                      [[1, 1, 1], [1, 1, 2], [1, 2, 1]],
                      [[2, 2, 2], [2, 2, 3], [2, 2, 3]]])
    scores = np.array([[-0.10, -0.12, -0.5], [-0.2, -0.21, -0.9], [-0.3, -0.31, -0.32], [-0.4, -0.41, np.nan]])
    previous = np.array([[0, 1, 3], [1, 1, 1], [4, 4, 4], [-1, -1, -1]])
    codes, counts = trim_paths(paths, scores, 0.05)
    assert counts[:, 0].tolist() == [2, 2, 3, 2] and codes.size == 9 * 3
    sid, kept, unscored = sticky_from_paths(computed, codes, counts, 3, previous)
    # row 0: 0-1-3 is 0.02 below -> kept whole; row 1: 1-1-1 is 0.7 below -> replaced;
    # row 2: 4-4-4 is not among 3 paths that are all within delta -> unscored; row 3: new item
    assert sid.tolist() == [[0, 1, 3], [3, 3, 3], [1, 1, 1], [2, 2, 2]]
    assert kept.tolist() == [[False, False, True], [False] * 3, [False] * 3, [False] * 3]
    assert unscored.tolist() == [[False] * 3, [False] * 3, [True] * 3, [False] * 3]
    # delta 0 keeps only an exact tie; a larger delta keeps row 1 too
    assert (sticky_from_paths(computed, *trim_paths(paths, scores, 0.0), 3, previous)[0] == computed).all()
    assert sticky_from_paths(computed, *trim_paths(paths, scores, 0.8), 3, previous)[0][1].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="delta"):
        trim_paths(paths, scores, -0.1)
    with pytest.raises(ValueError, match="counts sum"):
        sticky_from_paths(computed, codes[3:], counts, 3, previous)


def test_sticky_assignment_of_residual_codes_end_to_end(world, tmp_path):
    """rq-kmeans re-fitted with its codewords moved a little: plain assignment churns; with a
    margin the job keeps whole previous SIDs, every SID is tonight's plain one or last night's,
    churn falls, and the summary counts the kept codes."""
    from sidserve.tokenizers.baselines import BaselineConfig, RQKmeansTokenizer

    items = str(tmp_path / "items")
    os.makedirs(items)
    catalog = world["catalog"].slice(0, 600)
    pq.write_table(catalog, f"{items}/a.parquet")
    cfg = BaselineConfig(modality_dims=CFG["modality_dims"], behavior_dim=8, codebook_size=8, num_levels=3,
                         kmeans_iters=5)
    night1 = RQKmeansTokenizer(cfg).fit(catalog)
    night1.save_pretrained(str(tmp_path / "m1"))
    moved = RQKmeansTokenizer.from_pretrained(str(tmp_path / "m1"))
    rng = np.random.default_rng(0)
    moved.centroids_ = (moved.centroids_ + 0.05 * rng.normal(size=moved.centroids_.shape)
                        * np.abs(moved.centroids_).mean()).astype(np.float32)
    moved.save_pretrained(str(tmp_path / "m2"))
    root = SnapshotRoot(str(tmp_path / "snap"))
    s1 = run_assignment(AssignJobConfig(items=items, model=str(tmp_path / "m1"), output=root.uri))
    s2 = run_assignment(AssignJobConfig(items=items, model=str(tmp_path / "m2"), output=root.uri, sticky_delta=0.02))
    ids = [str(v) for v in catalog.column("item_id").to_pylist()]
    plain = dict(zip(ids, moved.encode(catalog).sid.tolist()))
    a = {r["item_id"]: r["sid"] for r in root.read_items(s1["version"]).to_pylist()}
    b = {r["item_id"]: r["sid"] for r in root.read_items(s2["version"]).to_pylist()}
    assert all(b[k] in (plain[k], a[k]) for k in ids)
    plain_churn = np.mean([plain[k] != a[k] for k in ids])
    assert plain_churn > 0.02 and s2["churn"]["churn"] < plain_churn
    kept = sum(bb != pp for k in ids for bb, pp in zip(b[k], plain[k]))
    assert kept == s2["sticky"]["codes_kept"] > 0


def test_sticky_assignment_and_max_churn_end_to_end(world, tmp_path):
    """A re-fit that moved the codewords a little (the world model with noise on its codebooks)
    on the same items: plain assignment churns; --max-churn below that refuses and leaves LATEST;
    sticky with delta 0 writes the plain snapshot exactly; a positive delta keeps codes and
    lowers churn, and the summary says how many it kept."""
    import shutil

    import torch

    from sidserve.jobs.assign.job import ChurnRefused

    items = str(tmp_path / "items")
    os.makedirs(items)
    pq.write_table(world["catalog"].slice(0, 600), f"{items}/a.parquet")
    night1 = str(world["base"] / "model")
    moved = SemanticIdTokenizer.from_pretrained(night1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        books = [*moved.model_.shared_codebooks, *moved.model_.behavior_codebooks,
                 *(b for group in moved.model_.content_codebooks.values() for b in group)]
        for book in books:
            book.embed.add_(0.15 * torch.randn(book.embed.shape, generator=gen))
    moved.save_pretrained(str(tmp_path / "moved"))
    night2 = str(tmp_path / "moved")

    root = SnapshotRoot(str(tmp_path / "snap"))
    s1 = run_assignment(AssignJobConfig(items=items, model=night1, output=root.uri))
    shutil.copytree(tmp_path / "snap", tmp_path / "snap-copy")

    with pytest.raises(ChurnRefused, match="above --max-churn 0.001"):
        run_assignment(AssignJobConfig(items=items, model=night2, output=root.uri, version="plain", max_churn=0.001))
    assert root.latest() == s1["version"]  # not published
    assert "above --max-churn" in json.loads((tmp_path / "snap" / "snapshots" / "plain" / "REFUSED").read_text())["reason"]
    plain_summary = root.summary("plain")
    assert plain_summary["churn"]["churn"] > 0.001 and plain_summary["sticky"] is None

    zero = run_assignment(AssignJobConfig(items=items, model=night2, output=root.uri, sticky_delta=0.0))
    for col in ("item_id", "sid", "sid_str", "dedup", "behavior_weights"):
        assert root.read_items("plain").sort_by("item_id").column(col).equals(
            root.read_items(zero["version"]).sort_by("item_id").column(col)), col
    # --sticky-delta 0 is the plain assignment (issue 49.4): no top-k candidates are encoded
    assert zero["sticky"] is None  # and it staged what the plain run staged, no candidate columns:
    assert zero["staging_bytes"]["encoded"] == plain_summary["staging_bytes"]["encoded"]

    other = SnapshotRoot(str(tmp_path / "snap-copy"))
    sticky = run_assignment(AssignJobConfig(items=items, model=night2, output=other.uri, sticky_delta=0.05))
    assert sticky["sticky"]["codes_kept"] > 0
    assert sticky["churn"]["churn"] < plain_summary["churn"]["churn"]
    a = {r["item_id"]: r["sid"] for r in other.read_items(s1["version"]).to_pylist()}
    b = {r["item_id"]: r["sid"] for r in other.read_items(sticky["version"]).to_pylist()}
    p = {r["item_id"]: r["sid"] for r in root.read_items("plain").to_pylist()}
    # every code differs from the plain one only where it is the previous night's code
    assert all(bb == pp or bb == aa for k in b for aa, bb, pp in zip(a[k], b[k], p[k]))
    assert sum(bb != pp for k in b for bb, pp in zip(b[k], p[k])) == sticky["sticky"]["codes_kept"]
