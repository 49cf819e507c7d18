"""The whole story on one machine (``make demo``): fit with Ray Train, assign with Ray Data,
serve with Ray Serve, and ask ``POST /tokenize`` for a known, a new warm and a cold item.

Everything runs on one local Ray cluster, one stage at a time (Train, Data and Serve
never hold the CPUs at once), on the synthetic demo catalog.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass

SERVE_FLAGS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


@dataclass
class DemoConfig:
    output: str = "outputs"  # everything goes under here
    items: int = 20000  # synthetic catalog size
    epochs: int = 10  # training epochs (the acceptance test uses 20; 10 is enough to see it work)
    num_workers: int = 2  # Ray Train workers and encoder actors
    port: int = 8000  # where the service listens while the demo runs
    keep_serving: bool = False  # leave the service up (Ctrl-C ends it)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def serve_config_text() -> str:
    """deploy/serve.yaml, as the package carries it (sidserve/serving/serve.yaml; deploy/serve.yaml
    links to it), so `sidserve demo` works from an installed wheel too."""
    from importlib.resources import files

    return files("sidserve.serving").joinpath("serve.yaml").read_text()


def _deploy(port: int, user_config: dict) -> None:
    """deploy/serve.yaml as shipped (one replica on a demo machine) with the demo's model."""
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(serve_config_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    dep = config["applications"][0]["deployments"][0]
    dep["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    dep["user_config"].update(user_config)
    serve.start(http_options=config["http_options"])
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def run_demo(cfg: DemoConfig) -> dict:
    for k, v in SERVE_FLAGS.items():  # read by Serve's processes: set before Ray starts
        os.environ.setdefault(k, v)
    import pyarrow.parquet as pq
    import ray

    from sidserve.config import TokenizerConfig
    from sidserve.jobs.assign import AssignJobConfig, run_assignment
    from sidserve.jobs.train import TrainJobConfig, fit_distributed
    from sidserve.synthetic import make_synthetic_catalog

    out = os.path.abspath(cfg.output)
    paths = {k: os.path.join(out, k) for k in ("catalog", "model", "checkpoints", "snapshots")}
    t0 = time.perf_counter()
    os.makedirs(paths["catalog"], exist_ok=True)
    catalog = make_synthetic_catalog(cfg.items, seed=0).drop_columns(["cluster"])
    pq.write_table(catalog, os.path.join(paths["catalog"], "part-0.parquet"))
    cold = sum(v is None for v in catalog.column("behavior_emb").to_pylist())
    print(f"[demo] catalog: {cfg.items} synthetic items ({cold} cold) -> {paths['catalog']}")

    ray.init(include_dashboard=False, configure_logging=False)
    try:
        print("[demo] 1/3 fit on Ray Train ...")
        _, version, metrics = fit_distributed(TrainJobConfig(
            output=paths["model"], items=paths["catalog"], tokenizer=TokenizerConfig(epochs=cfg.epochs),
            num_workers=cfg.num_workers, storage_path=paths["checkpoints"], overwrite=True))
        final = metrics["final"]
        print(f"[demo]     model {version} -> {paths['model']} (entropy {final['entropy_mean']:.3f}, "
              f"utilisation {final['utilisation_mean']:.3f}, collision rate {final['collision_rate']:.4f})")

        print("[demo] 2/3 assign SIDs with Ray Data ...")
        summary = run_assignment(AssignJobConfig(items=paths["catalog"], model=paths["model"],
                                                 output=paths["snapshots"], num_workers=cfg.num_workers))
        print(f"[demo]     snapshot {summary['version']} -> {paths['snapshots']}/snapshots/{summary['version']} "
              f"({summary['items']} items, {summary['rejects']} rejects, collision rate "
              f"{summary['collision_rate']:.4f})")

        print("[demo] 3/3 serve deploy/serve.yaml on Ray Serve ...")
        _deploy(cfg.port, {"model_uri": paths["model"], "snapshot_root": paths["snapshots"]})
        url = f"http://127.0.0.1:{cfg.port}"
        rows = catalog.slice(0, 3).to_pylist()
        known = {k: v for k, v in rows[0].items() if k == "item_id" or k.endswith("_emb")}
        warm = {**{k: v for k, v in rows[1].items() if k.endswith("_emb")}, "item_id": "new-item-1"}
        cold_item = {**{k: v for k, v in rows[2].items() if k.endswith("_emb")}, "item_id": "new-item-2",
                     "behavior_emb": None}
        if warm.get("behavior_emb") is None:  # synthetic row 1 happened to be cold: borrow a vector
            warm["behavior_emb"] = next(r for r in catalog.column("behavior_emb").to_pylist() if r is not None)
        response = _post(f"{url}/tokenize", {"items": [known, warm, cold_item]})
        print(f"[demo]     POST {url}/tokenize (model {response['model_version']}):")
        for r in response["results"]:
            print(f"[demo]       {r['item_id']:<14} path={r['path']:<12} sid={r['sid_str']:<22} dedup={r['dedup']} "
                  f"behavior_weights={[round(w, 3) for w in r['behavior_weights']]}")
        print(f"[demo] done in {time.perf_counter() - t0:.0f} s. Outputs: model {paths['model']}, snapshots "
              f"{paths['snapshots']}, checkpoints {paths['checkpoints']}, catalog {paths['catalog']}")
        if cfg.keep_serving:
            print(f"[demo] serving at {url} (docs at {url}/docs); Ctrl-C stops it")
            while True:
                time.sleep(3600)
        return {"model_version": version, "snapshot": summary["version"], "response": response}
    finally:
        # ray.shutdown() ends Serve with the cluster; serve.shutdown() first would add about
        # 30 s with the HAProxy ingress (Ray 2.60)
        ray.shutdown()
