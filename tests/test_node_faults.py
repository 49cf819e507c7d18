"""Issue 50, item 2's small scenario: a whole node lost in the middle of the nightly assignment,
on a multi-node cluster started with `ray start` (bench/node_faults.py runs all three
scenarios, train and serve too: docs/benchmarks.md)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_node_lost_mid_assignment_publishes_the_uninterrupted_snapshot_or_nothing(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import node_faults
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from sidserve import SemanticIdTokenizer, TokenizerConfig

    items = node_faults.write_catalog(str(tmp_path), 2000)
    import pyarrow.parquet as pq

    # the model the scenario encodes with (the bench trains it in its train scenario)
    tok = SemanticIdTokenizer(TokenizerConfig(modality_dims={"text": 32, "image": 16}, behavior_dim=16,
                                              codebook_size=16, hidden_dim=32, latent_dim=16,
                                              expert_hidden_dim=32, epochs=1, kmeans_init_samples=2000))
    tok.fit(pq.read_table(items)).save_pretrained(str(tmp_path / "train-uninterrupted" / "model"))
    # the smallest cluster with an encoder on two nodes: the head (1 CPU) and one worker node
    rc = node_faults.main(["--scenarios", "assign", "--items", "2000", "--workdir", str(tmp_path),
                           "--head-cpus", "1", "--worker-nodes", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "scenarios 1/1 survived, rows lost 0, wrong answers 0" in out
    assert "| assign | yes | worker-a (" in out  # the worker node was killed, and the outcome holds
    assert not [p for p in os.listdir("/tmp") if p.startswith("sidnodes-") and
                os.path.getmtime(os.path.join("/tmp", p)) > os.path.getmtime(tmp_path)]  # clusters removed
