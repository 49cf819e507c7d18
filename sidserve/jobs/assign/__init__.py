"""Batch SID assignment to a versioned snapshot (``sidserve assign``, ``jobs/assign.py``), on Ray
Data; one module per stage (``encode``, ``shuffle``, ``resolve``, ``dedup``, ``stats``,
``publish``) and the driver (``job``).

    A. encode    read_parquet -> map_batches(EncodeAndScatter actor pool: model loaded
                 once per actor): every input row with its SID or its reject reason,
                 written to staging split by a hash partition of item_id
    B. resolve   one task per item_id partition, with the previous snapshot's rows of
                 the same partition: duplicate item_ids are rejected, each item gets its
                 previous SID and dedup; rejects go to the snapshot, accepted rows to
                 staging split by a hash partition of the SID
    C. dedup     one task per SID partition: an item whose SID did not change keeps its
                 dedup, the others take the lowest free suffix (item_id order); the rows
                 go to the snapshot and the task returns its statistics
    D. publish   verification (row counts, schema), summary (counts, collisions,
                 utilisation, entropy, churn), then LATEST.

No stage collects rows on the driver, and no stage holds more than one partition
(``rows_per_partition`` rows) per task: the groupings are shuffles through files (``shuffle``), so memory does not grow with the catalog. A partition holds many
complete groups, handled with vectorised Arrow/numpy code.
"""

from sidserve.jobs.assign.encode import encode_table, input_renames
from sidserve.jobs.assign.job import AssignJobConfig, run_assignment, run_cli

__all__ = ["AssignJobConfig", "encode_table", "input_renames", "run_assignment", "run_cli"]
