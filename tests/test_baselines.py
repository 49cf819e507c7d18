"""Baselines behind the same interface: shapes, round trips, numpy references."""

import numpy as np
import pytest

from sidserve import load_tokenizer
from sidserve.items import coerce_items
from sidserve.tokenizers.baselines import (
    BaselineConfig,
    OPQConfig,
    OPQTokenizer,
    RQKmeansTokenizer,
    RQVAEConfig,
    RQVAETokenizer,
)

DIMS = {"text": 24, "image": 16}


@pytest.fixture(scope="module", params=["rq-kmeans", "opq", "rq-vae"])
def baseline(request, small_catalog):
    common = dict(modality_dims=DIMS, behavior_dim=12, codebook_size=8, num_levels=3, kmeans_iters=10)
    if request.param == "rq-kmeans":
        tok = RQKmeansTokenizer(BaselineConfig(use_behavior=True, **common))
    elif request.param == "opq":
        tok = OPQTokenizer(OPQConfig(opq_iters=3, **common))
    else:
        tok = RQVAETokenizer(RQVAEConfig(epochs=2, hidden_dim=32, latent_dim=8, batch_size=256, **common))
    return tok.fit(small_catalog)


def test_same_interface(baseline, small_catalog):
    enc = baseline.encode(small_catalog)
    assert enc.sid.shape == (small_catalog.num_rows, 3) and enc.sid.dtype == np.int32
    assert enc.sid.min() >= 0 and enc.sid.max() < 8
    assert enc.behavior_weights.shape == (small_catalog.num_rows, 0)
    report = baseline.evaluate(small_catalog)
    assert 0 < report["utilisation_mean"] <= 1 and report["recon"] > 0


def test_round_trip(baseline, small_catalog, tmp_path):
    baseline.save_pretrained(tmp_path / "b")
    loaded = load_tokenizer(str(tmp_path / "b"))
    assert type(loaded) is type(baseline)
    np.testing.assert_array_equal(loaded.encode(small_catalog).sid, baseline.encode(small_catalog).sid)


def test_wrong_type_is_refused(baseline, tmp_path):
    baseline.save_pretrained(tmp_path / "b")
    other = OPQTokenizer if not isinstance(baseline, OPQTokenizer) else RQKmeansTokenizer
    with pytest.raises(ValueError, match="not a"):
        other.from_pretrained(str(tmp_path / "b"))


def test_rqkmeans_matches_numpy_reference(small_catalog):
    tok = RQKmeansTokenizer(BaselineConfig(modality_dims=DIMS, codebook_size=8, num_levels=3)).fit(small_catalog)
    x = tok.features(coerce_items(small_catalog, tok.config))[:200].astype(np.float64)
    residual, codes = x.copy(), []
    for cent in tok.centroids_.astype(np.float64):
        idx = ((residual[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)
        codes.append(idx)
        residual -= cent[idx]
    np.testing.assert_array_equal(np.stack(codes, 1), tok.encode(small_catalog.slice(0, 200)).sid)
    # residual quantization: each level lowers the reconstruction error
    errs = [((x - tok.centroids_[:k + 1][np.arange(k + 1)[:, None], np.stack(codes, 1)[:, :k + 1].T].sum(0)) ** 2).sum()
            for k in range(3)]
    assert errs[0] > errs[1] > errs[2]


def test_opq_rotation_is_orthogonal(small_catalog):
    tok = OPQTokenizer(OPQConfig(modality_dims=DIMS, codebook_size=8, num_levels=3, opq_iters=2)).fit(small_catalog)
    r = tok.rotation_.astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(r.shape[0]), atol=1e-5)


def test_artifacts_load_in_a_process_that_imported_only_the_loader(baseline, tmp_path):
    """`import sidserve` is lazy (no torch for the grouping tasks of the assignment); loading an
    artifact must still find every tokenizer type, and the grouping module must not pull torch."""
    import subprocess
    import sys

    baseline.save_pretrained(tmp_path / "b")
    code = ("import sys; import sidserve.jobs.assign, sidserve.snapshot; assert 'torch' not in sys.modules, 'torch'; "
            "from sidserve.tokenizers.registry import load_tokenizer; "
            f"print(type(load_tokenizer({str(tmp_path / 'b')!r})).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == type(baseline).__name__


def test_encode_is_batch_invariant(baseline, small_catalog):
    """An item's codes do not depend on the other items of its call (tests/test_invariance.py
    for ADC-SID): the whole catalog vs random pieces of sizes 1, 7, 64, 333, ..."""
    from test_batch_invariance import random_pieces

    whole = baseline.encode(small_catalog).sid
    for idx in random_pieces(len(small_catalog), np.random.default_rng(4)):
        np.testing.assert_array_equal(baseline.encode(small_catalog.take(idx)).sid, whole[idx])


def test_half_precision_inputs_are_widened_and_out_of_range_ones_refused(small_catalog):
    """Issue 49.3: float16 embedding columns are widened to float32 exactly (the same SIDs as
    the same values given in float32), and a float64 value beyond float32's range is a row's
    reject reason, never an inf inside the model."""
    import pyarrow as pa

    from sidserve.items import check_items

    rq = RQKmeansTokenizer(BaselineConfig(modality_dims={"text": 24, "image": 16}, codebook_size=8,
                                          num_levels=2, kmeans_iters=5)).fit(small_catalog)

    def cast(table, dtype):
        cols = {n: table.column(n) for n in table.column_names}
        for n in ("text_emb", "image_emb"):
            cols[n] = pa.array([np.asarray(v, np.float16).astype(dtype).tolist() for v in table.column(n).to_pylist()],
                               pa.list_(pa.float16() if dtype == np.float16 else pa.float32()))
        return pa.table(cols)

    half, single = cast(small_catalog, np.float16), cast(small_catalog, np.float32)
    assert half.schema.field("text_emb").type.value_type == pa.float16()
    np.testing.assert_array_equal(rq.encode(half).sid, rq.encode(single).sid)
    big = {"item_id": np.array(["a", "b"]), "text_emb": np.full((2, 24), 0.5), "image_emb": np.full((2, 16), 0.5)}
    big["text_emb"][1, 3] = 1e39  # a float64 beyond float32's largest (3.4e38)
    checked = check_items(big, rq.config, require_item_id=True)
    assert checked.reasons[0] is None and checked.reasons[1] == "text_emb: NaN or inf value"
