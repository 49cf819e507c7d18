"""The whole story on one machine (``make demo``): fit with Ray Train, assign with Ray Data,
serve with Ray Serve, and ask ``POST /tokenize`` for a known, a new warm and a cold item.

Everything runs on one local Ray cluster, one stage at a time (Train, Data and Serve
never hold the CPUs at once), on the synthetic demo catalog.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass

SERVE_FLAGS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Ray Data's Parquet reader (DataSource V2, Ray 2.60's default) starts 32 footer-reading actors
# for every read, sized for thousands of files on object storage; the demo's catalog is one
# local file, read twice (train's pre-pass, then its epoch). Two actors: the demo's 2,000-item
# run (2 CPUs, docs/testing.md) 80 -> 59 s, its pre-pass 10.7 -> 6.1 s. Read by Ray's workers:
# set before Ray starts; a value the user set wins.
DATA_FLAGS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


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


@contextlib.contextmanager
def output_to(path: str):
    """Send everything this process and its children write to stdout / stderr (Ray's log lines,
    progress bars, worker output) to ``path`` for the block; yields a stream to the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_file = open(path, "ab")
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log_file.close()
        terminal.close()


def pick_items(catalog) -> dict[str, int]:
    """Rows of the demo's three questions: a warm item from the catalog's top popularity decile
    (the one at the decile's median), the thinnest warm item (fewest interactions) and a cold one."""
    import numpy as np

    pop = catalog.column("popularity").to_numpy()
    warm = np.flatnonzero(catalog.column("behavior_emb").is_valid().to_numpy(zero_copy_only=False))
    cold = np.flatnonzero(~catalog.column("behavior_emb").is_valid().to_numpy(zero_copy_only=False))
    if warm.size == 0 or cold.size == 0:
        raise ValueError("the demo catalog needs warm and cold items")
    by_pop = warm[np.argsort(pop[warm], kind="stable")]
    top = by_pop[int(np.floor(0.9 * by_pop.size)):]  # the top popularity decile of warm items
    return {"popular": int(top[top.size // 2]), "thin": int(by_pop[0]), "cold": int(cold[0])}


def run_demo(cfg: DemoConfig) -> dict:
    out = os.path.abspath(cfg.output)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "demo.log")
    print(f"[demo] Ray's own log lines go to {log_path}")
    with output_to(log_path) as terminal:
        return _run(cfg, out, lambda line: print(line, file=terminal))


def _run(cfg: DemoConfig, out: str, say) -> dict:
    for k, v in {**SERVE_FLAGS, **DATA_FLAGS}.items():  # read by Ray's processes: set before Ray starts
        os.environ.setdefault(k, v)
    import pyarrow.parquet as pq
    import ray
    from ray.data import DataContext

    from sidserve.jobs.assign import AssignJobConfig, run_assignment
    from sidserve.jobs.train import TrainJobConfig, fit_distributed
    from sidserve.synthetic import make_synthetic_catalog
    from sidserve.tokenizers.adc_sid.config import TokenizerConfig

    paths = {k: os.path.join(out, k) for k in ("catalog", "model", "checkpoints", "snapshots")}
    t0 = time.perf_counter()
    os.makedirs(paths["catalog"], exist_ok=True)
    catalog = make_synthetic_catalog(cfg.items, seed=0).drop_columns(["cluster"])
    pq.write_table(catalog, os.path.join(paths["catalog"], "part-0.parquet"))
    cold = catalog.column("behavior_emb").null_count
    say(f"[demo] catalog: {cfg.items} synthetic items ({cold} cold) -> {paths['catalog']}")

    ray.init(include_dashboard=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    try:
        say("[demo] 1/3 fit on Ray Train ...")
        _, version, metrics = fit_distributed(TrainJobConfig(
            output=paths["model"], items=paths["catalog"], tokenizer=TokenizerConfig(epochs=cfg.epochs),
            num_workers=cfg.num_workers, storage_path=paths["checkpoints"], overwrite=True))
        final = metrics["final"]
        say(f"[demo]     model {version} -> {paths['model']} (entropy {final['entropy_mean']:.3f}, "
            f"utilisation {final['utilisation_mean']:.3f}, collision rate {final['collision_rate']:.4f})")

        say("[demo] 2/3 assign SIDs with Ray Data ...")
        summary = run_assignment(AssignJobConfig(items=paths["catalog"], model=paths["model"],
                                                 output=paths["snapshots"], num_workers=cfg.num_workers))
        say(f"[demo]     snapshot {summary['version']} -> {paths['snapshots']}/snapshots/{summary['version']} "
            f"({summary['items']} items, {summary['rejects']} rejects, collision rate "
            f"{summary['collision_rate']:.4f})")

        say("[demo] 3/3 serve deploy/serve.yaml on Ray Serve ...")
        _deploy(cfg.port, {"model_uri": paths["model"], "snapshot_root": paths["snapshots"]})
        url = f"http://127.0.0.1:{cfg.port}"
        rows = {k: catalog.slice(i, 1).to_pylist()[0] for k, i in pick_items(catalog).items()}
        pop = {k: r["popularity"] for k, r in rows.items()}
        known = {k: v for k, v in rows["popular"].items() if k == "item_id" or k.endswith("_emb")}
        thin = {**{k: v for k, v in rows["thin"].items() if k.endswith("_emb")}, "item_id": "new-thin-item"}
        cold_item = {**{k: v for k, v in rows["cold"].items() if k.endswith("_emb")}, "item_id": "new-cold-item"}
        response = _post(f"{url}/tokenize", {"items": [known, thin, cold_item]})
        say(f"[demo]     POST {url}/tokenize (model {response['model_version']}):")
        what = [f"catalog item, {pop['popular']} interactions (top decile)",
                f"new item, {pop['thin']} interaction(s)", "new item, cold (no behavior)"]
        for r, w in zip(response["results"], what):
            say(f"[demo]       {r['item_id']:<14} path={r['path']:<12} sid={r['sid_str']:<22} "
                f"behavior_weights={[round(x, 3) for x in r['behavior_weights']]}  <- {w}")
        say("[demo]     behavior_weights: how much each behavioral SID position counts for the item (R(e_b)); "
            "0 where its behavior is too thin to trust, all 0 for a cold item")
        say(f"[demo] done in {time.perf_counter() - t0:.0f} s. Outputs: model {paths['model']}, snapshots "
            f"{paths['snapshots']}, checkpoints {paths['checkpoints']}, catalog {paths['catalog']}")
        if cfg.keep_serving:
            say(f"[demo] serving at {url} (docs at {url}/docs); Ctrl-C stops it")
            while True:
                time.sleep(3600)
        return {"model_version": version, "snapshot": summary["version"], "response": response,
                "popularity": pop}
    finally:
        # ray.shutdown() ends Serve with the cluster; serve.shutdown() first would add about
        # 30 s with the HAProxy ingress (Ray 2.60)
        ray.shutdown()
