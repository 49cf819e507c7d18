"""The k-means sample of a streamed fit, drawn from the valid rows of the workers' own Parquet
reads (sidserve/jobs/train/ingest.py) on the session's Ray cluster."""

import numpy as np
import pyarrow as pa
import pytest
from test_train_ingest import CFG, make_table, valid_ids, write

from sidserve import TokenizerConfig
from sidserve.jobs.train.ingest import ParquetShards, sample_rows


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_table()


def test_the_kmeans_sample_is_bounded_uniform_and_seeded(ray_session, table, tmp_path):
    ray_session()
    config = TokenizerConfig(**CFG)
    shards = ParquetShards.plan(write(table, tmp_path / "items"), config, rows_per_read=256)
    valid = set(valid_ids(table))
    a = sample_rows(shards, len(valid), 500, seed=1)
    assert len(a["item_id"]) == 500 and len(set(a["item_id"])) == 500 and set(a["item_id"]) <= valid
    assert list(sample_rows(shards, len(valid), 500, seed=1)["item_id"]) == list(a["item_id"])
    assert list(sample_rows(shards, len(valid), 500, seed=2)["item_id"]) != list(a["item_id"])
    # drawn from every file, not from the first rows read
    rows = np.flatnonzero(np.isin(table.column("item_id").to_numpy(zero_copy_only=False), a["item_id"]))
    files = set(np.searchsorted([1000, 1900], rows, side="right").tolist())
    assert files == {0, 1, 2}
    # asked for more than there are: every valid row
    assert sorted(sample_rows(shards, len(valid), 10_000, seed=1)["item_id"]) == sorted(valid)
