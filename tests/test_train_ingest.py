"""The train workers' own Parquet reads (sidserve/jobs/train/ingest.py): every valid row once
per epoch across the workers, equal shares, a seeded order that a resume can replay, bad rows
left out, the input's column names mapped (no Ray here; the k-means sample, drawn with Ray's
help, is test_train_sample.py's)."""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalog_files import write_catalog

from sidserve import TokenizerConfig, make_synthetic_catalog
from sidserve.jobs.catalog import HAS_BEHAVIOR, clean_batch
from sidserve.jobs.train.ingest import ParquetShards, prefetched, spans

CFG = dict(modality_dims={"text": 16, "image": 8}, behavior_dim=8, codebook_size=16, hidden_dim=32,
           num_behavior_experts=2, epochs=1)


def make_table() -> pa.Table:
    t = make_synthetic_catalog(2300, modality_dims=CFG["modality_dims"], behavior_dim=8, cold_share=0.2, seed=5)
    rows = t.to_pylist()
    for i in (4, 1200, 2299):  # rows cleaning skips
        rows[i]["image_emb"][0] = float("nan")
    rows[17]["text_emb"] = None
    return pa.Table.from_pylist(rows, schema=t.schema)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_table()


write = write_catalog


def valid_ids(table: pa.Table) -> list[str]:
    return list(clean_batch(table, TokenizerConfig(**CFG))["item_id"])


def ids_of(batches) -> list[str]:
    return [i for b in batches for i in b["item_id"]]


def test_spans_are_equal_shares_that_cover_every_row_once():
    units = [{"rows": r} for r in (300, 1, 0, 700, 299, 5)]
    total = sum(u["rows"] for u in units)
    for world in (1, 2, 3, 7):
        for order in (np.arange(len(units)), np.array([3, 0, 5, 1, 2, 4])):
            covered, sizes = [], []
            for rank in range(world):
                got = spans(units, rank, world, order)
                sizes.append(sum(b - a for _, a, b in got))
                covered += [(i, r) for i, a, b in got for r in range(a, b)]
                assert all(0 <= a < b <= units[i]["rows"] for i, a, b in got)
            assert sorted(covered) == sorted((i, r) for i, u in enumerate(units) for r in range(u["rows"]))
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == total


@pytest.mark.parametrize("rows_per_read", [700, 128])
def test_every_valid_row_once_per_epoch_across_workers(table, tmp_path, rows_per_read):
    shards = ParquetShards.plan(write(table, tmp_path / "items"), TokenizerConfig(**CFG), rows_per_read=rows_per_read)
    assert shards.num_rows == 2300
    expect = sorted(valid_ids(table))
    assert len(expect) == 2296  # the four bad rows are not trained on
    for world in (1, 2, 3):
        for seed in (None, 11):  # file order (evaluation passes) and a shuffled epoch
            parts = [ids_of(shards.for_rank(r, world).iter_batches(
                batch_size=256, local_shuffle_buffer_size=1024 if seed else None, local_shuffle_seed=seed))
                for r in range(world)]
            assert sorted(itertools.chain(*parts)) == expect, (world, seed)
            assert max(map(len, parts)) - min(map(len, parts)) <= 4  # equal input shares, bad rows aside


def unit_valid(shards: ParquetShards) -> list[int]:
    """What parquet_prepass counts per read unit (without Ray): rows cleaning keeps."""
    from sidserve.artifact import resolve
    from sidserve.jobs.assign.encode import read_unit

    fs = resolve(shards.items)[0]
    return [sum(len(clean_batch(t, TokenizerConfig(**CFG))[HAS_BEHAVIOR])
                for t in read_unit(fs, u, shards.rows_per_read, shards.read_columns)) for u in shards.units]


def lockstep_rows(shards: ParquetShards, world: int, seed: int | None) -> int:
    """Rows an epoch trains on: every rank takes a step while every rank has a batch of > 1
    row (worker.py's loop: the collectives need the same steps everywhere)."""
    its = [iter(shards.for_rank(r, world).iter_batches(batch_size=128, local_shuffle_buffer_size=256 if seed else None,
                                                         local_shuffle_seed=seed)) for r in range(world)]
    trained = 0
    while True:
        batches = [next(it, None) for it in its]
        if any(b is None or len(b[HAS_BEHAVIOR]) <= 1 for b in batches):
            return trained
        trained += sum(len(b[HAS_BEHAVIOR]) for b in batches)


def test_uneven_rejects_across_shards_leave_no_rows_untrained(table, tmp_path):
    """Issue 50.6: half of the first file's rows are rejects. Split by input rows, rank 0's
    share holds them all, runs out first, and the other ranks' remaining rows go untrained
    every epoch; split by the valid rows the pre-pass counted, every share is equal and at
    most one row per rank is left (a last batch of one row is not a step)."""
    rows = table.to_pylist()
    for i in range(0, 1000, 2):
        rows[i]["image_emb"][0] = float("nan")
    skewed = pa.Table.from_pylist(rows, schema=table.schema)
    items = write(skewed, tmp_path / "items")
    config = TokenizerConfig(**CFG)
    valid = len(valid_ids(skewed))
    by_input = ParquetShards.plan(items, config, rows_per_read=256)
    counts = unit_valid(by_input)
    assert sum(counts) == valid
    by_valid = ParquetShards.plan(items, config, rows_per_read=256, valid_rows=counts)
    for world in (2, 3):
        for seed in (None, 11):
            assert valid - lockstep_rows(by_input, world, seed) > 10 * world  # the defect, as it was
            assert lockstep_rows(by_valid, world, seed) >= valid - world, (world, seed)
            parts = [ids_of(by_valid.for_rank(r, world).iter_batches(
                batch_size=128, local_shuffle_buffer_size=256 if seed else None, local_shuffle_seed=seed))
                for r in range(world)]
            assert sorted(itertools.chain(*parts)) == sorted(valid_ids(skewed))  # each valid row once
            assert max(map(len, parts)) - min(map(len, parts)) <= 1  # equal shares of what is trained
    with pytest.raises(ValueError, match="valid_rows must give"):
        ParquetShards.plan(items, config, rows_per_read=256, valid_rows=counts[:-1])


def test_batches_hold_the_cleaned_columns_of_their_rows(table, tmp_path):
    config = TokenizerConfig(**CFG)
    shard = ParquetShards.plan(write(table, tmp_path / "items"), config).for_rank(0, 1)
    batches = list(shard.iter_batches(batch_size=500, local_shuffle_buffer_size=1000, local_shuffle_seed=3))
    assert [len(b["item_id"]) for b in batches[:-1]] == [500] * (len(batches) - 1)
    assert 0 < len(batches[-1]["item_id"]) <= 500
    reference = clean_batch(table, config)
    where = {k: i for i, k in enumerate(reference["item_id"])}
    for b in batches:
        rows = np.array([where[k] for k in b["item_id"]])
        for col in ("text_emb", "image_emb", "behavior_emb", HAS_BEHAVIOR):
            np.testing.assert_array_equal(b[col], reference[col][rows], err_msg=col)
        assert b["text_emb"].dtype == np.float32 and b["text_emb"].shape == (len(rows), 16)


def test_the_order_is_a_function_of_the_seed(table, tmp_path):
    shards = ParquetShards.plan(write(table, tmp_path / "items"), TokenizerConfig(**CFG), rows_per_read=256)

    def order(rank, seed, buffer=1024):
        return ids_of(shards.for_rank(rank, 2).iter_batches(batch_size=128, local_shuffle_buffer_size=buffer,
                                                             local_shuffle_seed=seed))

    assert order(0, 7) == order(0, 7)  # a resumed epoch replays the same batches
    assert order(0, 7) != order(0, 8)  # another epoch, another order
    assert set(order(0, 7)) != set(order(0, 8))  # units are permuted across workers too, not only within
    plain = ids_of(shards.for_rank(0, 1).iter_batches(batch_size=128))
    assert plain == valid_ids(table)  # no shuffle buffer: file order


def test_input_column_names_are_mapped(table, tmp_path):
    config = TokenizerConfig(**CFG)
    items = write(table, tmp_path / "items", {"text_emb": "title_vec"})
    shards = ParquetShards.plan(items, config, renames={"title_vec": "text_emb"})
    assert "title_vec" in shards.read_columns
    got = list(shards.for_rank(0, 1).iter_batches(batch_size=4096))
    assert ids_of(got) == valid_ids(table) and got[0]["text_emb"].shape[1] == 16


def test_refusals(table, tmp_path):
    config = TokenizerConfig(**CFG)
    items = write(table, tmp_path / "items")
    with pytest.raises(ValueError, match="rows_per_read must be >= 1, got 0"):
        ParquetShards.plan(items, config, rows_per_read=0)
    shards = ParquetShards.plan(items, config)
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        shards.for_rank(2, 2)
    with pytest.raises(ValueError, match="numpy batches, not 'pandas'"):
        next(shards.for_rank(0, 1).iter_batches(batch_size=8, batch_format="pandas"))
    (tmp_path / "empty").mkdir()
    pq.write_table(table.slice(0, 0), tmp_path / "empty" / "part-0.parquet")
    with pytest.raises(ValueError, match="no Parquet rows"):
        ParquetShards.plan(str(tmp_path / "empty"), config)


def test_prefetched_raises_the_readers_error_and_stops_with_the_consumer():
    import threading
    import time

    def failing():
        yield 1
        raise RuntimeError("bad row group")

    it = prefetched(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad row group"):
        next(it)
    before = threading.active_count()
    it = prefetched(itertools.count())  # endless: the thread must stop when the consumer does
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
