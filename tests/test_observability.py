"""The Grafana dashboard and alert rules, proven against a real Prometheus that scrapes
the session's Ray (a running Serve app with traffic) and a Pushgateway (a real refresh run)."""

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import (
    AUTH,
    METRICS_PORT,
    daemon,
    deploy_serve,
    free_port,
    serve_config,
    wait_ready,
)
from test_serve import item_json

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "sidserve.json"
PROM_DIR = ROOT / "deploy" / "prometheus"


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    return out


def test_dashboard_shape():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39 and dash["uid"] == "sidserve"
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${" + var["name"] + "}", p["title"]
            assert p["targets"], p["title"]


def test_promtool_accepts_rules_and_config():
    for args in (["check", "rules", str(PROM_DIR / "alerts.yml")], ["check", "config", str(PROM_DIR / "prometheus.yml")]):
        proc = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_replica_alerts_fire_on_simulated_time():
    """SidserveReplicaStuck (a replica whose last load failed, 15 min) and SidserveSnapshotStale
    (a served snapshot older than 26 h), by Prometheus's own rule evaluator on the series a
    replica exports (tests/data/prometheus/alerts_test.yml: when each fires, and when not yet)."""
    cases = Path(__file__).resolve().parent / "data" / "prometheus" / "alerts_test.yml"
    proc = subprocess.run(["promtool", "test", "rules", str(cases)], capture_output=True, text=True)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def stack(ray_session, refreshed, small_catalog, pushgateway, tmp_path_factory):
    ray_session()
    tmp = tmp_path_factory.mktemp("observability")
    model, snap = refreshed["model"], refreshed["snap"]  # a real refresh pushed its metrics
    addr, _ = pushgateway

    # Prometheus with the shipped config: same jobs and rule file, this session's targets
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    jobs["ray"].pop("file_sd_configs")
    jobs["ray"]["static_configs"] = [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]
    jobs["pushgateway"]["static_configs"] = [{"targets": [addr]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_port = free_port()
    prom_url = f"http://127.0.0.1:{prom_port}"
    binary = shutil.which("prometheus") or "prometheus"
    with daemon([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"], f"{prom_url}/-/ready", "Prometheus"):
        config = serve_config({"model_uri": model, "snapshot_root": snap})
        port = config["http_options"]["port"]
        deploy_serve(config)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30)
        wait_ready(client)
        try:
            yield dict(prom=prom_url, client=client, catalog=small_catalog)
        finally:
            client.close()  # the app stays up (see conftest.SERVE_MODULES)


def send_traffic(client, catalog, seconds: float) -> None:
    """Known, warm and cold items, concurrent requests (batches) and a 4xx, for ``seconds``."""
    import concurrent.futures

    end = time.time() + seconds
    bodies = [{"items": [item_json(catalog, i)]} for i in range(5)]  # in the snapshot
    bodies += [{"items": [item_json(catalog, 700 + i, item_id=f"new-{i}")]} for i in range(5)]
    bodies += [{"items": [item_json(catalog, 800 + i, item_id=None, behavior_emb=None)]} for i in range(5)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while time.time() < end:
            list(pool.map(lambda b: client.post("/tokenize", json=b), bodies))
            client.post("/tokenize", json={"items": []})


def query(prom: str, expr: str) -> list:
    expr = expr.replace("$__rate_interval", "1m")
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.timeout(600)
def test_every_dashboard_panel_returns_data(stack):
    prom, client, catalog = stack["prom"], stack["client"], stack["catalog"]
    queries = panel_queries()
    assert len(queries) >= 15
    deadline = time.time() + 150  # Ray's agent exports every 10 s; rates need two samples
    while True:
        send_traffic(client, catalog, 5)
        empty = [name for name, expr in queries if not query(prom, expr)]
        if not empty or time.time() > deadline:
            break
    assert not empty, f"panels without data: {empty}"


def test_alert_rules_load_and_evaluate(stack):
    body = json.loads(urllib.request.urlopen(f"{stack['prom']}/api/v1/rules", timeout=10).read())
    rules = [r for g in body["data"]["groups"] for r in g["rules"]]
    names = {r["name"] for r in rules}
    assert {"SidserveRefreshStale", "SidserveErrorRatio", "SidserveLatencyP99High", "SidserveChurnHigh",
            "SidserveReplicaStuck", "SidserveSnapshotStale"} <= names
    time.sleep(3)  # a few evaluation rounds at 1 s
    body = json.loads(urllib.request.urlopen(f"{stack['prom']}/api/v1/rules", timeout=10).read())
    for r in (r for g in body["data"]["groups"] for r in g["rules"]):
        assert r["health"] == "ok", (r["name"], r.get("lastError"))
    # a fresh refresh and a healthy service: nothing of ours should be firing
    firing = [a["labels"]["alertname"] for a in
              json.loads(urllib.request.urlopen(f"{stack['prom']}/api/v1/alerts", timeout=10).read())["data"]["alerts"]
              if a["state"] == "firing"]
    assert not firing, firing


def test_churn_alert_reads_the_ceiling_the_refresh_pushed(stack, refreshed, pushgateway):
    """SidserveChurnHigh compares the pushed churn with the pushed --churn-alert ceiling."""
    from sidserve.jobs.refresh import push_success

    addr, _ = pushgateway

    def firing() -> set[str]:
        alerts = json.loads(urllib.request.urlopen(f"{stack['prom']}/api/v1/alerts", timeout=10).read())
        return {a["labels"]["alertname"] for a in alerts["data"]["alerts"] if a["state"] == "firing"}

    def wait_for(predicate, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(firing()):
                return True
            time.sleep(0.5)
        return False

    summary = dict(refreshed["summary"])
    try:
        push_success(addr, {**summary, "churn": {**summary["churn"], "churn": 0.1}, "churn_ceiling": 0.05})
        assert wait_for(lambda names: "SidserveChurnHigh" in names)
        push_success(addr, {**summary, "churn": {**summary["churn"], "churn": 0.1}, "churn_ceiling": 0.5})
        assert wait_for(lambda names: "SidserveChurnHigh" not in names)
    finally:
        push_success(addr, summary)  # the refresh's own metrics back for the other tests
