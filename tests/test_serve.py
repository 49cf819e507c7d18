"""The real Serve app (deploy/serve.yaml) on the session's local Ray, over HTTP."""

import copy
import json
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import AUTH, METRICS_PORT, SMALL, deploy_serve, serve_config, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from sidserve import SemanticIdTokenizer, TokenizerConfig
from sidserve.snapshot import ITEMS_SCHEMA, SUMMARY, SnapshotRoot

ROOT = Path(__file__).resolve().parents[1]
MAX_ITEMS = 64


def write_snapshot(root: SnapshotRoot, tok, model_uri: str, table: pa.Table, version: str) -> pa.Table:
    """A snapshot as jobs/assign.py lays it out (ITEMS_SCHEMA), published through LATEST."""
    enc = tok.encode(table)
    seen: Counter = Counter()
    dedup = []
    for s in enc.sid_str:
        dedup.append(seen[s])
        seen[s] += 1
    items = pa.table({
        "item_id": pa.array(enc.item_id.tolist(), pa.string()),
        "sid": pa.array(enc.sid.tolist(), pa.list_(pa.int32())),
        "sid_str": pa.array(enc.sid_str, pa.string()),
        "dedup": pa.array(dedup, pa.int32()),
        "behavior_weights": pa.array(enc.behavior_weights.tolist(), pa.list_(pa.float32())),
        "path": pa.array(enc.path.tolist(), pa.string()),
        "model_version": pa.array([tok.version] * len(enc), pa.string()),
    }, schema=ITEMS_SCHEMA)
    snap = Path(root.path) / "snapshots" / version
    (snap / "items").mkdir(parents=True)
    pq.write_table(items, snap / "items" / "part-0.parquet")
    (snap / SUMMARY).write_text(json.dumps({"version": version, "model": model_uri,
                                            "model_version": tok.version, "items": len(enc)}))
    root.publish(version)
    return items


def item_json(table: pa.Table, i: int, **override) -> dict:
    row = {k: v for k, v in table.slice(i, 1).to_pylist()[0].items() if k == "item_id" or k.endswith("_emb")}
    row.update(override)
    return row


@pytest.fixture(scope="module")
def setup(ray_session, fitted, small_catalog, tmp_path_factory):
    ray = ray_session()

    tmp = tmp_path_factory.mktemp("serve")
    model_a = str(tmp / "model-a")
    fitted.save_pretrained(model_a)
    tok_a = SemanticIdTokenizer.from_pretrained(model_a)
    model_b = str(tmp / "model-b")
    SemanticIdTokenizer(TokenizerConfig(**{**SMALL, "epochs": 1, "seed": 7})).fit(small_catalog) \
        .save_pretrained(model_b)
    tok_b = SemanticIdTokenizer.from_pretrained(model_b)
    assert tok_a.version != tok_b.version
    root = SnapshotRoot(str(tmp / "snapshots"))
    snap_items = write_snapshot(root, tok_a, model_a, small_catalog.slice(0, 1000), "v1")

    config = serve_config(dict(model_uri=model_a, snapshot_root=root.uri, snapshot_poll_s=0.5,
                               max_items_per_request=MAX_ITEMS))
    port = config["http_options"]["port"]
    deploy_serve(config)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30)
    wait_ready(client)
    yield dict(ray=ray, client=client, config=config, deploy=deploy_serve, tok_a=tok_a, tok_b=tok_b,
               model_a=model_a, model_b=model_b, root=root, snap=snap_items, catalog=small_catalog)
    client.close()  # the app stays up: the next deploy replaces it, ray.shutdown() ends it


def test_serve_yaml_is_a_valid_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "sidserve.serving.deployment:app" and app.route_prefix == "/"
    dep = app.deployments[0]
    assert dep.max_ongoing_requests >= dep.user_config["max_batch_size"]  # or batches never fill


def test_known_warm_and_cold_items(setup):
    c, tok, snap, cat = setup["client"], setup["tok_a"], setup["snap"], setup["catalog"]
    known = item_json(cat, 3)
    warm = item_json(cat, 1200)  # not in the snapshot (it holds rows 0..999)
    cold = item_json(cat, 1201, behavior_emb=None, item_id=None)
    absent = item_json(cat, 1202)
    absent.pop("behavior_emb")
    r = c.post("/tokenize", json={"items": [known, warm, cold, absent]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == tok.version
    res = body["results"]
    assert [x["path"] for x in res] == ["catalog", "full", "content_only", "content_only"]
    assert res[0]["sid"] == snap.column("sid")[3].as_py()
    assert res[0]["dedup"] == snap.column("dedup")[3].as_py()
    assert res[0]["item_id"] == known["item_id"] and res[2]["item_id"] is None
    expect = tok.encode(cat.take([1200]))
    assert res[1]["sid"] == expect.sid[0].tolist() and res[1]["dedup"] is None
    assert res[1]["sid_str"] == "-".join(map(str, res[1]["sid"]))
    assert res[1]["behavior_weights"] == expect.behavior_weights[0].tolist()  # batch-invariant: same bits
    n_b = tok.config.num_behavior_experts
    for x in res[2:]:
        assert x["sid"][-n_b:] == [tok.config.missing_code] * n_b and x["behavior_weights"] == [0.0] * n_b

    # recompute: a known item is computed, and (same model) matches its published SID
    r = c.post("/tokenize", json={"items": [known], "recompute": True})
    assert r.json()["results"][0]["path"] == "full"
    assert r.json()["results"][0]["sid"] == res[0]["sid"]


BAD = [
    # (mutation of a good 2-item body, status, substrings the message must contain)
    (lambda b: b["items"][1].update(text_emb=[0.1] * 5), 422, ["items[1].text_emb", "5 values, expected 24"]),
    (lambda b: b["items"][0].pop("image_emb"), 422, ["items[0].image_emb", "missing"]),
    (lambda b: b["items"][1].update(image_emb=None), 422, ["items[1].image_emb", "missing"]),
    (lambda b: b["items"][1].update(behavior_emb=[0.0] * 3), 422, ["items[1].behavior_emb", "expected 12"]),
    (lambda b: b["items"][0].update(colour=[1.0]), 422, ["items[0]", "unknown field 'colour'"]),
    (lambda b: b["items"][1]["text_emb"].__setitem__(2, "abc"), 422, ["items[1].text_emb[2]"]),
    (lambda b: b["items"][0].update(item_id=[1]), 422, ["items[0].item_id"]),
    (lambda b: b.update(items=[]), 422, ["items is empty"]),
    (lambda b: b.update(items=b["items"] * (MAX_ITEMS // 2 + 1)), 413, [f"limit is {MAX_ITEMS}"]),
    (lambda b: b.update(extra_field=1), 422, ["extra_field"]),
    (lambda b: b.pop("items"), 422, ["items", "Field required"]),
]


@pytest.mark.parametrize("mutate,status,needles", BAD, ids=[
    "wrong-dim", "missing-content", "null-content", "behavior-dim", "unknown-field", "not-a-number",
    "item-id-type", "empty", "oversized", "unknown-top-level", "no-items"])
def test_bad_requests_get_4xx_naming_the_field(setup, mutate, status, needles):
    c, cat = setup["client"], setup["catalog"]
    body = {"items": [item_json(cat, 1300), item_json(cat, 1301)]}
    mutate(body)
    r = c.post("/tokenize", json=body)
    assert r.status_code == status, r.text
    text = json.dumps(r.json()["detail"])
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.mark.parametrize("raw,needle", [
    (b'{"items": [', "Invalid JSON"),
    (b'not json at all', "Invalid JSON"),
    (b'', "Invalid JSON"),
    (float("nan"), "items[0].text_emb[3] is nan"),
    (float("inf"), "items[0].text_emb[3] is inf"),
    (float("-inf"), "items[0].text_emb[3] is -inf"),
])
def test_malformed_json_and_nonfinite_values(setup, raw, needle):
    c, cat = setup["client"], setup["catalog"]
    if isinstance(raw, float):  # json.dumps writes NaN / Infinity literals, which FastAPI parses
        body = {"items": [item_json(cat, 1300)]}
        body["items"][0]["text_emb"][3] = raw
        raw = json.dumps(body).encode()
    r = c.post("/tokenize", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert needle in json.dumps(r.json()["detail"]), r.text


def test_the_replica_survives_bad_input(setup):
    c, cat = setup["client"], setup["catalog"]
    for _ in range(3):
        c.post("/tokenize", content=b"\xff\xfe garbage", headers={"Content-Type": "application/json"})
    assert c.get("/readyz").status_code == 200
    assert c.post("/tokenize", json={"items": [item_json(cat, 1400)]}).status_code == 200


def test_auth(setup):
    c, cat = setup["client"], setup["catalog"]
    base = str(c.base_url)
    body = {"items": [item_json(cat, 1)]}
    assert httpx.post(f"{base}/tokenize", json=body).status_code == 401
    r = httpx.post(f"{base}/tokenize", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    assert httpx.get(f"{base}/v1/model").status_code == 401
    assert httpx.get(f"{base}/healthz").status_code == 200  # probes stay open
    assert httpx.get(f"{base}/readyz").status_code == 200


def test_tokenize_route_is_documented_and_served_by_the_plain_asgi_endpoint():
    """FastAPI documents POST /tokenize while requests go to TokenizeEndpoint directly
    (app.py sets route.app); if FastAPI stopped honouring that, this says so."""
    from fastapi.responses import PlainTextResponse
    from fastapi.testclient import TestClient

    from sidserve.serving.app import TokenizeEndpoint, make_app

    app = make_app(lambda: None)
    (route,) = [r for r in app.routes if getattr(r, "path", None) == "/tokenize"]
    assert isinstance(route.app, TokenizeEndpoint) and route.methods == {"POST"}
    assert "post" in app.openapi()["paths"]["/tokenize"]
    seen = []

    async def recorder(scope, receive, send):  # stands in for the endpoint: is it called?
        seen.append(scope["path"])
        await PlainTextResponse("recorded")(scope, receive, send)

    route.app = recorder
    app.user_middleware.clear()  # the metrics middleware needs a service; not under test here
    app.middleware_stack = None
    r = TestClient(app).post("/tokenize", content=b"{}")
    assert (r.status_code, r.text, seen) == (200, "recorded", ["/tokenize"])


def test_model_info_and_docs(setup):
    c, tok = setup["client"], setup["tok_a"]
    info = c.get("/v1/model").json()
    assert info["model_version"] == tok.version
    assert info["sid_layout"] == tok.sid_layout and info["codebook_size"] == tok.codebook_size
    assert info["inputs"]["content"] == {"text_emb": 24, "image_emb": 16}
    assert info["snapshot"]["version"] == "v1" and info["snapshot"]["catalog_lookup"] is True
    # this snapshot (written by hand, like one from before issue 49.3) records no environment:
    # the replica cannot compare and says so
    assert info["probe"]["status"] == "unknown" and info["probe"]["replica"]["probe_hash"]
    assert c.get("/docs").status_code == 200
    spec = c.get("/openapi.json").json()
    body = spec["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/TokenizeRequest"
    assert {"TokenizeRequest", "TokenizeItem", "TokenizeResponse"} <= set(spec["components"]["schemas"])


def test_concurrent_requests_share_model_calls(setup):
    c, cat = setup["client"], setup["catalog"]
    before = batch_histogram()
    bodies = [{"items": [item_json(cat, 1100 + i, item_id=f"new-{i}")]} for i in range(48)]
    errors = []
    timings = []

    def send(b):
        r = httpx.post(f"{c.base_url}/tokenize", json=b, headers=AUTH, timeout=30)
        if r.status_code != 200:
            errors.append(r.text)
        else:
            timings.append(r.headers["server-timing"])

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # through @serve.batch too, each response says where its time went (issue 49.2)
    stages = [dict((p.strip().split(";dur=")[0], float(p.split(";dur=")[1])) for p in t.split(",")) for t in timings]
    assert all({"read", "parse", "queue", "model", "respond", "app"} <= set(st) for st in stages), timings[:3]
    assert all(st["model"] > 0 and st["app"] >= st["model"] for st in stages)
    # 48 one-item requests: some model calls must have carried more than one item (read
    # from the buckets: Ray's exported histogram _sum is not exact), so fewer model calls than
    # requests. Both counts are compared over the same window: Ray exports every 10 s, so
    # ``before`` may miss an earlier test's last requests, which then land in both counts
    deadline = time.time() + 60
    while time.time() < deadline:
        after = batch_histogram()
        calls = after["count"] - before["count"]
        single = after["le1"] - before["le1"]
        requests = requests_ok() - before["requests"]
        if calls > 0 and requests >= 48 and calls - single > 0 and calls < requests:
            break
        time.sleep(1)
    assert calls - single > 0 and calls < requests, (calls, single, requests)


def scrape_ray() -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = out.get(key, 0.0) + s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == v2 for k, v2 in labels.items()))


def requests_ok() -> float:
    return metric(scrape_ray(), "ray_sidserve_requests_total", route="/tokenize", status="200")


def batch_histogram() -> dict:
    s = scrape_ray()
    return {"count": metric(s, "ray_sidserve_batch_size_items_count"),
            "le1": metric(s, "ray_sidserve_batch_size_items_bucket", le="1.0"),
            "requests": metric(s, "ray_sidserve_requests_total", route="/tokenize", status="200")}


def test_metrics_on_rays_prometheus_endpoint(setup):
    c, cat = setup["client"], setup["catalog"]
    c.post("/tokenize", json={"items": [item_json(cat, 5), item_json(cat, 1500 - 1, behavior_emb=None)]})
    c.post("/tokenize", json={"items": []})
    deadline = time.time() + 60  # Ray exports every 10 s
    while True:
        s = scrape_ray()
        checks = {
            "requests 200": metric(s, "ray_sidserve_requests_total", route="/tokenize", status="200") > 0,
            "requests 422": metric(s, "ray_sidserve_requests_total", route="/tokenize", status="422") > 0,
            "catalog items": metric(s, "ray_sidserve_items_total", path="catalog") > 0,
            "cold items": metric(s, "ray_sidserve_items_total", path="content_only") > 0,
            "latency": metric(s, "ray_sidserve_request_latency_ms_count", route="/tokenize") > 0,
            "model info": metric(s, "ray_sidserve_model_info", model_version=setup["tok_a"].version) >= 1,
            "replica healthy (Ray)": metric(s, "ray_serve_deployment_replica_healthy") > 0,
        }
        if all(checks.values()) or time.time() > deadline:
            break
        time.sleep(1)
    assert all(checks.values()), (checks, sorted({n for n, _ in s if "sidserve" in n or "healthy" in n}))


def test_hot_swap_under_load(setup):
    """Model A -> B by user_config, then a snapshot made by B through LATEST, while
    clients keep sending: no request fails, and each response is consistent."""
    c, cat, tok_a, tok_b = setup["client"], setup["catalog"], setup["tok_a"], setup["tok_b"]
    known = item_json(cat, 7)
    new = item_json(cat, 1450, item_id="fresh")
    stop = threading.Event()
    failures, seen = [], []

    def hammer():
        with httpx.Client(base_url=str(c.base_url), headers=AUTH, timeout=30) as cl:
            while not stop.is_set():
                try:
                    r = cl.post("/tokenize", json={"items": [known, new]})
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                seen.append((body["model_version"], body["results"][0]["path"], body["results"][1]["sid"]))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        cfg = copy.deepcopy(setup["config"])
        cfg["applications"][0]["deployments"][0]["user_config"]["model_uri"] = setup["model_b"]
        setup["deploy"](cfg)
        wait_for(lambda: c.get("/readyz").json()["model_version"] == tok_b.version)
        # model B with A's snapshot: lookups are off, the known item is computed
        assert c.get("/v1/model").json()["snapshot"]["catalog_lookup"] is False
        time.sleep(1.0)
        write_snapshot(setup["root"], tok_b, setup["model_b"], cat.slice(0, 1000), "v2")
        wait_for(lambda: c.get("/readyz").json()["snapshot_version"] == "v2")
        assert c.get("/readyz").json()["catalog_lookup"] is True
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        setup["deploy"](setup["config"])  # back to model A for other tests
    assert not failures, failures[:5]
    versions = [v for v, _, _ in seen]
    assert versions[0] == tok_a.version and versions[-1] == tok_b.version
    sid_b = tok_b.encode(cat.take([1450])).sid[0].tolist()
    sid_a = tok_a.encode(cat.take([1450])).sid[0].tolist()
    assert sid_a != sid_b  # else the check below could not tell the models apart
    for version, _, sid in seen:  # every response computed with the model it names
        assert sid == (sid_a if version == tok_a.version else sid_b)
    assert ("catalog" in {p for v, p, _ in seen if v == tok_b.version}
            and "full" in {p for v, p, _ in seen if v == tok_b.version})


def wait_for(cond, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")
