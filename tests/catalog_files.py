"""A catalog written as Parquet the way the read-unit tests need it: three files of unequal
size, several row groups each, so that read units and slices vary."""

import pyarrow as pa
import pyarrow.parquet as pq


def write_catalog(table: pa.Table, root, renames: dict[str, str] | None = None) -> str:
    """Rows 0-999, 1000-1899 and 1900-2299 of ``table`` (2,300 rows) in part-0..2.parquet under
    ``root`` (created), 300-row row groups; ``renames``: column -> name in the files."""
    root.mkdir()
    if renames:
        table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    for i, (a, b) in enumerate(((0, 1000), (1000, 1900), (1900, 2300))):
        pq.write_table(table.slice(a, b - a), root / f"part-{i}.parquet", row_group_size=300)
    return str(root)
