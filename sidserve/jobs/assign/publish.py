"""D. publish helpers: every snapshot directory exists (an empty Parquet file when a stage
wrote nothing), reject reasons counted by kind."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from sidserve.snapshot import SnapshotRoot


def ensure_nonempty_dir(root: SnapshotRoot, version: str, sub: str, schema: pa.Schema) -> None:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    path = root.join("snapshots", version, sub)
    if root.fs.get_file_info(path).type != pafs.FileType.Directory or not root.fs.get_file_info(
            pafs.FileSelector(path)):
        root.fs.create_dir(path, recursive=True)
        with root.fs.open_output_stream(f"{path}/empty.parquet") as f:
            pq.write_table(schema.empty_table(), f)


def reason_counts(table: pa.Table) -> pa.Table:
    """Rejects per reason kind ('text_emb: NaN or inf value', 'item_id: duplicate', ...)."""
    kinds = [r.split(" (")[0] for r in table.column("reason").to_pylist()]
    values, counts = np.unique(np.array(kinds, dtype=object), return_counts=True) if kinds else ([], [])
    return pa.table({"s": [json.dumps({str(k): int(c) for k, c in zip(values, counts)})]})
