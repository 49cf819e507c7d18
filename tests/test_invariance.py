"""Batch invariance (issue 18.2): an item's SID and weights are a function of that item alone,
whatever other items share its encode call, so the assignment job's snapshot and
POST /tokenize agree bit for bit (sidserve/tokenizers/invariant.py). This module is the end
to end check on the session's Ray cluster; the encoders' own checks, without Ray, are in
tests/test_batch_invariance.py (they ran in this module, on the suite's Ray worker)."""

import numpy as np
import pytest

SIZES = (1, 7, 64, 333)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.slow
def test_assign_snapshot_equals_tokenize_recompute(ray_session, refreshed, small_catalog):
    """Every item of a real assignment-job snapshot (the ``refreshed`` fixture: jobs/refresh.py
    on 600 items, 8,192-row encode calls on Ray Data) recomputed by POST /tokenize with
    "recompute": true in requests of 1, 7, 64 and 333 items, sent concurrently so that
    @serve.batch merges them into model calls of mixed sizes: the same SID, the same weights."""
    import concurrent.futures

    import httpx
    from conftest import AUTH, deploy_serve, serve_config, wait_ready

    from sidserve.snapshot import SnapshotRoot

    ray_session()
    snap = SnapshotRoot(refreshed["snap"]).read_items(columns=["item_id", "sid", "behavior_weights"])
    expect = {r["item_id"]: r for r in snap.to_pylist()}
    catalog = small_catalog.slice(0, 600)
    cols = ["item_id"] + [c for c in catalog.column_names if c.endswith("_emb")]
    items = catalog.select(cols).to_pylist()
    assert len(expect) == len(items) == 600 and all(it["item_id"] in expect for it in items)

    config = serve_config({"model_uri": refreshed["model"], "snapshot_root": refreshed["snap"]})
    deploy_serve(config)
    with httpx.Client(base_url=f"http://127.0.0.1:{config['http_options']['port']}", headers=AUTH,
                      timeout=60) as client:
        wait_ready(client)

        def post(chunk):
            r = client.post("/tokenize", json={"items": chunk, "recompute": True})
            assert r.status_code == 200, r.text
            return r.json()["results"]

        for size in SIZES:
            chunks = [items[i:i + size] for i in range(0, len(items), size)]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = [x for res in pool.map(post, chunks) for x in res]
            assert len(results) == 600
            wrong_sid = [x["item_id"] for x in results if x["sid"] != expect[x["item_id"]]["sid"]]
            wrong_w = [x["item_id"] for x in results
                       if not np.array_equal(bits(np.float32(x["behavior_weights"])),
                                             bits(np.float32(expect[x["item_id"]]["behavior_weights"])))]
            assert not wrong_sid and not wrong_w, f"request size {size}: {len(wrong_sid)} SIDs, {len(wrong_w)} weights differ"
            assert all(x["path"] in ("full", "content_only") for x in results)  # computed, not looked up
        # issue 49.3: the replica's probe encoding equals what the job's encoder actors recorded
        probe = client.get("/v1/model").json()["probe"]
        assert probe["status"] == "match", probe
        summary = SnapshotRoot(refreshed["snap"]).summary(SnapshotRoot(refreshed["snap"]).latest())
        assert summary["environment"]["probe_hash"] == probe["replica"]["probe_hash"]
