"""The service's parts without Ray: id index, settings, state loading, local mode over HTTP."""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from conftest import free_port
from test_serve import item_json, write_snapshot

from sidserve.ids import hash_strings as hash_ids
from sidserve.serving import schema
from sidserve.serving.catalog_index import CatalogIndex
from sidserve.serving.state import ServiceConfig, load_state
from sidserve.snapshot import ITEMS_SCHEMA, SnapshotRoot
from sidserve.tokenizers.adc_sid.config import TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]


def snapshot_table(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table({
        "item_id": pa.array(ids, pa.string()),
        "sid": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32())),
        "sid_str": pa.array([f"{i}-{i + 1}" for i in range(n)]),
        "dedup": pa.array([i % 3 for i in range(n)], pa.int32()),
        "behavior_weights": pa.array([[0.5]] * n, pa.list_(pa.float32())),
        "path": pa.array(["full"] * n),
        "model_version": pa.array(["v1"] * n),
    }, schema=ITEMS_SCHEMA)


def test_hash_ids_equal_strings_hash_equal_and_slices_agree():
    ids = pa.array(["a", "", "ab", "ba", "é", "\x00", "\x00\x00", "a" * 300])
    h = hash_ids(ids)
    assert len(set(h.tolist())) == len(ids)  # these all differ (incl. "" vs NUL vs NUL NUL)
    assert (hash_ids(ids.slice(2, 3)) == h[2:5]).all()  # offsets of a sliced array
    assert (hash_ids(pa.chunked_array([ids.slice(0, 4), ids.slice(4)])) == h).all()
    assert hash_ids(pa.array(["ab"]))[0] == h[2]


def test_catalog_index_matches_a_dict():
    rng = np.random.default_rng(0)
    ids = [f"item-{i}" for i in rng.permutation(5000)] + ["", "ünï", "x" * 50]
    index = CatalogIndex(snapshot_table(ids), "v1")
    truth = {v: i for i, v in enumerate(ids)}
    queries = ids[::7] + ["item-5000", "missing", None, "ITEM-1", "x" * 49]
    hits = index.lookup(queries)
    for q, found, row in zip(queries, hits.found, hits.rows, strict=True):
        assert found == (q in truth)
        assert row == truth.get(q, -1)
    rows = index.rows(hits.rows[hits.found])
    assert rows["item_id"] == [q for q in queries if q in truth]
    assert index.model_version == "v1"


def test_catalog_index_refuses_null_ids():
    with pytest.raises(ValueError, match="null item_id"):
        CatalogIndex(snapshot_table(["a", "b"]).set_column(0, "item_id", pa.array(["a", None])), "v9")


LOAD_PEAK = """
import json, sys, tracemalloc
import pyarrow as pa
from sidserve.serving.catalog_index import CatalogIndex
from sidserve.snapshot import SnapshotRoot
root = SnapshotRoot(sys.argv[1])
tracemalloc.start()  # numpy's buffers (the id hashes and their temporaries) are traced
index = CatalogIndex.load(root)
numpy_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"arrow_peak": pa.default_memory_pool().max_memory(), "numpy_peak": numpy_peak,
                  "nbytes": index.table.nbytes + 16 * len(index), "rows": len(index), "columns": index.table.column_names,
                  "found": int(index.lookup(["item-0", "item-99999", "nope"]).found.sum())}))
"""


def test_catalog_index_loads_within_twice_its_size(tmp_path):
    """Issue 50.2: loading reads only the columns the index keeps (a snapshot's long ``path``
    and ``sid_str`` strings are never decoded) and hashes the ids in bounded chunks, so the
    peak while loading (Arrow's pool plus numpy's buffers, in a fresh process) stays within 2x
    of the loaded index. Reading every column and hashing all ids at once took several times
    the index."""
    import pyarrow.parquet as pq

    n = 100_000
    table = snapshot_table([f"item-{i}" for i in range(n)])
    long = pa.array([f"{'p' * 300}-{i}" for i in range(n)])  # columns the index does not keep
    table = table.set_column(ITEMS_SCHEMA.get_field_index("path"), "path", long)
    table = table.set_column(ITEMS_SCHEMA.get_field_index("sid_str"), "sid_str", long)
    (tmp_path / "snapshots" / "v1" / "items").mkdir(parents=True)
    for k in range(2):  # two files, row groups smaller than a file
        pq.write_table(table.slice(k * n // 2, n // 2), tmp_path / "snapshots" / "v1" / "items" / f"part-{k}.parquet",
                       row_group_size=20_000)
    (tmp_path / "snapshots" / "v1" / "summary.json").write_text(json.dumps({"version": "v1", "items": n}))
    root = SnapshotRoot(str(tmp_path))
    root.publish("v1")
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["rows"] == n and m["found"] == 2 and m["columns"] == ["item_id", "sid", "dedup", "behavior_weights"]
    assert m["arrow_peak"] + m["numpy_peak"] <= 2 * m["nbytes"], m

@pytest.mark.parametrize("bad,match", [
    ({"modle_uri": "x"}, "unknown config key.*modle_uri"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"snapshot_poll_s": -1}, "snapshot_poll_s"),
    ({"batch_wait_timeout_s": 60}, "batch_wait_timeout_s"),
])
def test_service_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ServiceConfig.from_dict(bad).validate()


def test_load_state_names_what_is_missing(tmp_path, fitted, small_catalog, monkeypatch):
    monkeypatch.delenv("SIDSERVE_MODEL_URI", raising=False)
    monkeypatch.delenv("SIDSERVE_SNAPSHOT_ROOT", raising=False)
    with pytest.raises(ValueError, match="no model"):
        load_state(ServiceConfig())
    with pytest.raises(ValueError, match="no published snapshot"):
        load_state(ServiceConfig(snapshot_root=str(tmp_path / "empty")))
    model = str(tmp_path / "model")
    fitted.save_pretrained(model)
    root = SnapshotRoot(str(tmp_path / "snaps"))
    write_snapshot(root, fitted, model, small_catalog.slice(0, 100), "s1")
    # no model_uri: the model that made the published snapshot
    monkeypatch.setenv("SIDSERVE_SNAPSHOT_ROOT", root.uri)
    state = load_state(ServiceConfig())
    assert state.model_uri == model and state.catalog_usable and len(state.catalog) == 100
    # the same config again reuses both pieces
    again = load_state(ServiceConfig(), current=state)
    assert again.tokenizer is state.tokenizer and again.catalog is state.catalog


def start_local(cmd: list[str], port: int):
    """Start a local server process; -> (process, base URL) once /readyz answers 200."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read())
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the local server did not become ready in 30 s")


def test_local_mode_serves_the_same_app(tmp_path, fitted, small_catalog):
    model = str(tmp_path / "model")
    fitted.save_pretrained(model)
    root = SnapshotRoot(str(tmp_path / "snaps"))
    write_snapshot(root, fitted, model, small_catalog.slice(0, 100), "s1")
    port = free_port()
    proc, base = start_local([sys.executable, "-m", "sidserve", "serve", "--local", "--model", model,
                              "--snapshot", root.uri, "--port", str(port)], port)
    try:
        r = httpx.post(f"{base}/tokenize", json={"items": [item_json(small_catalog, 1),
                                                           item_json(small_catalog, 200, behavior_emb=None)]})
        assert r.status_code == 200, r.text
        assert [x["path"] for x in r.json()["results"]] == ["catalog", "content_only"]
        # where the request's time went (issue 49.2): every stage, summing to the app's time
        stages = server_timing(r)
        assert list(stages) == ["read", "parse", "lookup", "queue", "model", "respond", "app"], stages
        assert all(v >= 0 for v in stages.values()) and stages["model"] > 0
        assert sum(v for k, v in stages.items() if k != "app") == pytest.approx(stages["app"], abs=0.01)
        hit = httpx.post(f"{base}/tokenize", json={"items": [item_json(small_catalog, 1)]})
        assert "model" not in server_timing(hit) and "queue" not in server_timing(hit)  # a catalog hit
        bad = httpx.post(f"{base}/tokenize", json={"items": [{"text_emb": [1.0]}]})
        assert bad.status_code == 422 and "items[0].text_emb" in json.dumps(bad.json())
        metrics = httpx.get(f"{base}/metrics").text
        assert 'sidserve_requests_total{route="/tokenize",status="200"} 2.0' in metrics
        assert 'sidserve_items_total{path="content_only"} 1.0' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def server_timing(response) -> dict[str, float]:
    """The Server-Timing header's stages -> ms, in order."""
    out = {}
    for part in response.headers["server-timing"].split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def test_local_mode_bad_model_exits_with_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sidserve", "serve", "--local", "--model", str(tmp_path / "nope"),
                           "--snapshot", "", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "nope" in proc.stderr and "Traceback" not in proc.stderr


def _via_pydantic(body: bytes, config, max_items: int):
    """read_request's fallback path alone: the pydantic models, then prepare."""
    request = schema.TokenizeRequest.model_validate_json(body)
    items = [{"item_id": it.item_id, **({"popularity": it.popularity} if it.popularity is not None else {}),
              **(it.__pydantic_extra__ or {})} for it in request.items]
    return schema.prepare(items, request.recompute, config, max_items)


def _outcome(fn):
    try:
        p = fn()
    except schema.RequestError as err:
        return ("error", err.status, json.dumps(err.detail))
    except Exception as err:  # noqa: BLE001 - pydantic.ValidationError: compare its kind
        return ("error", type(err).__name__)
    a = p.arrays
    return ("ok", p.item_ids, p.recompute, {m: v.tolist() for m, v in a.content.items()},
            a.behavior.tolist(), a.has_behavior.tolist())


def _item(rng, text=4, image=3, behavior=2, **kw):
    item = {"item_id": "a", "text_emb": rng.standard_normal(text).tolist(),
            "image_emb": rng.standard_normal(image).tolist(), "behavior_emb": rng.standard_normal(behavior).tolist()}
    item.update(kw)
    return item


@pytest.mark.parametrize("case", [
    "plain", "ints", "ints-and-bools", "bools-only", "null-behavior", "absent-behavior", "recompute", "null-id", "wrong-dim",
    "unknown-field", "missing-content", "empty", "too-many", "numeric-strings", "word-in-vector",
    "null-in-vector", "nested-vector", "huge-int", "beyond-float32", "nan-literal", "id-not-string",
    "recompute-string", "items-not-list", "item-not-object", "top-level-extra", "malformed", "not-utf8",
])
def test_fast_json_path_matches_the_pydantic_models(case):
    """read_request parses with orjson and falls back to the pydantic models for anything
    but the plain shape: for every body both paths give the same arrays or the same error."""
    cfg = TokenizerConfig(modality_dims={"text": 4, "image": 3}, behavior_dim=2)
    rng = np.random.default_rng(0)
    items = [_item(rng), _item(rng, item_id="b")]
    doc = {"items": items}
    raw = None
    if case == "ints":
        items[0]["text_emb"] = [1, 0, 3, -2]
    elif case == "ints-and-bools":
        items[0]["text_emb"] = [1, 0, True, -2]
    elif case == "bools-only":
        items[0]["behavior_emb"] = [True, False]
    elif case == "null-behavior":
        items[1]["behavior_emb"] = None
    elif case == "absent-behavior":
        del items[1]["behavior_emb"]
    elif case == "recompute":
        doc["recompute"] = True
    elif case == "null-id":
        items[0]["item_id"] = None
    elif case == "wrong-dim":
        items[1]["image_emb"] = [0.5]
    elif case == "unknown-field":
        items[0]["colour"] = [1.0]
    elif case == "missing-content":
        del items[0]["text_emb"]
    elif case == "empty":
        doc["items"] = []
    elif case == "too-many":
        doc["items"] = items * 3
    elif case == "numeric-strings":
        items[0]["text_emb"][1] = "1.5"
    elif case == "word-in-vector":
        items[0]["text_emb"][1] = "abc"
    elif case == "null-in-vector":
        items[0]["text_emb"][1] = None
    elif case == "nested-vector":
        items[0]["text_emb"][1] = [1.0]
    elif case == "huge-int":
        items[0]["text_emb"][1] = 10**30  # beyond int64: orjson gives an int numpy cannot hold
    elif case == "beyond-float32":
        items[0]["text_emb"][1] = 1e39
    elif case == "nan-literal":
        items[0]["text_emb"][1] = float("nan")  # json.dumps writes NaN, which only pydantic reads
    elif case == "id-not-string":
        items[0]["item_id"] = 5
    elif case == "recompute-string":
        doc["recompute"] = "true"
    elif case == "items-not-list":
        doc["items"] = {"0": items[0]}
    elif case == "item-not-object":
        doc["items"] = [items[0], [1, 2]]
    elif case == "top-level-extra":
        doc["version"] = 2
    elif case == "malformed":
        raw = b'{"items": [{"text_emb": [1, 2'
    elif case == "not-utf8":
        raw = b"\xff\xfe{}"
    body = raw if raw is not None else json.dumps(doc).encode()
    fast = _outcome(lambda: schema.read_request(body, cfg, 5))
    slow = _outcome(lambda: _via_pydantic(body, cfg, 5))
    assert fast == slow
    # strict types in both paths: a JSON boolean or a string is not a number, "true" not a boolean
    accepted = {"plain", "ints", "null-behavior", "absent-behavior", "recompute", "null-id", "huge-int"}
    assert fast[0] == ("ok" if case in accepted else "error"), fast


def test_fast_json_path_is_taken_for_the_plain_shape(monkeypatch):
    """The plain shape never reaches the pydantic models (else the fast path is dead code)."""
    cfg = TokenizerConfig(modality_dims={"text": 4, "image": 3}, behavior_dim=2)
    rng = np.random.default_rng(1)
    body = json.dumps({"items": [_item(rng), _item(rng, behavior_emb=None, item_id=None)],
                       "recompute": False}).encode()

    def refuse(*_a, **_k):
        raise AssertionError("fell back to pydantic")

    monkeypatch.setattr(schema.TokenizeRequest, "model_validate_json", refuse)
    prepared = schema.read_request(body, cfg, 10)
    assert prepared.item_ids == ["a", None] and prepared.arrays.has_behavior.tolist() == [True, False]


@pytest.mark.parametrize("case", ["given", "int", "missing-warm", "missing-cold", "negative", "boolean", "string"])
def test_popularity_field_of_a_popularity_model(case):
    """richness_signal=popularity: an item with behavior needs a number >= 0 (both parsers
    agree); a cold item may leave it out."""
    cfg = TokenizerConfig(modality_dims={"text": 4, "image": 3}, behavior_dim=2, richness_signal="popularity")
    rng = np.random.default_rng(3)
    item = _item(rng, popularity=12.5)
    if case == "int":
        item["popularity"] = 7
    elif case in ("missing-warm", "missing-cold"):
        del item["popularity"]
        if case == "missing-cold":
            item["behavior_emb"] = None
    elif case == "negative":
        item["popularity"] = -1
    elif case == "boolean":
        item["popularity"] = True
    elif case == "string":
        item["popularity"] = "12"
    body = json.dumps({"items": [item]}).encode()
    fast = _outcome(lambda: schema.read_request(body, cfg, 5))
    slow = _outcome(lambda: _via_pydantic(body, cfg, 5))
    assert fast[0] == slow[0]
    if case in ("given", "int", "missing-cold"):
        assert fast[0] == "ok"
        got = schema.read_request(body, cfg, 5).arrays.popularity
        assert got.tolist() == [{"given": 12.5, "int": 7.0, "missing-cold": 0.0}[case]]
    else:
        assert fast[0] == "error"
        if case in ("missing-warm", "negative"):
            assert fast[1] == 422 and "popularity" in fast[2]


def test_popularity_is_an_unknown_field_for_a_norm_model():
    cfg = TokenizerConfig(modality_dims={"text": 4, "image": 3}, behavior_dim=2)
    body = json.dumps({"items": [_item(np.random.default_rng(4), popularity=3)]}).encode()
    for read in (schema.read_request, _via_pydantic):
        with pytest.raises(schema.RequestError) as err:
            read(body, cfg, 5)
        assert err.value.status == 422 and "popularity" in json.dumps(err.value.detail)


def test_open_routes_say_ready_or_not_and_nothing_else(monkeypatch):
    from fastapi.testclient import TestClient

    from sidserve.serving.app import make_app
    from sidserve.serving.core import TokenizeService
    from sidserve.serving.telemetry import PrometheusTelemetry

    monkeypatch.setenv("SIDSERVE_API_KEY", "k")
    service = TokenizeService(PrometheusTelemetry())
    service.last_error = "ValueError: 's3://private-bucket/models/sid-v7' is not an artifact"
    client = TestClient(make_app(lambda: service))
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert "private-bucket" not in r.text and "ValueError" not in r.text
    assert client.get("/v1/model").status_code == 401  # the details are behind the key
    r = client.get("/v1/model", headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and "private-bucket" in r.text


def test_model_info_without_an_api_key_needs_an_explicit_opt_out(monkeypatch):
    """Issue 50.5: with no SIDSERVE_API_KEY, GET /v1/model showed the model URI, the service
    config and the last error to anyone (fail-open)."""
    from fastapi.testclient import TestClient

    from sidserve.serving.app import make_app
    from sidserve.serving.core import TokenizeService
    from sidserve.serving.telemetry import PrometheusTelemetry

    monkeypatch.delenv("SIDSERVE_API_KEY", raising=False)
    monkeypatch.delenv("SIDSERVE_MODEL_INFO_OPEN", raising=False)
    service = TokenizeService(PrometheusTelemetry())
    service.last_error = "ValueError: 's3://private-bucket/models/sid-v7' is not an artifact"
    client = TestClient(make_app(lambda: service))
    r = client.get("/v1/model")
    assert r.status_code == 403 and "private-bucket" not in r.text
    assert "SIDSERVE_API_KEY" in r.text and "SIDSERVE_MODEL_INFO_OPEN=1" in r.text
    monkeypatch.setenv("SIDSERVE_MODEL_INFO_OPEN", "1")  # the explicit opt-out
    r = client.get("/v1/model")
    assert r.status_code == 503 and "private-bucket" in r.text  # no model loaded: 503, with the reason


def test_item_ids_longer_than_the_limit_are_named():
    cfg = TokenizerConfig(modality_dims={"text": 4, "image": 3}, behavior_dim=2)
    rng = np.random.default_rng(2)
    body = json.dumps({"items": [_item(rng), _item(rng, item_id="x" * 513)]}).encode()
    for read in (lambda: schema.read_request(body, cfg, 10, max_id_chars=512),
                 lambda: schema.prepare(*_pydantic_items(body), cfg, 10, max_id_chars=512)):
        with pytest.raises(schema.RequestError) as err:
            read()
        assert err.value.status == 422
        assert err.value.detail[0]["loc"] == ["body", "items", 1, "item_id"]
        assert "items[1].item_id has 513 characters" in err.value.detail[0]["msg"]
    assert schema.read_request(body, cfg, 10, max_id_chars=513).item_ids[1] == "x" * 513


def _pydantic_items(body: bytes):
    request = schema.TokenizeRequest.model_validate_json(body)
    return [{"item_id": it.item_id, **(it.__pydantic_extra__ or {})} for it in request.items], request.recompute


def _peak_rss(pid: int) -> int:
    """Peak resident set size of a process, bytes (Linux: VmHWM)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(240)
def test_bodies_over_the_limit_get_413_before_the_replica_reads_them(tmp_path, fitted, small_catalog):
    """10x the byte limit, with and without Content-Length (chunked), and a Content-Length that
    lies: each a 413, the replica's memory stays put, and it answers the next request."""
    from sidserve.serving.state import ServiceConfig

    model = str(tmp_path / "model")
    fitted.save_pretrained(model)
    user_config = {"model_uri": model, "snapshot_root": "", "max_body_bytes": 2 << 20}
    limit = ServiceConfig.from_dict(user_config).body_limit(fitted.config)
    port = free_port()
    code = (f"from sidserve.serving.local import serve_local; "
            f"serve_local({user_config!r}, '127.0.0.1', {port}, log_level='warning')")
    proc, base = start_local([sys.executable, "-c", code], port)
    try:
        good = {"items": [item_json(small_catalog, 1)]}
        assert httpx.post(f"{base}/tokenize", json=good).status_code == 200
        peak0 = _peak_rss(proc.pid)
        big = b'{"items": [' + b"1.0," * (10 * limit // 4) + b"1.0]}"  # 10x the limit (20 MiB)

        def chunks():
            for s in range(0, len(big), 1 << 20):
                yield big[s:s + (1 << 20)]

        for name, send in [
            ("content-length", lambda: httpx.post(f"{base}/tokenize", content=big,
                                                  headers={"Content-Type": "application/json"})),
            ("chunked", lambda: httpx.post(f"{base}/tokenize", content=chunks(),
                                           headers={"Content-Type": "application/json"})),
        ]:
            for _ in range(3):
                try:
                    r = send()
                except httpx.HTTPError:  # the server may close while the client still sends
                    continue
                assert r.status_code == 413, (name, r.status_code, r.text[:300])
                assert f"limit of {limit} bytes" in r.text
        # the peak (VmHWM) grew by less than half of one body: none was read whole
        assert _peak_rss(proc.pid) - peak0 < len(big) // 2, (peak0, _peak_rss(proc.pid), len(big))
        assert httpx.post(f"{base}/tokenize", json=good).status_code == 200  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_merged_requests_keep_every_field():
    """@serve.batch merges requests with concat_arrays: popularity (read by richness_signal=
    "popularity" and behavior_shrinkage) and item ids must reach the model call whole (issue 50.1:
    popularity went in as item_ids and the merged call failed)."""
    from sidserve.items import ItemArrays

    def part(n, start):
        return ItemArrays(content={"text": np.full((n, 3), start, np.float32)},
                          behavior=np.ones((n, 2), np.float32), has_behavior=np.ones(n, bool),
                          item_ids=np.array([f"i{start + k}" for k in range(n)], object),
                          popularity=np.arange(start, start + n, dtype=np.float64))

    merged = schema.concat_arrays([part(2, 0), part(3, 10)])
    assert merged.popularity.tolist() == [0, 1, 10, 11, 12]
    assert merged.item_ids.tolist() == ["i0", "i1", "i10", "i11", "i12"]
    assert merged.content["text"][:, 0].tolist() == [0, 0, 10, 10, 10] and len(merged) == 5
    single = part(1, 5)
    assert schema.concat_arrays([single]) is single


def test_before_a_model_loads_a_request_gets_503_without_its_body_being_read():
    """Issue 50.5: with no model loaded there is no byte limit yet, and the endpoint read the
    whole body (any size) before answering 503."""
    import asyncio

    from sidserve.serving.app import TokenizeEndpoint
    from sidserve.serving.core import TokenizeService
    from sidserve.serving.telemetry import Telemetry

    service = TokenizeService(Telemetry())  # never configured: no model
    endpoint = TokenizeEndpoint(lambda: service)
    received, sent = [], []

    async def receive():  # a 64 MiB body in 1 MiB chunks
        received.append(1)
        await asyncio.sleep(0)
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": len(received) < 64}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/tokenize", "headers": []}
    asyncio.run(asyncio.wait_for(endpoint(scope, receive, send), timeout=10))
    assert sent[0]["status"] == 503 and b"not ready" in sent[1]["body"]
    assert not received  # not one chunk of the body was read


def test_the_service_defaults_are_what_ships():
    """The code's ServiceConfig defaults equal deploy/serve.yaml's user_config (max_batch_size was
    256 in the code, 64 shipped and measured), and the service's batcher starts from them."""
    import yaml

    from sidserve.serving.core import TokenizeService
    from sidserve.serving.state import ServiceConfig
    from sidserve.serving.telemetry import Telemetry

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml").read_text())
    user_config = shipped["applications"][0]["deployments"][0]["user_config"]
    defaults = ServiceConfig()
    assert user_config and {k: getattr(defaults, k) for k in user_config} == user_config
    batcher = TokenizeService(Telemetry()).batcher
    assert (batcher.max_batch_size, batcher.wait_s) == (defaults.max_batch_size, defaults.batch_wait_timeout_s)


def test_a_replica_that_cannot_load_a_new_state_says_so_in_its_metrics(tmp_path, fitted, small_catalog):
    """Issue 50.5: a failed load keeps the old state serving (/readyz stays 200), so the
    failure must show in metrics: a counter per stage, a 0/1 gauge the alert reads, and the
    served snapshot's write time (its age = time() - it)."""
    import asyncio

    from sidserve.serving.core import TokenizeService
    from sidserve.serving.telemetry import PrometheusTelemetry

    model = str(tmp_path / "model")
    fitted.save_pretrained(model)
    root = SnapshotRoot(str(tmp_path / "snaps"))
    write_snapshot(root, fitted, model, small_catalog.slice(0, 50), "20261201T030000Z-aaaaaa")
    telemetry = PrometheusTelemetry()
    service = TokenizeService(telemetry)

    def value(name, **labels):
        return telemetry.registry.get_sample_value(name, labels or None)

    async def scenario():
        good = {"model_uri": model, "snapshot_root": root.uri, "snapshot_poll_s": 0.05}
        await service.reconfigure(good)
        # a snapshot from before summaries had created_at: the time in its generated name
        # 2026-01-01T00:00Z is 1767225600; + 334 days (Jan..Nov) + 3 h
        assert value("sidserve_snapshot_timestamp_seconds") == 1767225600 + 334 * 86400 + 3 * 3600
        assert value("sidserve_load_failing") == 0
        with pytest.raises(ValueError):
            await service.reconfigure({**good, "model_uri": str(tmp_path / "no-model")})
        assert value("sidserve_load_failures_total", stage="reconfigure") == 1
        assert value("sidserve_load_failing") == 1
        assert service.current().snapshot_version == "20261201T030000Z-aaaaaa"  # still serving
        await service.reconfigure(good)
        assert value("sidserve_load_failing") == 0
        # a new LATEST whose items cannot be read: the poller fails, the old state serves on
        broken = Path(root.path) / "snapshots" / "v-broken"
        (broken / "items").mkdir(parents=True)
        (broken / "items" / "part-0.parquet").write_bytes(b"not parquet")
        (broken / "summary.json").write_text(json.dumps({"version": "v-broken", "model": model,
                                                         "created_at": time.time()}))
        root.publish("v-broken")
        deadline = time.time() + 10
        while value("sidserve_load_failures_total", stage="poll") is None and time.time() < deadline:
            await asyncio.sleep(0.05)
        assert value("sidserve_load_failures_total", stage="poll") >= 1
        assert value("sidserve_load_failing") == 1
        assert service.current().snapshot_version == "20261201T030000Z-aaaaaa"
        # a good snapshot published after it: loaded, the gauge back to 0, its own write time
        write_snapshot(root, fitted, model, small_catalog.slice(0, 60), "v-good")
        (Path(root.path) / "snapshots" / "v-good" / "summary.json").write_text(json.dumps(
            {"version": "v-good", "model": model, "model_version": fitted.version, "created_at": 1767225600.0}))
        deadline = time.time() + 10
        while service.current().snapshot_version != "v-good" and time.time() < deadline:
            await asyncio.sleep(0.05)
        assert service.current().snapshot_version == "v-good"
        assert value("sidserve_load_failing") == 0
        assert value("sidserve_snapshot_timestamp_seconds") == 1767225600.0
        service.stop()

    asyncio.run(scenario())


def test_a_replica_whose_probe_differs_from_its_snapshot_says_so(fitted):
    """Issue 49.3: the probe hash is a function of the model and the machine (stable here,
    changed by a model that differs in its weights); a replica compares its own with the one
    the snapshot's encoders recorded, shows both in GET /v1/model's ``probe`` and exports
    sidserve_probe_mismatch; it says "unknown" where it cannot compare."""
    import copy
    from types import SimpleNamespace

    import torch

    from sidserve.serving.core import TokenizeService
    from sidserve.serving.state import ServingState
    from sidserve.serving.telemetry import PrometheusTelemetry
    from sidserve.tokenizers.probe import environment, probe_hash

    env = environment(fitted)
    assert env["probe_hash"] == probe_hash(fitted) and len(env["probe_hash"]) == 16
    assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    other = copy.deepcopy(fitted)
    with torch.no_grad():
        for p in other.model_.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    assert probe_hash(other) != env["probe_hash"]

    def state(snapshot_hash, model_version=fitted.version, catalog=True):
        cat = SimpleNamespace(summary={"environment": {"probe_hash": snapshot_hash,
                                                       "encoders": [{"probe_hash": snapshot_hash}]}},
                              model_version=model_version, version="v1", created_at=None) if catalog else None
        return ServingState(tokenizer=fitted, model_uri="m", catalog=cat, environment=env)

    assert state(env["probe_hash"]).probe["status"] == "match"
    assert state("0" * 16).probe["status"] == "mismatch"
    assert state("0" * 16).probe["snapshot"] == [{"probe_hash": "0" * 16}]
    for s in (state(None), state("0" * 16, model_version="another"), state(None, catalog=False)):
        assert s.probe["status"] == "unknown"
    telemetry = PrometheusTelemetry()
    service = TokenizeService(telemetry)
    service.swap(state("0" * 16))
    assert b"sidserve_probe_mismatch 1.0" in telemetry.exposition()
    service.swap(state(env["probe_hash"]))
    assert b"sidserve_probe_mismatch 0.0" in telemetry.exposition()
