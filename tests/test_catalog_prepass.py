"""The Parquet pre-pass (the refresh's: tasks read their own row groups, nothing through the
object store) counts what the checks count on the whole input at once."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalog_files import write_catalog

from sidserve import TokenizerConfig, make_synthetic_catalog
from sidserve.jobs.assign.encode import plan_units
from sidserve.jobs.catalog import batch_stats, parquet_prepass

CFG = dict(modality_dims={"text": 16, "image": 8}, behavior_dim=8, codebook_size=16, hidden_dim=32,
           num_behavior_experts=2, epochs=1)


def bad_rows() -> pa.Table:
    t = make_synthetic_catalog(2300, modality_dims=CFG["modality_dims"], behavior_dim=8, seed=3)
    rows = t.to_pylist()
    for i in (3, 700, 2200):
        rows[i]["image_emb"][1] = float("nan")
    rows[1500]["behavior_emb"] = [float("inf")] * 8
    rows[9]["text_emb"] = None
    for i in range(0, 2300, 7):
        rows[i]["behavior_emb"] = None  # cold items: valid, without behavior
    return pa.Table.from_pylist(rows, schema=t.schema)


write = write_catalog


def test_parquet_prepass_equals_the_checks_of_the_whole_table(ray_session, tmp_path):
    ray_session()
    config, table = TokenizerConfig(**CFG), bad_rows()
    reference = batch_stats(table, config)
    assert reference.num_rows == 2300 and reference.num_valid == 2295  # the bad rows above, skipped
    assert 0 < reference.num_with_behavior < reference.num_valid
    # a row group read whole (rows_per_read >= 600: units of two groups) or in slices (128)
    for rows_per_read in (700, 128):
        items = write(table, tmp_path / f"plain-{rows_per_read}")
        got = parquet_prepass(items, config, rows_per_read=rows_per_read)
        assert got.to_dict() == reference.to_dict(), rows_per_read
        # valid rows per read unit, in plan order: what the train workers split an epoch by
        units, _ = plan_units(items, rows_per_read)
        assert len(got.unit_valid) == len(units) and sum(got.unit_valid) == reference.num_valid
        assert all(0 <= v <= u["rows"] for v, u in zip(got.unit_valid, units))
        assert got.unit_valid != [u["rows"] for u in units]  # the bad rows are in some unit
    # the input's own column names, mapped (what --column does)
    got = parquet_prepass(write(table, tmp_path / "renamed", {"text_emb": "title_vec"}), config,
                          renames={"title_vec": "text_emb"})
    assert got.to_dict() == reference.to_dict()


def test_parquet_prepass_refuses_an_unusable_input(ray_session, tmp_path):
    ray_session()
    config = TokenizerConfig(**CFG)
    t = make_synthetic_catalog(400, modality_dims={"text": 16, "image": 5}, behavior_dim=8, seed=1)
    with pytest.raises(ValueError, match=r"wrong dimension \(image_emb: 400 row\(s\), expected dim 8\)"):
        parquet_prepass(write(t, tmp_path / "dims"), config)
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['text_emb'\]"):
        parquet_prepass(write(t.drop_columns(["text_emb"]), tmp_path / "missing"), config)
    (tmp_path / "empty").mkdir()
    pq.write_table(t.slice(0, 0), tmp_path / "empty" / "part-0.parquet")
    with pytest.raises(ValueError, match="no rows"):
        parquet_prepass(str(tmp_path / "empty"), config)
    with pytest.raises(ValueError, match="rows_per_read must be >= 1, got 0"):
        parquet_prepass(str(tmp_path / "dims"), config, rows_per_read=0)
