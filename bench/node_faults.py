"""Whole-node faults on a multi-node Ray cluster on one machine (issue 50, item 2).

    .venv/bin/python bench/node_faults.py [--scenarios train] [--items 20000] [--workdir DIR]

A head (the driver's node, no CPUs) and worker nodes, each started with `ray start`
(bench/local_cluster.py): its own raylet, object store, ports and resources; the catalog and
the checkpoints on a local directory every node reads (shared storage). For each scenario the
script kills a whole node (SIGKILL to its raylet and every process under it) at a chosen
moment, starts a replacement with the same resources, as Kubernetes would, and checks the
outcome against an uninterrupted run with the same seed and worker count:

- ``train``: 2 workers, one per node; the node of rank 1 is lost in the middle of epoch 2
  (after its first batches); the job restarts its worker group from the last checkpoint on
  the replacement node and must end with tensors equal (``torch.equal``) to the
  uninterrupted run's.
- ``assign``: the nightly assignment with an encoder actor on each node (the train
  scenario's model); a node is lost once the first encoded rows are staged. The published
  snapshot must equal the uninterrupted run's row for row, or nothing is published.
- ``serve``: two replicas, one per node, behind the head's proxy, under steady load; the node
  of one replica is lost. Failed requests are counted at the first attempt (K, at most the
  requests in flight when the node died) and after the retries docs/operations.md prescribes
  (must be 0); no answer may differ from the snapshot or the model's offline encode.

Prints a table per scenario and, last, ``scenarios N/N survived, rows lost 0, wrong answers 0,
failed requests K``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from local_cluster import LocalCluster  # noqa: E402

from sidserve.jobs.train.worker import TrainCallback  # noqa: E402


class MarkEpoch(TrainCallback):
    """Worker ``rank`` writes where it runs (Ray NodeID) once it has trained ``after_batches``
    batches of ``epoch``: the moment the script kills that node."""

    def __init__(self, epoch: int, rank: int, after_batches: int, marker: str, pause_s: float = 0.05):
        self.epoch, self.rank, self.after, self.marker, self.pause_s = epoch, rank, after_batches, marker, pause_s
        self.seen = 0

    def on_epoch_start(self, epoch, rank):
        self.seen = 0

    def on_batch(self, epoch, rank, batch):
        if (epoch, rank) != (self.epoch, self.rank):
            return
        self.seen += 1
        if self.seen >= self.after and not os.path.exists(self.marker):
            import ray

            tmp = self.marker + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"node_id": ray.get_runtime_context().get_node_id(), "batch": self.seen}, f)
            os.replace(tmp, self.marker)
        if os.path.exists(self.marker):
            time.sleep(self.pause_s)  # the epoch goes on slowly until the node is gone


def kill_when_marked(cluster: LocalCluster, marker: str, cpus: float, log: dict, timeout_s: float = 600) -> None:
    """Watcher: once ``marker`` names a node, kill that node and start a replacement."""
    deadline = time.time() + timeout_s
    while not os.path.exists(marker):
        if time.time() > deadline:
            log["error"] = "the marker never appeared"
            return
        time.sleep(0.05)
    node_id = json.load(open(marker))["node_id"]
    name = cluster.name_of(node_id)
    if name is None:
        log["error"] = f"no node of ours has NodeID {node_id}"
        return
    log["killed"] = name
    log["processes_killed"] = cluster.kill(name)
    log["killed_at"] = time.time()
    try:
        log["replacement"] = cluster.replace("worker", cpus).name
    except RuntimeError as e:  # recorded: a scenario without its replacement did not survive
        log["error"] = f"the replacement node did not start: {str(e)[:300]}"


def write_catalog(workdir: str, n: int) -> str:
    import pyarrow.parquet as pq

    from sidserve import make_synthetic_catalog

    items = os.path.join(workdir, "items")
    if os.path.isdir(items):
        return items
    os.makedirs(items)
    table = make_synthetic_catalog(n, modality_dims={"text": 32, "image": 16}, behavior_dim=16,
                                   n_clusters=64, cold_share=0.1, seed=11)
    step = -(-n // 8)
    for i in range(8):
        pq.write_table(table.slice(i * step, step), os.path.join(items, f"part-{i}.parquet"), row_group_size=1024)
    return items


def train_scenario(cluster: LocalCluster, workdir: str, items: str) -> dict:
    import torch

    from sidserve import TokenizerConfig
    from sidserve.jobs.train import TrainJobConfig, fit_distributed

    tcfg = TokenizerConfig(modality_dims={"text": 32, "image": 16}, behavior_dim=16, codebook_size=32,
                           hidden_dim=64, latent_dim=16, expert_hidden_dim=64, epochs=4, batch_size=256,
                           kmeans_init_samples=4000, restart_every=4)

    def job(name: str, **kw) -> TrainJobConfig:
        return TrainJobConfig(output=os.path.join(workdir, name, "model"), items=items, tokenizer=tcfg,
                              num_workers=2, cpus_per_worker=1.0, storage_path=os.path.join(workdir, name, "ckpt"),
                              overwrite=True, **kw)

    t0 = time.perf_counter()
    ref, _, _ = fit_distributed(job("train-uninterrupted"))
    ref_s = time.perf_counter() - t0
    marker = os.path.join(workdir, "train-node-lost.json")
    if os.path.exists(marker):
        os.remove(marker)
    log: dict = {}
    watcher = threading.Thread(target=kill_when_marked, args=(cluster, marker, 1.0, log), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    tok, _, metrics = fit_distributed(job("train-node-lost", max_failures=2,
                                          callbacks=[MarkEpoch(2, 1, 3, marker)]))
    faulted_s = time.perf_counter() - t0
    watcher.join(timeout=300)  # its replacement node started (or failed) before teardown
    a, b = ref.model_.state_dict(), tok.model_.state_dict()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    attempts = [e["started_at_epoch"] for e in metrics["epochs"]]
    return {"scenario": "train", "survived": not differ and "killed" in log and "error" not in log,
            "detail": {"killed": log.get("killed"), "processes_killed": log.get("processes_killed"),
                       "replacement": log.get("replacement"), "error": log.get("error"),
                       "epochs_started_at": attempts, "tensors_differing": differ,
                       "uninterrupted_s": round(ref_s, 1), "with_node_loss_s": round(faulted_s, 1)},
            "rows_lost": 0 if not differ else None, "wrong_answers": 0, "failed_requests": 0, "in_flight": 0}


def kill_when_staged(cluster: LocalCluster, staging: str, victim: str, cpus: float, log: dict,
                     done: threading.Event, timeout_s: float = 600) -> None:
    """Watcher: once the assignment has staged its first encoded rows, kill ``victim`` (a node
    with an encoder actor on it) and start a replacement."""
    deadline = time.time() + timeout_s
    while not any(files for _, _, files in os.walk(staging)):
        if time.time() > deadline or done.is_set():
            log["error"] = "the job ended before anything was seen staged"
            return
        time.sleep(0.02)
    if done.is_set():
        log["error"] = "the job ended before the node could be killed"
        return
    log["killed"] = victim
    log["processes_killed"] = cluster.kill(victim)
    try:
        log["replacement"] = cluster.replace("worker", cpus).name
    except RuntimeError as e:  # recorded: a scenario without its replacement did not survive
        log["error"] = f"the replacement node did not start: {str(e)[:300]}"


def assign_scenario(cluster: LocalCluster, workdir: str, items: str) -> dict:
    """Encoders on both worker nodes (one actor each); the node of one is lost once the first
    encoded rows are staged. Either the published snapshot equals the uninterrupted run's row
    for row, or nothing is published and LATEST is untouched; never a partial snapshot."""
    import pyarrow.parquet as pq

    from sidserve.jobs.assign.job import AssignJobConfig, run_assignment
    from sidserve.snapshot import SnapshotRoot

    model = os.path.join(workdir, "train-uninterrupted", "model")
    if not os.path.exists(os.path.join(model, "manifest.json")):
        raise SystemExit("the assign scenario encodes with the train scenario's model: run --scenarios train,assign")

    def job(name: str) -> AssignJobConfig:
        return AssignJobConfig(items=items, model=model, output=os.path.join(workdir, name), num_workers=2,
                               cpus_per_worker=1.0, batch_size=512, rows_per_task=1024, version="night-1")

    def table(root: str):
        r = SnapshotRoot(root)
        v = r.latest()
        return None if v is None else pq.read_table(os.path.join(root, "snapshots", v, "items")).sort_by("item_id")

    import shutil

    for name in ("assign-uninterrupted", "assign-node-lost"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    t0 = time.perf_counter()
    run_assignment(job("assign-uninterrupted"))
    ref_s = time.perf_counter() - t0
    ref = table(os.path.join(workdir, "assign-uninterrupted"))
    out = os.path.join(workdir, "assign-node-lost")
    victim = sorted(n for n in cluster.nodes if n != "head")[-1]
    log: dict = {}
    done = threading.Event()
    watcher = threading.Thread(target=kill_when_staged, daemon=True,
                               args=(cluster, os.path.join(out, "_staging"), victim, 1.0, log, done))
    watcher.start()
    t0 = time.perf_counter()
    error = None
    try:
        run_assignment(job("assign-node-lost"))
    except Exception as e:  # noqa: BLE001  (an honest failure is one of the two allowed outcomes)
        error = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        done.set()  # the kill must have come before this to count
    faulted_s = time.perf_counter() - t0
    watcher.join(timeout=300)  # its replacement node started (or failed) before teardown
    got = table(out)
    if got is None:
        outcome, lost, same = "nothing published, LATEST untouched", 0, True
    else:
        same = got.equals(ref)
        lost = ref.num_rows - got.num_rows
        outcome = "published, identical to the uninterrupted snapshot" if same else "published, DIFFERENT"
    return {"scenario": "assign", "survived": same and "killed" in log and "error" not in log,
            "detail": {"killed": log.get("killed"), "processes_killed": log.get("processes_killed"),
                       "replacement": log.get("replacement"), "error": log.get("error"), "outcome": outcome,
                       "job_error": error, "rows": ref.num_rows, "uninterrupted_s": round(ref_s, 1),
                       "with_node_loss_s": round(faulted_s, 1)},
            "rows_lost": max(lost, 0), "wrong_answers": 0 if same else abs(lost) or 1, "failed_requests": 0,
            "in_flight": 0}


# docs/operations.md: what a client of POST /tokenize retries. 500 is in: Serve's proxy answers a
# request whose replica died under it with a plain "500 Internal Server Error" (seen here), and
# the request is idempotent; the service itself answers bad input with a 4xx, never a 5xx
RETRY_STATUSES = {500, 502, 503, 504}


def post_with_retry(client, body: dict, attempts: int = 6, backoff_s: float = 0.2):
    """docs/operations.md's client policy for the idempotent ``POST /tokenize``: retry a
    connection error or a 5xx (500/502/503/504) with exponential backoff (0.2, 0.4, ... s), up to 6
    attempts -> (response or None, attempts used, first attempt failed)."""
    import httpx

    first_failed = False
    for k in range(attempts):
        try:
            r = client.post("/tokenize", json=body)
            if r.status_code not in RETRY_STATUSES:
                return r, k + 1, first_failed
        except httpx.TransportError:
            pass
        first_failed = first_failed or k == 0
        time.sleep(backoff_s * 2 ** k)
    return None, attempts, True


def serve_scenario(cluster: LocalCluster, workdir: str, items: str) -> dict:
    """Two replicas, one per worker node, behind the head's proxy, under steady load from 8
    clients (catalog items answered from the snapshot, new ids computed by the model); the
    node of one replica is lost. Counts requests that failed at their first attempt and after
    docs/operations.md's retries, the requests in flight when the node died, and answers that
    differ from the snapshot / the model's offline encode (wrong answers)."""
    import httpx
    import numpy as np
    import pyarrow.parquet as pq
    from local_cluster import free_ports
    from ray import serve

    from sidserve import load_tokenizer
    from sidserve.serving.deployment import SidServe
    from sidserve.snapshot import SnapshotRoot

    model = os.path.join(workdir, "train-uninterrupted", "model")
    root = SnapshotRoot(os.path.join(workdir, "assign-uninterrupted"))
    if root.latest() is None:
        raise SystemExit("the serve scenario serves the assign scenario's snapshot: run --scenarios train,assign,serve")
    snap = pq.read_table(os.path.join(root.path, "snapshots", root.latest(), "items"))
    expected = {r["item_id"]: (r["sid"], r["dedup"]) for r in snap.select(["item_id", "sid", "dedup"]).to_pylist()}
    catalog = pq.read_table(items)
    emb_cols = [c for c in catalog.column_names if c.endswith("_emb")]
    rows = catalog.slice(0, 400).select(["item_id", *emb_cols]).to_pylist()
    tok = load_tokenizer(model)
    # a new id with the same vectors is computed by the model: bit for bit its offline encode
    fresh_sid = {r["item_id"]: s for r, s in zip(rows, tok.encode(catalog.slice(0, 400)).sid.tolist())}

    port = free_ports(1)[0]
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = SidServe.options(num_replicas=2, user_config={
        "model_uri": model, "snapshot_root": root.uri, "snapshot_poll_s": 0, "max_batch_size": 64,
        "batch_wait_timeout_s": 0.0}).bind()
    serve.run(app, name="sidserve", route_prefix="/")
    stats = {"requests": 0, "first_attempt_failed": 0, "failed_after_retry": 0, "wrong": 0, "in_flight": 0}
    lock = threading.Lock()
    stop = threading.Event()
    in_flight = [0]

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while not stop.is_set():
                row = rows[int(rng.integers(len(rows)))]
                known = bool(rng.integers(2))
                item = row if known else {**row, "item_id": f"new-{row['item_id']}"}
                with lock:
                    in_flight[0] += 1
                r, _, first_failed = post_with_retry(client, {"items": [item]})
                with lock:
                    in_flight[0] -= 1
                    stats["requests"] += 1
                    stats["first_attempt_failed"] += first_failed
                    if r is None or r.status_code != 200:
                        stats["failed_after_retry"] += 1
                        stats.setdefault("failures", []).append(
                            "no answer" if r is None else f"{r.status_code} {r.text[:200]}")
                        continue
                    got = r.json()["results"][0]
                    want = (list(expected[row["item_id"]][0]), expected[row["item_id"]][1]) if known \
                        else (fresh_sid[row["item_id"]], None)
                    stats["wrong"] += (got["sid"], got["dedup"]) != want

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(5)
    replica_nodes = sorted({a["node_id"] for a in ray_actors("SidServe")})
    victim = cluster.name_of(replica_nodes[-1])
    with lock:
        stats["in_flight"] = in_flight[0]  # every client's request in flight, on any node: an upper bound
        before = stats["requests"]
    killed_at = time.time()
    processes = cluster.kill(victim)
    replacement = cluster.replace("worker", 1.0).name
    recovered_s = None
    deadline = time.time() + 180
    while time.time() < deadline:
        app_status = serve.status().applications.get("sidserve")
        live = {a["node_id"] for a in ray_actors("SidServe")}
        if app_status is not None and app_status.status == "RUNNING" and len(live) == 2:
            recovered_s = time.time() - killed_at
            break
        time.sleep(0.5)
    time.sleep(5)  # load on the recovered service
    stop.set()
    for t in threads:
        t.join(timeout=60)
    serve.shutdown()
    survived = recovered_s is not None and stats["wrong"] == 0 and stats["failed_after_retry"] == 0 \
        and stats["first_attempt_failed"] <= stats["in_flight"]
    return {"scenario": "serve", "survived": survived,
            "detail": {"killed": victim, "processes_killed": processes, "replacement": replacement,
                       "requests": stats["requests"], "requests_before_kill": before,
                       "recovered_s": None if recovered_s is None else round(recovered_s, 1),
                       "first_attempt_failed": stats["first_attempt_failed"],
                       "failed_after_retry": stats["failed_after_retry"],
                       "failures": sorted(set(stats.get("failures", [])))[:5]},
            "rows_lost": 0, "wrong_answers": stats["wrong"], "failed_requests": stats["first_attempt_failed"],
            "in_flight": stats["in_flight"]}


def ray_actors(class_fragment: str) -> list[dict]:
    """Alive actors whose class name contains ``class_fragment``, with their node ids, from the
    GCS's actor table (the state API needs the dashboard, which this cluster does not run)."""
    import ray._private.state as gcs_state

    out = []
    for info in gcs_state.actors(actor_state_name="ALIVE").values():
        if class_fragment in (info.get("ActorClassName") or ""):
            out.append({"node_id": (info.get("Address") or {}).get("NodeID"), "name": info["ActorClassName"]})
    return out


SCENARIOS = {"train": train_scenario, "assign": assign_scenario, "serve": serve_scenario}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="train,assign,serve", help=f"comma-separated, of {sorted(SCENARIOS)}")
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--workdir", default="/tmp/sidserve-node-faults")
    ap.add_argument("--head-cpus", type=int, default=0,
                    help="CPUs of the head (0: only the driver there; 1 with --worker-nodes 1: the smallest "
                         "cluster with work on two nodes, what the suite runs)")
    ap.add_argument("--worker-nodes", type=int, default=2)
    args = ap.parse_args(argv)
    if args.head_cpus + args.worker_nodes < 2 or args.worker_nodes < 1:
        ap.error("a scenario needs two nodes with a CPU, one of them a worker node that can be lost: "
                 f"--head-cpus {args.head_cpus} --worker-nodes {args.worker_nodes}")
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        ap.error(f"--scenarios: unknown {unknown}; choose from {sorted(SCENARIOS)}")
    if args.items < 2000:
        ap.error(f"--items must be >= 2000, got {args.items}")
    os.makedirs(args.workdir, exist_ok=True)
    items = write_catalog(args.workdir, args.items)

    import ray

    cluster = LocalCluster()
    results = []
    try:
        cluster.start_head(num_cpus=args.head_cpus)
        ray.init(address=cluster.address, log_to_driver=False)
        for k in range(args.worker_nodes):
            cluster.add_node(f"worker-{'abcdefgh'[k]}", 1.0)
        for name in chosen:
            results.append(SCENARIOS[name](cluster, args.workdir, items))
            print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
        cluster.stop()
    print(f"\nnode faults on one machine ({platform.machine()}, {os.cpu_count()} CPUs): a head ({args.head_cpus} CPUs) "
          f"and {args.worker_nodes} worker node(s) of 1 CPU, each `ray start`; one node SIGKILLed per scenario, "
          "a replacement started")
    print("| scenario | survived | node killed (processes) | detail |")
    print("|---|---|---|---|")
    for r in results:
        d = r["detail"]
        print(f"| {r['scenario']} | {'yes' if r['survived'] else 'NO'} | {d.get('killed')} ({d.get('processes_killed')}) | "
              f"{json.dumps({k: v for k, v in d.items() if k not in ('killed', 'processes_killed')})} |")
    survived = sum(r["survived"] for r in results)
    lost = sum(r["rows_lost"] or 0 for r in results)
    wrong = sum(r["wrong_answers"] for r in results)
    failed = sum(r["failed_requests"] for r in results)
    in_flight = sum(r["in_flight"] for r in results)
    print(f"scenarios {survived}/{len(results)} survived, rows lost {lost}, wrong answers {wrong}, "
          f"failed requests {failed} (in flight on the lost node: {in_flight})")
    return 0 if survived == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
