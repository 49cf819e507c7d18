"""SemanticIdTokenizer API: encode contract, artifact round trip, bad input."""

import json

import numpy as np
import pyarrow as pa
import pytest

from sidserve import NotFittedError, SemanticIdTokenizer, TokenizerConfig, load_tokenizer
from sidserve.synthetic import embedding_array


def test_fit_returns_self_and_learned_state(small_config, small_catalog):
    tok = SemanticIdTokenizer(small_config)
    assert not hasattr(tok, "model_")  # no logic in __init__
    assert tok.fit(small_catalog) is tok
    assert tok.catalog_stats_["num_items"] == small_catalog.num_rows
    assert len(tok.history_) == small_config.epochs


def test_catalog_stats_are_over_all_items(fitted, small_catalog):
    norms = [np.linalg.norm(v) for v in small_catalog.column("behavior_emb").to_pylist() if v is not None]
    assert fitted.catalog_stats_["n_min"] == pytest.approx(min(norms), rel=1e-5)
    assert fitted.catalog_stats_["n_max"] == pytest.approx(max(norms), rel=1e-5)
    assert float(fitted.model_.n_min) == pytest.approx(min(norms), rel=1e-5)


def test_encode_contract(fitted, small_catalog, small_config):
    enc = fitted.encode(small_catalog)
    n, L, K = small_catalog.num_rows, small_config.sid_length, small_config.codebook_size
    assert enc.sid.shape == (n, L) and enc.sid.dtype == np.int32
    assert enc.behavior_weights.shape == (n, small_config.num_behavior_experts)
    assert enc.behavior_weights.dtype == np.float32
    cold = np.array([v is None for v in small_catalog.column("behavior_emb").to_pylist()])
    assert set(enc.path[cold]) == {"content_only"} and set(enc.path[~cold]) == {"full"}
    nb = small_config.num_behavior_experts
    assert (enc.sid[cold, -nb:] == K).all()  # reserved missing code
    assert (enc.sid[~cold] < K).all() and (enc.sid >= 0).all()
    assert (enc.behavior_weights[cold] == 0).all()
    assert (enc.behavior_weights >= 0).all()
    assert list(enc.item_id[:2]) == small_catalog.column("item_id").to_pylist()[:2]
    assert enc.sid_str[0] == "-".join(map(str, enc.sid[0]))


def test_layout_is_documented(small_config):
    groups = [e["group"] for e in small_config.sid_layout]
    assert groups == ["shared", "text", "image", "behavior", "behavior", "behavior"]
    assert [e["position"] for e in small_config.sid_layout] == list(range(6))


def test_numpy_and_arrow_inputs_agree(fitted, small_catalog):
    t = small_catalog.slice(0, 50)
    as_numpy = {
        "text_emb": np.array(t.column("text_emb").to_pylist(), dtype=np.float32),
        "image_emb": np.array(t.column("image_emb").to_pylist(), dtype=np.float32),
        "behavior_emb": [None if v is None else np.array(v) for v in t.column("behavior_emb").to_pylist()],
    }
    a, b = fitted.encode(t), fitted.encode(as_numpy)
    np.testing.assert_array_equal(a.sid, b.sid)
    np.testing.assert_array_equal(a.behavior_weights, b.behavior_weights)
    np.testing.assert_array_equal(a.path, b.path)


def test_encoding_is_batch_size_independent_in_codes(fitted, small_catalog):
    a = fitted.encode(small_catalog, batch_size=4096)
    b = fitted.encode(small_catalog, batch_size=100)
    assert (a.sid == b.sid).mean() > 0.999  # float reductions may differ in the last ulp only


def test_save_load_round_trip_is_bit_identical(fitted, small_catalog, tmp_path):
    version = fitted.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "stats.json"]
    loaded = SemanticIdTokenizer.from_pretrained(str(tmp_path / "m"))
    assert loaded.version == version
    a, b = fitted.encode(small_catalog), loaded.encode(small_catalog)
    np.testing.assert_array_equal(a.sid, b.sid)
    assert a.behavior_weights.tobytes() == b.behavior_weights.tobytes()
    assert load_tokenizer(str(tmp_path / "m")).config == fitted.config
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tokenizer_type"] == "adc-sid" and config["format_version"] == 1
    assert len(config["sid_layout"]) == fitted.config.sid_length


def test_same_model_same_version(fitted, tmp_path):
    assert fitted.save_pretrained(tmp_path / "a") == fitted.save_pretrained(tmp_path / "b")


def test_no_pickle_in_artifact(fitted, tmp_path):
    fitted.save_pretrained(tmp_path / "m")
    for p in (tmp_path / "m").iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # pickle protocol marker


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "stats.json"])
def test_tampered_artifact_is_refused(fitted, tmp_path, victim):
    fitted.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{victim}.*sha256"):
        SemanticIdTokenizer.from_pretrained(str(tmp_path / "m"))


def test_missing_file_and_manifest_are_refused(fitted, tmp_path):
    fitted.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "stats.json").unlink()
    with pytest.raises(ValueError, match="stats.json.*missing"):
        SemanticIdTokenizer.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="no manifest.json"):
        SemanticIdTokenizer.from_pretrained(str(tmp_path / "nothing"))


def test_artifact_on_a_uri_filesystem(fitted, small_catalog, tmp_path):
    uri = f"file://{tmp_path}/uri-model"
    fitted.save_pretrained(uri)
    np.testing.assert_array_equal(load_tokenizer(uri).encode(small_catalog).sid, fitted.encode(small_catalog).sid)


# bad input --------------------------------------------------------------------------

def test_unfitted_model_raises(small_catalog, small_config, tmp_path):
    tok = SemanticIdTokenizer(small_config)
    with pytest.raises(NotFittedError, match="not fitted"):
        tok.encode(small_catalog)
    with pytest.raises(ValueError, match="not fitted"):
        tok.save_pretrained(tmp_path / "x")


def test_wrong_dimension_names_column_and_row(fitted, small_catalog):
    rows = small_catalog.slice(0, 3).to_pylist()
    rows[1]["text_emb"] = rows[1]["text_emb"][:-1]
    with pytest.raises(ValueError, match=r"row 1: text_emb: wrong dimension \(expected 24\)"):
        fitted.encode(pa.Table.from_pylist(rows, schema=small_catalog.schema))


def test_numpy_wrong_dimension(fitted):
    with pytest.raises(ValueError, match="'image_emb' has dim 3, expected 16"):
        fitted.encode({"text_emb": np.zeros((2, 24)), "image_emb": np.zeros((2, 3))})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_values_raise(fitted, small_catalog, bad):
    rows = small_catalog.slice(0, 3).to_pylist()
    rows[2]["image_emb"][0] = bad
    with pytest.raises(ValueError, match="row 2: image_emb: NaN or inf"):
        fitted.encode(pa.Table.from_pylist(rows, schema=small_catalog.schema))
    rows = small_catalog.slice(0, 3).to_pylist()
    rows[0]["behavior_emb"] = [bad] * 12
    with pytest.raises(ValueError, match="row 0: behavior_emb: NaN or inf"):
        fitted.encode(pa.Table.from_pylist(rows, schema=small_catalog.schema))


def test_missing_required_modality(fitted, small_catalog):
    with pytest.raises(ValueError, match="missing required column 'image_emb'"):
        fitted.encode(small_catalog.drop_columns(["image_emb"]))
    rows = small_catalog.slice(0, 2).to_pylist()
    rows[1]["text_emb"] = None
    with pytest.raises(ValueError, match="row 1: text_emb: null"):
        fitted.encode(pa.Table.from_pylist(rows, schema=small_catalog.schema))


def test_behavior_column_may_be_absent(fitted, small_catalog):
    enc = fitted.encode(small_catalog.drop_columns(["behavior_emb"]).slice(0, 10))
    assert set(enc.path) == {"content_only"}


def test_not_a_table(fitted):
    with pytest.raises(ValueError, match="items must be"):
        fitted.encode([1, 2, 3])


def test_empty_input(small_config):
    empty = pa.table({"text_emb": embedding_array(np.zeros((0, 24))),
                      "image_emb": embedding_array(np.zeros((0, 16)))})
    with pytest.raises(ValueError, match="empty"):
        SemanticIdTokenizer(small_config).fit(empty)


def test_all_null_behavior_cannot_fit(small_config, small_catalog):
    t = small_catalog.drop_columns(["behavior_emb"])
    with pytest.raises(ValueError, match="no item has a behavior embedding"):
        SemanticIdTokenizer(small_config).fit(t)


def test_normalised_behavior_is_refused(small_config, small_catalog):
    b = np.random.default_rng(0).normal(size=(small_catalog.num_rows, 12))
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    t = small_catalog.set_column(small_catalog.schema.get_field_index("behavior_emb"), "behavior_emb",
                                 embedding_array(b))
    with pytest.raises(ValueError, match="look normalised"):
        SemanticIdTokenizer(small_config).fit(t)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['codebok_size'\]"):
        TokenizerConfig.from_dict({"codebok_size": 10})


@pytest.mark.parametrize("change,match", [
    ({"modality_dims": {}}, "at least one content modality"),
    ({"codebook_size": 1}, "codebook_size"),
    ({"modality_dims": {"text": 0}}, r"modality_dims\['text'\]"),
    ({"behavior_dropout": 1.5}, "behavior_dropout"),
    ({"modality_dims": {"behavior": 3}}, "reserved"),
])
def test_bad_config_values(change, match):
    with pytest.raises(ValueError, match=match):
        TokenizerConfig(**change).validate()


def test_content_only_model_without_behavior(small_catalog):
    cfg = TokenizerConfig(modality_dims={"text": 24}, behavior_dim=None, codebook_size=8, hidden_dim=16,
                          latent_dim=8, expert_hidden_dim=16, epochs=1, batch_size=512)
    tok = SemanticIdTokenizer(cfg).fit(small_catalog)
    enc = tok.encode(small_catalog)
    assert enc.sid.shape == (small_catalog.num_rows, 2)
    assert enc.behavior_weights.shape == (small_catalog.num_rows, 0)
    assert set(enc.path) == {"full"}
